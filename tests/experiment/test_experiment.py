"""`r2m experiment` on tiny random models: the paired bookkeeping (every arm of a seed trains on
the same prompts and draws the same held-out samples at step 0; the held-out set is fixed and
never trained on), the evaluation leaves the training's random numbers alone, the same command
gives the same numbers, the report's files, one-line errors."""

import copy
import json
import math

import pytest
import torch

pytest.importorskip("trl")

from r2m.cli import main  # noqa: E402
from r2m.experiment.evaluation import HeldOutEvaluation  # noqa: E402

from tests.support.trl_tiny import make_trainer, metrics, save_tiny_models  # noqa: E402

ARMS = ["static", "r2m", "iterative-head"]


def command(out, cache, *extra):
    return ["experiment", "--tiny", "--device", "cpu", "--output_dir", str(out), "--model_cache", str(cache),
            "--arms", ",".join(ARMS), "--seeds", "0,1", "--max_steps", "2", "--eval_every", "2",
            "--per_device_train_batch_size", "8", "--eval_samples", "2", "--rm_fit_prompts", "4", "--rm_layers", "0",
            *extra]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """One tiny experiment: 2 seeds x 3 arms x 2 steps (one generation batch, two iterations),
    evaluated at steps 0 and 2."""
    root = tmp_path_factory.mktemp("experiment")
    assert main(command(root / "out", root / "models")) == 0
    return root


def records(out):
    return {(seed, arm): json.loads((out / f"seed{seed}" / arm / "record.json").read_text())
            for seed in (0, 1) for arm in ARMS}


def test_arms_of_a_seed_are_paired(experiment):
    runs = records(experiment / "out")
    for seed in (0, 1):
        first = runs[seed, "static"]
        assert len(first["prompts"]) == 1  # one judge call per generation batch: 2 steps, 2 iterations each
        for arm in ARMS:
            run = runs[seed, arm]
            assert run["prompts"] == first["prompts"]
            assert [row["step"] for row in run["eval"]] == [0, 2]
            assert run["eval"][0]["digest"] == first["eval"][0]["digest"]
            assert run["eval"][0]["gold"] == first["eval"][0]["gold"]
    # the check is not vacuous: the seeds differ in their prompt order
    assert runs[0, "static"]["prompts"] != runs[1, "static"]["prompts"]
    summary = json.loads((experiment / "out" / "report.json").read_text())
    assert all(all(c.values()) for c in summary["pairing"].values())


def test_held_out_set_is_fixed_and_never_trained_on(experiment):
    from r2m.experiment.tiny import TINY_PROMPTS
    from r2m.experiment.run import _tasks

    train, held_out, _, _ = _tasks(tiny=True)
    questions = {m["content"] for p in held_out for m in p}
    assert questions and questions <= set(TINY_PROMPTS)
    for run in records(experiment / "out").values():
        trained_on = {q for call in run["prompts"] for q in call}
        assert trained_on and not trained_on & questions
    # the same held-out samples for every arm and seed at step 0 (same initial policy, same evaluation seed)
    assert len({run["eval"][0]["digest"] for run in records(experiment / "out").values()}) == 1


def test_report_files_and_table(experiment, capsys):
    out = experiment / "out"
    summary = json.loads((out / "report.json").read_text())
    assert [(m["arm"], m["seed"]) for m in summary["runs"]] == [(a, s) for s in (0, 1) for a in ARMS]
    for arm in ("r2m", "iterative-head"):
        paired = summary["paired"][arm]["gold_auc"]
        by = {(m["arm"], m["seed"]): m["gold_auc"] for m in summary["runs"]}
        assert paired["per_seed"] == pytest.approx([by[arm, s] - by["static", s] for s in (0, 1)])
        assert paired["n"] == 2
    assert (out / "report.png").stat().st_size > 0
    assert len((out / "report.csv").read_text().splitlines()) == 1 + 2 * len(ARMS)
    by = {(m["arm"], m["seed"]): m["gold_second_half"] for m in summary["runs"]}
    head_to_head = summary["head_to_head"]["r2m − iterative-head"]["gold_second_half"]
    assert head_to_head["per_seed"] == pytest.approx([by["r2m", s] - by["iterative-head", s] for s in (0, 1)])
    text = (out / "report.md").read_text()
    assert "paired difference of held-out gold AUC" in text and "r2m − iterative-head" in text
    # two seeds: a mean and the seeds, but no p-value, interval or detectable effect
    assert "no p-value, CI or detectable effect: 2 seeds, at least 3 needed" in text
    assert "smallest detectable" not in text
    assert all(math.isnan(summary["paired"][arm]["gold_auc"]["mde"]) for arm in ("r2m", "iterative-head"))
    # ...and the primary family's Holm correction has nothing to correct
    assert list(summary["primary"]["holm"]) == ["r2m − static", "r2m − iterative-head"]
    assert all(math.isnan(h["p_holm"]) and not h["reject"] for h in summary["primary"]["holm"].values())
    assert "Holm-adjusted p n/a: untested" in text
    # R2M's metrics come from TRL's log: the head's share and where it looks for r2m only, the
    # re-ranking against the frozen RM for both arms with a head
    r2m_run = next(m for m in summary["runs"] if m["arm"] == "r2m")
    head_run = next(m for m in summary["runs"] if m["arm"] == "iterative-head")
    assert r2m_run["train_head_share_run"] >= 0 and math.isnan(head_run["train_head_share_run"])
    assert 0 < r2m_run["train_attn_completion_mass_run"] < 1 and 0 < r2m_run["train_attn_max_weight_run"] <= 1
    assert 0 <= r2m_run["train_attn_shared_argmax_run"] <= 1 and math.isnan(head_run["train_attn_max_weight_run"])
    assert 0 <= head_run["train_rerank_share_run"] <= 1 and 0 <= r2m_run["train_rerank_share_run"] <= 1
    assert "on the training batches" in text and "shared focus" in text
    assert r2m_run["head_learning_rate"] == 3e-3 and r2m_run["head_attends"] == "sequence"


def test_same_command_same_numbers(experiment, tmp_path):
    """A second run of the same command (a fresh output folder, the models cached) reproduces
    every number but the wall times; a rerun in the first folder reuses its records."""
    argv = command(tmp_path / "again", experiment / "models", "--seeds", "1", "--arms", "r2m")
    assert main(argv) == 0
    want = records(experiment / "out")
    for arm in ("static", "r2m"):
        got = json.loads((tmp_path / "again" / "seed1" / arm / "record.json").read_text())
        assert got["eval"] == want[1, arm]["eval"]
        assert metrics(got["train"]) == metrics(want[1, arm]["train"])


def test_a_folder_of_runs_with_other_settings_is_refused(experiment, capsys):
    """Continuing into a folder whose finished runs were made with other settings (what the head
    attends to, its learning rate) is refused in one line, exit 2, before anything is written
    there; the same settings continue it, reusing every finished run."""
    out = experiment / "out"
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for extra, needle in ((["--head_attends", "completion"], "head_attends 'sequence' there, 'completion' now"),
                          (["--head_learning_rate", "1e-3"], "head_learning_rate 0.003 there, 0.001 now"),
                          (["--arm_head_learning_rates", "iterative-head=1e-2"], "arm_head_learning_rates {} there")):
        assert main(command(out, experiment / "models", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("r2m experiment: error: output_dir:"), err
        assert needle in err and "seed0/iterative-head" in err and "another --output_dir" in err, err
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files
    assert main(command(out, experiment / "models")) == 0
    assert "seed 0" not in capsys.readouterr().err  # no run was trained again
    for path, stamp in files.items():
        if path.name == "record.json":
            assert path.stat().st_mtime_ns == stamp


def test_digest_covers_the_head_settings():
    from trl import RLOOConfig

    from r2m import R2MConfig
    from r2m.experiment.run import digest_settings, settings_digest
    from r2m.experiment.settings import ExperimentArguments

    args = RLOOConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none")

    def digest(experiment=None, **r2m):
        return settings_digest(digest_settings(experiment or ExperimentArguments(), R2MConfig(**r2m), args))

    base = digest()
    assert digest(head_attends="completion") != base and digest(head_learning_rate=1e-3) != base
    assert digest(ExperimentArguments(arm_head_learning_rates="iterative-head=1e-2")) != base
    assert digest(ExperimentArguments(arm_head_learning_rates=" iterative-head = 0.01 ")) == \
        digest(ExperimentArguments(arm_head_learning_rates="iterative-head=1e-2"))
    # which arms and seeds run, and whether static does, change no run's numbers
    assert digest(ExperimentArguments(arms="r2m", seeds="3", with_static=False), mode="static") == base


def test_one_arm_alone_with_its_own_head_learning_rate(experiment, tmp_path, capsys):
    """A pilot's run: the r2m arm alone (no static arm, so no paired difference), its head
    learning rate from --arm_head_learning_rates, the head attending to the completion only;
    the diagnostics of the training batches printed and reported per run."""
    out = tmp_path / "pilot"
    argv = command(out, experiment / "models", "--arms", "r2m", "--with_static", "false", "--seeds", "0",
                   "--arm_head_learning_rates", "r2m=1e-2", "--head_attends", "completion")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert [p.name for p in (out / "seed0").iterdir()] == ["r2m"]
    summary = json.loads((out / "report.json").read_text())
    (run,) = summary["runs"]
    assert (run["arm"], run["head_learning_rate"], run["head_attends"]) == ("r2m", 1e-2, "completion")
    assert run["train_attn_completion_mass_run"] == pytest.approx(1.0)
    assert "paired difference" not in printed and "on the training batches" in printed


def test_evaluation_leaves_training_random_numbers_alone(tmp_path):
    """A trainer with the held-out evaluation logs exactly what the same trainer logs without
    it: the evaluation's sampling does not consume the training's random stream."""
    models = save_tiny_models(tmp_path / "models")
    logs = []
    for with_eval in (False, True):
        torch.manual_seed(0)
        trainer, _ = make_trainer(models, "rloo", tmp_path / f"out{with_eval}", max_steps=4, num_iterations=2)
        if with_eval:
            evaluation = HeldOutEvaluation(trainer, [[{"role": "user", "content": "3+3="}]],
                                           copy.deepcopy(trainer.model), every=2, samples=3, seed=5)
            trainer.add_callback(evaluation)
        trainer.train()
        logs.append(metrics(trainer.state.log_history))
    assert logs[0] == logs[1]
    assert [row["step"] for row in evaluation.rows] == [0, 2, 4]
    assert all(row["kl"] >= 0 for row in evaluation.rows) and evaluation.rows[0]["kl"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("extra, needles", [
    (["--arms", "static,gold"], ["arms: 'gold'"]),
    (["--arms", "r2m,r2m"], ["arms:", "twice"]),
    (["--seeds", "0,x"], ["seeds:"]),
    (["--eval_every", "3"], ["eval_every (3)", "multiple"]),
    (["--preset", "huge"], ["preset: 'huge'"]),
    (["--max_steps", "0"], ["max_steps"]),
    (["--rm_layers", "5"], ["rm_layers must be in [1, 2]; got 5"]),
    (["--label_noise", "inf"], ["label_noise: inf is not a finite number"]),
    (["--brevity_bias", "nan"], ["brevity_bias: nan is not a finite number"]),
    (["--head_backend", "cuda"], ["head_backend='cuda' cannot run on cpu"]),
    (["--head_attends", "prompt"], ["head_attends", "'prompt'"]),
    (["--arms", "", "--with_static", "false"], ["arms: none given"]),
    (["--arm_head_learning_rates", "r2m=abc"], ["arm_head_learning_rates: 'r2m=abc' is not ARM=RATE"]),
    (["--arm_head_learning_rates", "r2m=-1"], ["arm_head_learning_rates: r2m's rate -1 must be"]),
    (["--arm_head_learning_rates", "static=1e-3"], ["arm_head_learning_rates: 'static' is not an arm with a head"]),
    (["--arm_head_learning_rates", "noise=1e-3"], ["'noise' is not among the arms run"]),
])
def test_bad_settings_one_line(tmp_path, capsys, extra, needles):
    assert main(command(tmp_path / "out", tmp_path / "models", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("r2m experiment: error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("argv, rm_layers", [
    ([], 12), (["--tiny"], 0), (["--tiny", "true"], 0), (["--tiny", "false"], 12), (["--tiny", "--rm_layers", "1"], 1),
])
def test_tiny_takes_the_whole_tiny_model_as_the_rm(argv, rm_layers):
    from r2m.cli.experiment import parse

    experiment = parse([*argv, "--device", "cpu"])[0]
    assert experiment.rm_layers == rm_layers


def test_demo_held_out_split_and_labeller():
    from r2m.experiment import tasks

    assert tasks.EVAL_PROMPTS and not set(tasks.EVAL_PROMPTS) & set(tasks.TRAIN_PROMPTS)
    assert set(tasks.EVAL_PROMPTS) | set(tasks.TRAIN_PROMPTS) == set(tasks.PROMPTS)
    prefer = dict(brevity_bias=1.0, max_words=8, noise=0.0)
    assert tasks.biased_preference(0.0, 0, **prefer) == pytest.approx(1.0)
    assert tasks.biased_preference(1.0, 2, **prefer) == pytest.approx(1.75)
    assert tasks.biased_preference(0.0, 20, **prefer) == 0.0
    assert tasks.biased_preference(0.5, 4, **dict(prefer, noise=0.25)) == pytest.approx(1.25)
    # the labeller's blind spot: a one-word wrong answer beats a correct eight-word one
    long_correct = tasks.gold_reward(tasks.EVAL_PROMPTS[0], "A ripe banana is usually yellow in color")
    assert long_correct > 0
    assert tasks.biased_preference(0.0, 1, **prefer) > tasks.biased_preference(long_correct, 8, **prefer)
