"""R2MTrainer on a tiny random-weight Llama (no download): every mode, what is frozen, what the
head sees, config mapping, checkpoint/resume."""

import argparse
import copy
import json
import math
import shutil

import pytest
import torch

from r2m import R2MConfig, R2MTrainer
from r2m.config import MODES
from r2m.head import HEAD_BACKENDS
from r2m.trainer import policy_token_loss
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
    seen, rollouts = record_head_inputs(trainer, monkeypatch)
    trainer.train_step()

    rollout = rollouts[0]
    expected = real_hidden(policy_before, rollout)
    assert len(seen) == 2
    valid = rollout.attention_mask.bool()
    for hidden, mask in seen:
        assert not hidden.requires_grad
        assert torch.equal(mask, rollout.attention_mask)
        torch.testing.assert_close(hidden[valid], expected[valid], rtol=1e-5, atol=1e-5)


def real_hidden(policy, rollout):
    """The policy's last-layer hidden states of a rollout, from a plain forward."""
    with torch.no_grad():
        return policy(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                      position_ids=position_ids_from_mask(rollout.attention_mask),
                      output_hidden_states=True).hidden_states[-1]


def record_head_inputs(trainer, monkeypatch):
    """Lists filled by the next train_step: (hidden, mask) of every head call, and the rollouts."""
    seen, rollouts = [], []
    head_forward, generate = trainer.rm.head.forward, trainer.generate
    monkeypatch.setattr(trainer.rm.head, "forward", lambda rte, hidden, **kw: (
        seen.append((hidden, kw["mask"])), head_forward(rte, hidden, **kw))[1])
    monkeypatch.setattr(trainer, "generate", lambda idx: rollouts.append(generate(idx)) or rollouts[-1])
    return seen, rollouts


def test_r2m_update_sees_the_last_epochs_hidden_states(tmp_path, monkeypatch):
    """With two epochs the R2M update gets the hidden states of the second epoch's forward: the
    policy after the first epoch's optimizer step and before the second's, not pi_old's."""
    trainer = make_trainer(tmp_path, "r2m", policy_epochs=2)
    policy_before = copy.deepcopy(trainer.policy)
    after_steps = []
    optimizer_step = trainer.policy_optimizer.step
    monkeypatch.setattr(trainer.policy_optimizer, "step", lambda *a, **kw: (
        optimizer_step(*a, **kw), after_steps.append(copy.deepcopy(trainer.policy)))[0])
    seen, rollouts = record_head_inputs(trainer, monkeypatch)
    trainer.train_step()

    assert len(after_steps) == 2 and len(seen) == 2
    valid = rollouts[0].attention_mask.bool()
    pi_old, after_first, after_second = (real_hidden(p, rollouts[0])[valid]
                                         for p in (policy_before, after_steps[0], after_steps[1]))
    scoring, update = seen[0][0][valid], seen[1][0][valid]
    torch.testing.assert_close(scoring, pi_old, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(update, after_first, rtol=1e-5, atol=1e-5)
    assert not update.requires_grad
    # the three policies' states differ by far more than the tolerance, so the checks above discriminate
    assert (after_first - pi_old).abs().max() > 1e-3 and (after_second - after_first).abs().max() > 1e-3


def test_head_input_noise_matches_each_features_statistics(tmp_path):
    """noise mode's head input: fresh Gaussian noise whose per-feature mean and std are those of
    the hidden states over valid positions (padding, filled with outliers here, is ignored)."""
    trainer = make_trainer(tmp_path, "noise")
    batch, seq, dim = 64, 48, 24
    mean, std = torch.linspace(-3, 3, dim), torch.linspace(0.5, 4, dim)
    hidden = torch.randn(batch, seq, dim) * std + mean
    lengths = torch.randint(seq // 3, seq + 1, (batch,))
    mask = (torch.arange(seq) >= seq - lengths[:, None]).long()  # left padding
    hidden[mask == 0] = 1e3
    noise = trainer.head_input(hidden, mask)

    assert noise.shape == hidden.shape and noise.dtype == hidden.dtype
    valid = mask.bool()
    want, got = hidden[valid], noise[valid]
    n = got.shape[0]
    assert n > 1000
    # within 5 standard errors, per feature (a pooled mean/std, or padding included, is off by far more)
    assert ((got.mean(0) - want.mean(0)).abs() < 5 * want.std(0) / n ** 0.5).all()
    assert ((got.std(0) / want.std(0) - 1).abs() < 5 / (2 * n) ** 0.5).all()
    assert (got - want).abs().mean() > 0.5 * want.std(0).mean()  # noise, not the hidden states
    assert trainer.head_input(hidden, mask) is not hidden
    assert make_trainer(tmp_path, "r2m").head_input(hidden, mask) is hidden


def test_noise_mode_feeds_noise_to_the_r2m_update(tmp_path, monkeypatch):
    """In noise mode the head's R2M update gets noise, not the hidden states, with the hidden
    states' per-feature mean and std over valid positions."""
    trainer = make_trainer(tmp_path, "noise")
    policy_before = copy.deepcopy(trainer.policy)
    seen, rollouts = record_head_inputs(trainer, monkeypatch)
    trainer.train_step()

    assert len(seen) == 2
    valid = rollouts[0].attention_mask.bool()
    want, got = real_hidden(policy_before, rollouts[0])[valid], seen[1][0][valid]
    n = got.shape[0]
    assert (got - want).abs().mean() > 0.5 * want.std(0).mean()
    assert ((got.mean(0) - want.mean(0)).abs() < 6 * want.std(0) / n ** 0.5).all()
    assert ((got.std(0) / want.std(0) - 1).abs() < 6 / (2 * n) ** 0.5).all()


@pytest.mark.parametrize("mode, alpha", [("bt-only", 0.0), ("gre-only", 1.0), ("r2m", 0.45), ("noise", 0.45)])
def test_grebt_alpha_follows_the_mode(tmp_path, mode, alpha):
    trainer = make_trainer(tmp_path, mode, alpha=0.45)
    assert trainer.grebt.alpha == alpha


def test_policy_token_loss_is_clipped_surrogate_plus_k3(tmp_path):
    """policy_token_loss and its gradient against the case-by-case PPO formulas in float64:
    A >= 0: -A min(r, 1 + eps); A < 0: -A max(r, 1 - eps) (gradient 0 where clipped), plus
    kl_coef (exp(d) - d - 1), d = log pi_ref - log pi, gradient kl_coef (1 - exp(d))."""
    batch, length, eps, kl_coef = 6, 11, 0.2, 0.07
    old = torch.randn(batch, length, dtype=torch.float64)
    log_ratio = torch.linspace(-0.9, 0.9, length, dtype=torch.float64) + 0.01 * torch.randn(batch, length,
                                                                                            dtype=torch.float64)
    logp = (old + log_ratio).requires_grad_(True)
    ref = old + 0.5 * torch.randn(batch, length, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0] * (batch // 2), dtype=torch.float64) * (torch.rand(batch, dtype=torch.float64) + 0.5)
    mask = (torch.rand(batch, length) > 0.2).double()
    loss = policy_token_loss(logp, old, ref, adv, mask, eps, kl_coef)
    loss.sum().backward()

    want, want_grad, cases = torch.zeros_like(old), torch.zeros_like(old), set()
    for i in range(batch):
        a = adv[i].item()
        for t in range(length):
            r, d = math.exp(log_ratio[i, t].item()), ref[i, t].item() - logp[i, t].item()
            clipped = r > 1 + eps if a >= 0 else r < 1 - eps
            surrogate = a * (min(r, 1 + eps) if a >= 0 else max(r, 1 - eps))
            want[i, t] = (kl_coef * (math.exp(d) - d - 1) - surrogate) * mask[i, t].item()
            want_grad[i, t] = (kl_coef * (1 - math.exp(d)) - (0.0 if clipped else a * r)) * mask[i, t].item()
            cases.add((a >= 0, clipped))
    assert cases == {(True, True), (True, False), (False, True), (False, False)}
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad, want_grad, rtol=1e-12, atol=1e-12)


def test_policy_loss_at_step_zero_is_minus_the_token_weighted_advantage(tmp_path, monkeypatch):
    """At step 0 the policy is pi_old and the reference (ratio 1, KL 0), so the reported loss is
    -sum_i A_i n_i / sum_i n_i (n_i: response tokens of row i): catches a flipped surrogate sign
    and a per-sequence or per-micro-batch normalisation. Response lengths are varied on purpose
    (with equal lengths RLOO advantages sum to 0 and so would the loss)."""
    trainer = make_trainer(tmp_path, "r2m", micro_batch_size=4)
    rewards_seen, rollouts = [], []
    advantages, generate = trainer.advantages, trainer.generate

    def generate_with_varied_lengths(indices):
        rollout = generate(indices)
        width = rollout.response_mask.shape[1]
        keep = (torch.arange(width) < 1 + torch.arange(len(rollout.prompts))[:, None] % width).long()
        rollout.response_mask = rollout.response_mask * keep
        rollout.attention_mask[:, -width:] = rollout.response_mask
        rollouts.append(rollout)
        return rollout

    monkeypatch.setattr(trainer, "generate", generate_with_varied_lengths)
    monkeypatch.setattr(trainer, "advantages", lambda r: (rewards_seen.append(r), advantages(r))[1])
    metrics = trainer.train_step()

    n_tokens = rollouts[0].response_mask.sum(-1).double()
    adv = trainer.advantages(rewards_seen[0]).double()
    expected = -(adv * n_tokens).sum() / n_tokens.sum()
    assert len(set(n_tokens.tolist())) > 1 and abs(expected.item()) > 1e-3
    assert metrics["policy_loss"] == pytest.approx(expected.item(), abs=1e-5)


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


def test_checkpoint_survives_an_interrupted_save(tmp_path, monkeypatch):
    """A crash between moving the checkpoint to checkpoint.old and moving checkpoint.tmp in
    leaves only checkpoint.old: loading falls back to it, and the next save works; a crash
    after the swap but before checkpoint.old is deleted does not break the next save."""
    trainer = make_trainer(tmp_path)
    folder = trainer.output_dir / "checkpoint"
    trainer.step = 1
    trainer.save_checkpoint()
    trainer.step = 2
    rename = type(folder).rename
    with monkeypatch.context() as m:
        m.setattr(type(folder), "rename", lambda self, target: (
            1 / 0 if self.name.endswith(".tmp") else rename(self, target)))
        with pytest.raises(ZeroDivisionError):
            trainer.save_checkpoint()
    assert not folder.exists() and (tmp_path / "r2m" / "checkpoint.old").is_dir()

    resumed = make_trainer(tmp_path)
    with pytest.warns(UserWarning, match="checkpoint.old"):
        resumed.load_checkpoint()
    assert resumed.step == 1
    resumed.save_checkpoint()
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]

    # the crash after the swap: a whole checkpoint.old is left beside the new checkpoint
    shutil.copytree(folder, folder.with_name("checkpoint.old"))
    resumed.step = 3
    resumed.save_checkpoint()
    assert not folder.with_name("checkpoint.old").exists()
    fresh = make_trainer(tmp_path)
    fresh.load_checkpoint()
    assert fresh.step == 3

    # an incomplete checkpoint with a whole checkpoint.old loads the latter; neither whole is an error
    shutil.copytree(folder, folder.with_name("checkpoint.old"))
    (folder / "trainer_state.pt").unlink()
    with pytest.warns(UserWarning, match="incomplete"):
        make_trainer(tmp_path).load_checkpoint()
    (folder.with_name("checkpoint.old") / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        make_trainer(tmp_path).load_checkpoint()


@pytest.mark.parametrize("field_name, value", [
    ("clip_eps", 0.0), ("clip_eps", -0.1), ("kl_coef", -1e-3), ("policy_lr", 0.0), ("policy_lr", float("nan")),
    ("head_lr", -1e-4), ("max_grad_norm", -1.0), ("save_every", -1), ("micro_batch_size", 0),
    ("train_last_layers", 0), ("head_backend", "fast"), ("device", "gpu"), ("device", "cuda:"),
    ("device", "cuda:x"), ("device", "cpu:0"), ("amp", "fp16"), ("amp", "fp32"), ("temperature", 0.0),
    ("attn_dim", 0), ("num_heads", 0), ("alpha", 1.5), ("omega_floor", -0.1), ("mode", "gold"),
])
def test_config_rejects_out_of_range_values(field_name, value):
    with pytest.raises(ValueError, match=f"^{field_name}"):
        R2MConfig(**{field_name: value})


def test_config_range_edges_and_messages():
    accepted = [dict(kl_coef=0.0, max_grad_norm=0.0, save_every=0, micro_batch_size=None, train_last_layers=None),
                dict(micro_batch_size=1, train_last_layers=1, device="cuda:1", attn_dim=12, num_heads=3),
                dict(device="cuda", amp="bf16")]
    accepted += [dict(head_backend=backend) for backend in HEAD_BACKENDS]
    for values in accepted:
        assert R2MConfig(**values).validate() is None
    assert set(HEAD_BACKENDS) == {"auto", "eager", "torch", "triton", "cuda"}
    with pytest.raises(ValueError, match="^attn_dim .*num_heads"):
        R2MConfig(attn_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="GradScaler.*bf16"):
        R2MConfig(amp="fp16")
    with pytest.raises(ValueError, match="^samples_per_prompt .*rloo"):
        R2MConfig(samples_per_prompt=1)
    config = R2MConfig()
    config.clip_eps = -1.0  # a dataclass is mutable: validate() re-checks
    with pytest.raises(ValueError, match="^clip_eps"):
        config.validate()


def test_demo_defaults_follow_the_device_of_the_yaml_file(tmp_path):
    """`r2m train` without --policy: the demo settings are chosen for the device the run will
    use, the YAML file's unless a flag overrides it; the file, then the flags, still win."""
    from r2m import train_cli
    from r2m.demo.run import DEMO_CPU, DEMO_CUDA

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    path = tmp_path / "run.yaml"
    path.write_text("device: cuda\nsteps: 3\n")
    assert DEMO_CUDA["prompts_per_step"] != DEMO_CPU["prompts_per_step"] != R2MConfig().prompts_per_step

    config = train_cli.build_config(parser.parse_args(["--config", str(path), "--max-new-tokens", "7"]))
    assert (config.device, config.steps, config.max_new_tokens) == ("cuda", 3, 7)
    assert (config.prompts_per_step, config.amp) == (DEMO_CUDA["prompts_per_step"], DEMO_CUDA["amp"])

    config = train_cli.build_config(parser.parse_args(["--config", str(path), "--device", "cpu"]))
    assert (config.device, config.steps, config.prompts_per_step) == ("cpu", 3, DEMO_CPU["prompts_per_step"])
    assert config.amp == DEMO_CPU.get("amp", R2MConfig().amp)

    path.write_text("device: cuda:1\n")
    config = train_cli.build_config(parser.parse_args(["--config", str(path)]))
    assert (config.device, config.prompts_per_step) == ("cuda:1", DEMO_CUDA["prompts_per_step"])

    config = train_cli.build_config(parser.parse_args(["--config", str(path), "--policy", "somewhere"]))
    assert (config.device, config.prompts_per_step) == ("cuda:1", R2MConfig().prompts_per_step)
