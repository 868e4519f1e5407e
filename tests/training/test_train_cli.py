"""`r2m train` on tiny models saved to folders: TRL's parser with the R2M section, one-line
errors with exit status 2, the same metrics for the same seed, resume, the demo's judge."""

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("trl")

from r2m.cli import main  # noqa: E402

from tests.support.trl_tiny import POLICY_DIM, RM_DIM, metrics, save_tiny_models  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def command(models, out, *extra):
    return ["train", "--policy", str(models / "policy"), "--reward_model", str(models / "rm"),
            "--prompts", str(models / "prompts.txt"), "--output_dir", str(out), "--device", "cpu",
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
            "--max_completion_length", "5", "--attn_dim", "8", "--head_learning_rate", "1e-2",
            "--disable_tqdm", "true", *extra]


def log_history(out):
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def fails_with(argv, capsys, *needles):
    """main(argv) exits 2 with one error line on stderr that contains every needle (before it
    only transformers' progress bars, where the models were loaded before the check failed)."""
    assert main(argv) == 2
    *before, err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("Loading weights") or not line.strip() for line in before), before
    assert err.startswith("r2m train: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_same_seed_same_metrics_and_resume(models, tmp_path, capsys):
    """Twice the same command: the same metrics. A run cut after its checkpoint at step 2 and
    resumed with --resume logs the uninterrupted run's metrics for step 3."""
    first = command(models, tmp_path / "a", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
                    "--trainer", "grpo")
    assert main(first) == 0
    assert main(command(models, tmp_path / "b", "--max_steps", "3", "--trainer", "grpo")) == 0
    want = metrics(log_history(tmp_path / "a"))
    assert len(want) == 3 and want == metrics(log_history(tmp_path / "b"))
    assert len({row["r2m/grebt_loss"] for row in want}) == 3

    shutil.rmtree(tmp_path / "a" / "checkpoint-3")  # as if the run had stopped after step 2
    (tmp_path / "a" / "trainer_state.json").unlink()
    assert main(first + ["--resume", "true"]) == 0
    assert metrics(log_history(tmp_path / "a")) == want
    assert "trainer_state.json" in capsys.readouterr().out

    fails_with(first + ["--resume", "true", "--mode", "static"], capsys, "resume:", "mode 'r2m'", "'static'")
    fails_with(first + ["--resume", "true", "--max_steps", "5"], capsys, "resume:", "max_steps=3", "max_steps=5")
    fails_with(first + ["--resume", "true", "--num_heads", "2"], capsys, "resume:", "num_heads=1", "num_heads=2")
    fails_with(first + ["--resume", "true", "--head_attends", "completion"], capsys, "resume:",
               "head_attends='sequence'", "head_attends='completion'")
    fails_with(command(models, tmp_path / "empty", "--resume", "true"), capsys, "resume: no checkpoint")


def test_damaged_checkpoints_on_resume_name_the_file_and_the_last_intact_one(models, tmp_path, capsys):
    """A truncated or garbled R2M state file, a truncated or missing head file: one line naming
    the file and what is wrong, and the newest earlier checkpoint that can continue the run."""
    out = tmp_path / "run"
    argv = command(models, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--trainer", "grpo")
    assert main(argv) == 0
    capsys.readouterr()
    last = out / "checkpoint-3"
    state, head = (last / "r2m_state.pt").read_bytes(), (last / "r2m_head.safetensors").read_bytes()
    damages = [("r2m_state.pt", state[: len(state) // 2], "is damaged"),
               ("r2m_state.pt", b"\x00garbage" * 50, "is damaged"),
               ("r2m_head.safetensors", head[: len(head) // 2], "is damaged"),
               ("r2m_head.safetensors", None, "has no r2m_head.safetensors")]
    for name, content, what in damages:
        (last / name).unlink()
        if content is not None:
            (last / name).write_bytes(content)
        err = fails_with(argv + ["--resume", "true"], capsys, "resume:", str(last), what,
                         "checkpoint-2 is intact: move checkpoint-3 out of")
        assert "Traceback" not in err
        (last / name).write_bytes(state if name == "r2m_state.pt" else head)
    (out / "checkpoint-2" / "r2m_state.pt").write_bytes(b"")
    (last / "r2m_state.pt").write_bytes(b"")
    fails_with(argv + ["--resume", "true"], capsys, "checkpoint-1 is intact")


def test_a_head_that_turns_non_finite_stops_the_run_before_a_reward_or_checkpoint(models, tmp_path, capsys):
    """A head learning rate so large that the head's float32 weights overflow: one line naming
    the training step, exit 1, and every checkpoint written holds finite head weights."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    argv = command(models, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1",
                   "--head_learning_rate", "1e37", "--trainer", "grpo")
    assert main(argv) == 1
    *_, err = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"r2m train: stopped: training step [123]: .*not finite", err), err
    assert "Traceback" not in err
    for checkpoint in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "r2m_head.safetensors").values())


def test_the_policy_and_the_reward_model_are_saved_at_the_end(models, tmp_path, capsys):
    """`r2m train` ends by saving the policy in OUTPUT_DIR and the R2M reward model in
    OUTPUT_DIR/r2m_reward_model, with the head the R2M flags describe and the trained weights."""
    from safetensors.torch import load_file

    from r2m import R2MRewardModel

    out = tmp_path / "out"
    argv = command(models, out, "--trainer", "grpo", "--num_heads", "2", "--omega_floor", "0.3",
                   "--save_strategy", "steps", "--save_steps", "2")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"reward model: {out / 'r2m_reward_model'}" in printed
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    rm = R2MRewardModel.from_pretrained(out / "r2m_reward_model")
    assert (rm.head.attn_dim, rm.head.num_heads, rm.head.omega_floor) == (8, 2, 0.3)
    assert rm.config.head_learning_rate == 1e-2 and rm.name_or_path == str(models / "rm")
    trained = load_file(out / "checkpoint-2" / "r2m_head.safetensors")
    assert all(torch.equal(rm.head.state_dict()[name], value) for name, value in trained.items())
def test_save_steps_trls_default_is_aligned_and_a_given_one_checked(models, tmp_path, capsys, caplog):
    """With 3 optimizer steps per generation batch, TRL's default save_steps (500) is aligned to
    501 with one line saying so; 500 given as a flag or in the YAML file is refused naming 498
    and 501, before any model is loaded; a ratio of a length in epochs is refused when training
    begins, leaving no output folder. (The line is a logger warning: on stderr, by Python's
    last-resort handler, where pytest does not capture logging.)"""
    out = tmp_path / "default"
    with caplog.at_level("WARNING", logger="r2m"):
        assert main(command(models, out, "--trainer", "grpo", "--num_iterations", "3", "--max_steps", "3")) == 0
    notes = [r.getMessage() for r in caplog.records if "save_steps" in r.getMessage()]
    assert len(notes) == 1 and notes[0] == ("save_steps: TRL's default 500 is not a multiple of the optimizer steps "
                                            "per generation batch (3 = steps_per_generation x num_iterations / "
                                            "gradient_accumulation_steps), as a checkpoint must be for a resumed run "
                                            "to continue exactly; checkpoints every 501 steps instead"), notes
    assert json.loads((out / "trainer_state.json").read_text())["save_steps"] == 501
    capsys.readouterr()
    given = command(models, tmp_path / "given", "--trainer", "grpo", "--num_iterations", "3")
    err = fails_with(given + ["--save_steps", "500"], capsys, "save_steps (500) must be a multiple", "(3 = ",
                     "the nearest valid: 498 or 501")
    config = tmp_path / "run.yaml"
    config.write_text("save_steps: 500\n")
    assert fails_with(given + ["--config", str(config)], capsys) == err
    in_epochs = command(models, tmp_path / "epochs", "--trainer", "grpo", "--num_iterations", "2", "--max_steps", "-1",
                        "--num_train_epochs", "2", "--save_steps", "0.25")
    fails_with(in_epochs, capsys, "save_steps (0.25 of max_steps 12 = 3 steps)", "the nearest valid: 2 or 4")
    assert not (tmp_path / "epochs").exists() and not (tmp_path / "given").exists()


def test_rloo_from_a_yaml_file(models, tmp_path):
    """The R2M section and TRL's settings from one YAML file (flags override it)."""
    config = tmp_path / "run.yaml"
    config.write_text("trainer: rloo\nmode: gre-only\nmax_steps: 1\nbeta: 0.1\nlearning_rate: 1e-4\n")
    assert main(command(models, tmp_path / "out", "--config", str(config), "--max_steps", "1")) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["max_steps"] == 1 and "kl" in state["log_history"][0]


@pytest.mark.parametrize("extra, needles", [
    (["--max_steps", "abc"], ["--max_steps", "invalid int value: 'abc'"]),
    (["--max_steps", "2.5"], ["--max_steps", "invalid int value: '2.5'"]),
    (["--mode", "gold"], ["--mode", "invalid choice: 'gold'"]),
    (["--attn_dim", "0"], ["attn_dim must be an integer >= 1"]),
    (["--head_learning_rate", "-1"], ["head_learning_rate"]),
    (["--head_learning_rate", "inf"], ["head_learning_rate must be a finite number", "inf"]),
    (["--head_learning_rate", "1e38"], ["head_learning_rate must be <= 3.403e+37", "10x the rate", "float32"]),
    (["--omega_floor", "nan"], ["omega_floor must be a finite number", "nan"]),
    (["--learning_rate", "inf"], ["learning_rate: inf is not a finite number"]),
    (["--max_grad_norm=-inf"], ["max_grad_norm: -inf is not a finite number"]),
    (["--temperature", "nan"], ["temperature: nan is not a finite number"]),
    (["--num_generations", "3"], ["generation_batch_size (8) must be divisible by num_generations (3)"]),
    (["--trainer", "ppo"], ["trainer: 'ppo'"]),
    (["--device", "tpu"], ["device: 'tpu'"]),
    (["--no_such_flag", "1"], ["--no_such_flag"]),
    (["--num_generations", "1"], ["num_generations must be at least 2", "got 1"]),
    (["--save_steps", "1", "--num_iterations", "2"], ["save_steps (1) must be a multiple"]),
    (["--head_backend", "cuda"], ["head_backend='cuda' cannot run on cpu", "cuda"]),
])
def test_bad_flags(models, tmp_path, capsys, extra, needles):
    fails_with(command(models, tmp_path) + extra, capsys, *needles)


@pytest.mark.parametrize("text, needles", [
    ("max_steps: 2.5\n", ["max_steps: 2.5 is not a valid int"]),
    ("num_iterations: abc\n", ["--num_iterations", "invalid int value: 'abc'"]),
    ("learning_rate: [1]\n", ["learning_rate: [1] is not a valid float"]),
    ("learning_rate: .inf\n", ["learning_rate: inf is not a finite number"]),
    ("grebt_alpha: .nan\n", ["grebt_alpha must be a finite number", "nan"]),
    ("mode: 3\n", ["mode: 3 is not a valid str"]),
    ("mode: gold\n", ["mode: 'gold' is not one of r2m"]),
    ("stepz: 3\n", ["stepz: unknown setting"]),
    ("- a\n- b\n", ["--config", "must hold a mapping"]),
    ("max_steps: [1\n", ["--config", "is not valid YAML"]),
])
def test_bad_config_files(models, tmp_path, capsys, text, needles):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    fails_with(command(models, tmp_path / "out", "--config", str(path)), capsys, *needles)


def test_missing_files_and_devices(models, tmp_path, capsys):
    fails_with(command(models, tmp_path, "--config", str(tmp_path / "none.yaml")), capsys, "--config", "none.yaml")
    for local in ("./no/such/model", str(tmp_path / "nowhere")):
        err = fails_with(command(models, tmp_path, "--policy", local), capsys, "policy: no such folder")
        assert "hub" not in err.lower() and "repo" not in err.lower()
    fails_with(command(models, tmp_path, "--policy", str(models / "prompts.txt")), capsys, "policy:", "is a file")
    fails_with(command(models, tmp_path, "--reward_model", str(tmp_path)), capsys, "reward_model: cannot load")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fails_with(command(models, tmp_path, "--prompts", str(empty)), capsys, "prompts:", "has no prompts")
    fails_with(command(models, tmp_path, "--prompts", str(tmp_path / "none.txt")), capsys, "prompts: cannot read")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n{"question": "x"}\n')
    fails_with(command(models, tmp_path, "--prompts", str(bad)), capsys, "prompts:", "line 2")
    for prompt in ('3', '["a"]', '[{"role": "user"}]', '[]', 'null'):
        bad.write_text(f'{{"prompt": "1+1="}}\n{{"prompt": {prompt}}}\n')
        fails_with(command(models, tmp_path, "--prompts", str(bad)), capsys, "prompts:", "line 2",
                   "must be text or a list of messages")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    fails_with(command(models, tmp_path, "--prompts", str(latin1)), capsys, "prompts:", "is not UTF-8 text (byte 3)")
    config = tmp_path / "latin1.yaml"
    config.write_bytes("mode: r2m  # caf\u00e9\n".encode("latin-1"))
    fails_with(command(models, tmp_path, "--config", str(config)), capsys, "--config:", "is not UTF-8 text")
    fails_with(["train", "--resume", "true"], capsys, "needs --policy", "r2m experiment")
    if not torch.cuda.is_available():
        fails_with(command(models, tmp_path, "--device", "cuda"), capsys, "device: cuda", "no CUDA device")


def damaged_copy(folder, out, how):
    """A copy of the model folder `folder` at `out`, damaged in the way `how` names."""
    shutil.copytree(folder, out)
    weights, config = out / "model.safetensors", out / "config.json"
    settings = json.loads(config.read_text())
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "hidden_size changed":
        config.write_text(json.dumps({**settings, "hidden_size": 2 * settings["hidden_size"]}))
    elif how == "one layer more":
        config.write_text(json.dumps({**settings, "num_hidden_layers": settings["num_hidden_layers"] + 1}))
    elif how == "empty config.json":
        config.write_text("")
    elif how == "garbage config.json":
        config.write_bytes(b"\x00\xff{garbage")
    elif how == "config.json without model_type":
        config.write_text("{}")
    return out


@pytest.mark.parametrize("which, flag", [("policy", "--policy"), ("rm", "--reward_model")])
def test_model_folders_that_load_wrongly(models, tmp_path, capsys, which, flag):
    """Weights cut short, a config.json that contradicts the weights (transformers would raise
    for one shape and re-initialise missing tensors at random with a warning), a config.json
    that is not one: one line naming the folder (and the file) and what is wrong, exit 2, no
    output folder."""
    name = flag[2:]
    dim = {"policy": POLICY_DIM, "rm": RM_DIM}[which]
    cases = {
        "truncated weights": ["model.safetensors is damaged", "file not fully covered"],
        "hidden_size changed": ["do not fit its config.json",
                                f"model.embed_tokens.weight is (101, {dim}) in the weights, (101, {2 * dim}) by config.json"],
        "one layer more": ["lack 9 of the tensors its config.json defines", "model.layers.2.", "would start at random"],
        "empty config.json": ["cannot load", "config.json", "is not a valid JSON file"],
        "garbage config.json": ["cannot load", "config.json", "is not a valid JSON file"],
        "config.json without model_type": ["cannot load", "model_type"],
    }
    for how, needles in cases.items():
        folder = damaged_copy(models / which, tmp_path / how.replace(" ", "_"), how)
        out = tmp_path / "out"
        fails_with(command(models, out, flag, str(folder)), capsys, f"{name}: ", str(folder), *needles)
        assert not out.exists(), how


def test_a_causal_lm_is_not_a_reward_model(models, tmp_path, capsys):
    # Its score head would be initialised at random, with only a warning from transformers.
    fails_with(command(models, tmp_path / "out", "--reward_model", str(models / "policy")), capsys,
               "reward_model: the weights in", "lack 1 of the tensors", "score.weight")
    assert not (tmp_path / "out").exists()


def test_demo_gold_judge():
    from r2m.experiment import tasks

    sum_prompt = "What is 7 + 5? Answer with just the number."
    word_prompt = "What is the capital of France? Answer with one word."
    assert set(tasks.PROMPTS) == set(tasks.TASKS) and len(tasks.PROMPTS) == len(set(tasks.PROMPTS))
    assert tasks.gold_reward(sum_prompt, "12") == 1.0
    assert tasks.gold_reward(word_prompt, "Paris.") == 1.0
    assert tasks.gold_reward(sum_prompt, "13") == 0.0
    assert tasks.gold_reward(sum_prompt, "The answer is clearly 12, of course") == pytest.approx(3 / 7)
    assert tasks.gold_reward(word_prompt, "London is not it") == 0.0
    conversational = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": sum_prompt}]]
    assert tasks.gold_reward_func(conversational, [[{"role": "assistant", "content": "12"}]]) == [1.0]
    assert tasks.gold_reward_func([word_prompt], ["Rome"]) == [0.0]


def test_a_library_error_without_a_message_is_still_one_line():
    """The one-line errors quote a library exception's first line, or its type when its message
    is empty (an empty message once raised IndexError out of the error handler)."""
    from r2m.cli.train import _load
    from r2m.config import UsageError, message_line

    def loader(path):
        raise ValueError()

    with pytest.raises(UsageError, match=r"^reward_model: cannot load x: ValueError$"):
        _load("reward_model", loader, "x")
    assert message_line(OSError("  first\nsecond")) == "first" and message_line(KeyError()) == "KeyError"
