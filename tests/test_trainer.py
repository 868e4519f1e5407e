"""R2MTrainer on a tiny random-weight Llama (no download): every mode, what is frozen, what the
head sees, config mapping, checkpoint/resume."""

import argparse
import copy
import json

import pytest
import torch

from r2m import R2MConfig, R2MTrainer
from r2m.config import MODES
from r2m.demo.tiny import tiny_setup
from r2m.reward_model import position_ids_from_mask

METRIC_KEYS = {"step", "mode", "omega", "proxy_reward", "rm_reward", "gold_reward", "kl", "response_length",
               "policy_loss", "r2m_loss", "generate_ms", "reward_ms", "policy_step_ms", "r2m_update_ms"}


def make_trainer(tmp_path, mode="r2m", **overrides):
    policy, tok, rm, prompts, judge = tiny_setup(seed=0)
    settings = dict(mode=mode, steps=2, prompts_per_step=3, samples_per_prompt=3, max_new_tokens=5,
                    attn_dim=16, num_heads=2, head_lr=1e-2, policy_lr=1e-3, output_dir=str(tmp_path / mode),
                    progress=False, seed=3)
    settings.update(overrides)
    return R2MTrainer(R2MConfig(**settings), policy, tok, rm, prompts, judge=judge)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("mode", MODES)
def test_two_steps_of_every_mode(tmp_path, mode):
    trainer = make_trainer(tmp_path, mode)
    policy0, ref0 = snapshot(trainer.policy), snapshot(trainer.ref_policy)
    backbone0, score0, head0 = snapshot(trainer.rm.backbone), snapshot(trainer.rm.score_head), snapshot(trainer.rm.head)
    history = trainer.train()

    assert [m["step"] for m in history] == [0, 1]
    lines = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    for m in history:
        assert set(m) == METRIC_KEYS and m["mode"] == mode
        assert m["gold_reward"] is not None and 0 <= m["gold_reward"] <= 1
        assert 1 <= m["response_length"] <= 5
        assert (m["r2m_loss"] is None) == (mode == "static") == (m["omega"] is None)
        assert (m["r2m_update_ms"] is None) == (mode == "static")
    if mode != "static":
        assert history[0]["omega"] == 1.0 and history[1]["omega"] == 0.6  # cosine over T = 2, floor 0.6
        # at omega = 1 the R2M reward is the RM's own (the head's phi was copied from it)
        assert history[0]["proxy_reward"] == pytest.approx(history[0]["rm_reward"], abs=1e-5)

    assert changed(policy0, trainer.policy)
    assert not changed(ref0, trainer.ref_policy)
    assert not changed(backbone0, trainer.rm.backbone) and not changed(score0, trainer.rm.score_head)
    assert changed(head0, trainer.rm.head) == (mode not in ("static", "r2m-frozen"))
    assert {"policy.safetensors", "head.safetensors", "trainer_state.pt"} <= {
        p.name for p in (tmp_path / mode / "checkpoint").iterdir()}


def test_head_sees_the_policys_last_layer(tmp_path, monkeypatch):
    """Both head calls of a step (the scoring and the R2M update) get the policy's last-layer
    hidden states of that step's sequences, detached; with one epoch both come from the policy
    as it was before the step's update."""
    trainer = make_trainer(tmp_path, "r2m")
    policy_before = copy.deepcopy(trainer.policy)
    seen, rollouts = [], []
    head_forward, generate = trainer.rm.head.forward, trainer.generate
    monkeypatch.setattr(trainer.rm.head, "forward", lambda rte, hidden, **kw: (
        seen.append((hidden, kw["mask"])), head_forward(rte, hidden, **kw))[1])
    monkeypatch.setattr(trainer, "generate", lambda idx: rollouts.append(generate(idx)) or rollouts[-1])
    trainer.train_step()

    rollout = rollouts[0]
    with torch.no_grad():
        expected = policy_before(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                                 position_ids=position_ids_from_mask(rollout.attention_mask),
                                 output_hidden_states=True).hidden_states[-1]
    assert len(seen) == 2
    valid = rollout.attention_mask.bool()
    for hidden, mask in seen:
        assert not hidden.requires_grad
        assert torch.equal(mask, rollout.attention_mask)
        torch.testing.assert_close(hidden[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_noise_mode_feeds_matched_noise(tmp_path):
    trainer = make_trainer(tmp_path, "noise")
    hidden = torch.randn(4, 7, 32) * 3 + 1
    mask = torch.ones(4, 7, dtype=torch.long)
    noise = trainer.head_input(hidden, mask)
    assert noise.shape == hidden.shape and not torch.equal(noise, hidden)
    assert noise.mean().item() == pytest.approx(hidden.mean().item(), abs=0.5)
    assert noise.std().item() == pytest.approx(hidden.std().item(), rel=0.2)


def test_advantages(tmp_path):
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    rloo = make_trainer(tmp_path, advantage="rloo").advantages(rewards)
    others = torch.tensor([(2 + 6) / 2, (1 + 6) / 2, (1 + 2) / 2, 3 / 2, 3 / 2, 0.0])
    torch.testing.assert_close(rloo, rewards - others)
    grpo = make_trainer(tmp_path, advantage="grpo").advantages(rewards).view(2, 3)
    torch.testing.assert_close(grpo.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(grpo.std(1, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)


def test_resume_continues_where_it_stopped(tmp_path, monkeypatch):
    uninterrupted = make_trainer(tmp_path / "a")
    straight = uninterrupted.train()

    crashing = make_trainer(tmp_path / "b", save_every=1)
    step = crashing.train_step
    monkeypatch.setattr(crashing, "train_step", lambda: step() if crashing.step < 1 else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        crashing.train()

    resumed = make_trainer(tmp_path / "b", save_every=1)
    resumed.load_checkpoint()
    assert resumed.step == 1
    tail = resumed.train()
    assert [m["step"] for m in tail] == [1]
    logged = [json.loads(line) for line in (tmp_path / "b" / "r2m" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [0, 1]
    assert straight[1]["r2m_loss"] != straight[0]["r2m_loss"]  # step 2 is not a replay of step 1
    for a, b in ((uninterrupted.policy, resumed.policy), (uninterrupted.rm.head, resumed.rm.head)):
        for (name, want), got in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    for want, got in zip(straight, logged):
        for key in METRIC_KEYS:
            if key.endswith("_ms"):
                continue
            expected = pytest.approx(want[key], rel=1e-5, abs=1e-6) if isinstance(want[key], float) else want[key]
            assert got[key] == expected, key


def test_config_yaml_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mode: gre-only\nsteps: 7\ntemperature: 0.5\n")
    parser = argparse.ArgumentParser()
    R2MConfig.add_arguments(parser)
    args = parser.parse_args(["--steps", "9", "--no-progress", "--train-last-layers", "2"])
    config = R2MConfig.from_args(args, R2MConfig.from_yaml(path))
    assert (config.mode, config.steps, config.temperature, config.progress, config.train_last_layers) == (
        "gre-only", 9, 0.5, False, 2)
    assert config.grebt_alpha == 1.0 and config.trains_head
    assert R2MConfig.from_args(parser.parse_args([])) == R2MConfig()
    with pytest.raises(ValueError, match="unknown R2MConfig keys"):
        R2MConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="mode"):
        R2MConfig(mode="gold")


def test_train_last_layers_freezes_the_rest(tmp_path):
    trainer = make_trainer(tmp_path, train_last_layers=1)
    embed0 = trainer.policy.get_input_embeddings().weight.detach().clone()
    first0, last0 = snapshot(trainer.decoder.layers[0]), snapshot(trainer.decoder.layers[-1])
    trainer.train_step()
    assert torch.equal(embed0, trainer.policy.get_input_embeddings().weight)
    assert not changed(first0, trainer.decoder.layers[0]) and changed(last0, trainer.decoder.layers[-1])


def test_cli_trains_and_resumes_saved_models(tmp_path):
    """`r2m train --policy --reward-model --prompts` on tiny models saved with save_pretrained,
    then --resume extends the run instead of restarting it."""
    from transformers import LlamaForSequenceClassification

    from r2m.cli import main
    from r2m.demo.tiny import TINY_PROMPTS, tiny_llama_config, tiny_policy, tiny_tokenizer

    tok = tiny_tokenizer()
    for folder, model in (("policy", tiny_policy(tok)),
                          ("rm", LlamaForSequenceClassification(tiny_llama_config(len(tok), 24, num_labels=1)))):
        model.save_pretrained(tmp_path / folder)
        tok.save_pretrained(tmp_path / folder)
    (tmp_path / "prompts.txt").write_text("\n".join(TINY_PROMPTS[:4]) + "\n")
    common = ["train", "--policy", str(tmp_path / "policy"), "--reward-model", str(tmp_path / "rm"),
              "--prompts", str(tmp_path / "prompts.txt"), "--output-dir", str(tmp_path / "run"),
              "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4",
              "--attn-dim", "8", "--no-progress"]
    assert main(common + ["--steps", "1"]) == 0
    assert main(common + ["--steps", "2", "--resume"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [0, 1]
    assert logged[0]["gold_reward"] is None  # no judge outside the demo


def test_tiny_demo_end_to_end(tmp_path, monkeypatch, capsys):
    """The demo driver (RM fit, static vs r2m, table, plot) on the tiny model."""
    from r2m.demo import run as demo

    monkeypatch.setitem(demo.RM_FIT, "batches", 2)
    monkeypatch.setitem(demo.RM_FIT, "steps", 20)
    config = R2MConfig(steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, attn_dim=8,
                       output_dir=str(tmp_path), progress=False)
    results = demo.run_demo(config, tiny=True)
    assert list(results) == ["static", "r2m"] and all(len(h) == 2 for h in results.values())
    # same seed, same first batch: step 0 is identical, and at omega = 1 so are the rewards
    assert results["static"][0]["proxy_reward"] == pytest.approx(results["r2m"][0]["proxy_reward"], abs=1e-5)
    assert (tmp_path / "demo.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "static proxy" in out and "r2m gold" in out


def test_demo_gold_judge():
    from r2m.demo import tasks

    sum_prompt = "What is 7 + 5? Answer with just the number."
    word_prompt = "What is the capital of France? Answer with one word."
    assert set(tasks.PROMPTS) == set(tasks.TASKS) and len(tasks.PROMPTS) == len(set(tasks.PROMPTS))
    assert tasks.gold_reward(sum_prompt, "12") == 1.0
    assert tasks.gold_reward(word_prompt, "Paris.") == 1.0
    assert tasks.gold_reward(sum_prompt, "13") == 0.0
    assert tasks.gold_reward(sum_prompt, "The answer is clearly 12, of course") == pytest.approx(3 / 7)
    assert tasks.gold_reward(word_prompt, "London is not it") == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_two_steps_on_cuda(tmp_path, amp):
    """The tiny run on the GPU: fused head backend (auto), optional bf16 autocast."""
    trainer = make_trainer(tmp_path, "r2m", device="cuda", amp=amp)
    head0 = snapshot(trainer.rm.head)
    history = trainer.train()
    assert all(m[k] is not None and m[k] == m[k] for m in history for k in ("proxy_reward", "kl", "r2m_loss"))
    assert changed(head0, trainer.rm.head)


def test_reward_model_with_its_own_tokenizer(tmp_path):
    """An RM whose tokenizer (here: its chat template) differs from the policy's scores the
    decoded text re-tokenized its own way."""
    from r2m import R2MRewardModel
    from r2m.demo.tiny import tiny_reward_backbone, tiny_tokenizer

    policy, tok, _, prompts, judge = tiny_setup(seed=0)
    rm_tok = tiny_tokenizer(chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    backbone, score = tiny_reward_backbone(rm_tok)
    rm = R2MRewardModel(backbone, score, policy.config.hidden_size, tokenizer=rm_tok, attn_dim=16)
    config = R2MConfig(steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, attn_dim=16,
                       output_dir=str(tmp_path), progress=False)
    R2MTrainer(config, policy, tok, rm, prompts, judge=judge).train_step()
    texts = [rm_tok.decode(list(key)) for key in rm._rte_cache]
    assert texts and all(any(t.startswith(f"[{p}][") for p in prompts) and t.endswith("]") for t in texts)
