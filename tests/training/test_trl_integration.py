"""R2MGRPOTrainer and R2MRLOOTrainer on tiny random Llamas, CPU, a few steps each: the head is
updated every generation batch, the hidden states are the policy's, step 0 is the RM's reward,
the RM backbone never changes, the ablation modes, checkpoints and resume."""

import pytest
import torch

pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from r2m import R2MConfig  # noqa: E402
from r2m.config import MODES  # noqa: E402
from r2m.ablations import noise_like  # noqa: E402

from tests.support.trl_tiny import make_trainer, metrics, save_tiny_models, snapshot  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("tiny_models"))


class Recorder:
    """Spies on a trainer: each scoring (ids, mask, hidden states, R2M and RM rewards), each head
    update's inputs, the head after each optimizer step, and the policy after each of TRL's
    optimizer steps."""

    def __init__(self, trainer):
        self.trainer, self.scorings, self.updates, self.heads, self.policies = trainer, [], [], [], []
        update, rm = trainer.head_update, trainer.reward_model
        rewards, step, rm_inputs = update.rewards, update.step, rm.rm_inputs
        policy_ids = []

        def record_rm_inputs(*args, input_ids, **kwargs):  # the policy's token ids of the batch being scored
            policy_ids.append(input_ids)
            return rm_inputs(*args, input_ids=input_ids, **kwargs)

        def record_rewards(rte, hidden, mask, omega):
            out = rewards(rte, hidden, mask, omega)
            self.scorings.append(dict(ids=policy_ids.pop().clone(), mask=mask.clone(), rte=rte.clone(),
                                      hidden=None if hidden is None else hidden.clone(), omega=omega, rewards=out,
                                      rm_rewards=trainer.reward_model.static_reward(rte)))
            return out

        def record_step(rte, hidden, mask, omega, group_size):
            self.updates.append(dict(hidden=None if hidden is None else hidden.clone(), mask=mask.clone(), omega=omega,
                                     group_size=group_size))
            return step(rte, hidden, mask, omega, group_size)

        update.rewards, update.step, rm.rm_inputs = record_rewards, record_step, record_rm_inputs
        update.optimizer.register_step_post_hook(lambda *a: self.heads.append(snapshot(trainer.reward_model.head)))
        recorder = self

        class KeepPolicy(TrainerCallback):
            def on_optimizer_step(self, args, state, control, **kwargs):
                recorder.policies.append(snapshot(trainer.model))

        trainer.add_callback(KeepPolicy())


def fresh_hidden(policy_state, trainer, ids, mask):
    """The policy's last-layer hidden states from a plain backbone forward, weights `policy_state`."""
    import copy

    model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
    model.load_state_dict(policy_state)
    with torch.no_grad():
        return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


def check_common(trainer, rm, recorder, frozen_before, steps, updates):
    """What every r2m-mode run must show: step-0 reward = RM reward bitwise, the step-0 hidden
    states = a fresh forward of the initial policy, one head step per generation batch (each
    changing the head), the frozen RM untouched, R2M's metrics in TRL's log history."""
    first = recorder.scorings[0]
    assert first["omega"] == 1.0 and torch.equal(first["rewards"], first["rm_rewards"])
    valid = first["mask"].bool()
    expected = fresh_hidden(recorder.initial_policy, trainer, first["ids"], first["mask"])
    torch.testing.assert_close(first["hidden"][valid], expected[valid], rtol=0, atol=0)
    assert len(recorder.updates) == len(recorder.heads) == updates
    heads = [recorder.head0] + recorder.heads
    assert all(any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(heads, heads[1:]))
    for name, value in rm.backbone.state_dict().items():
        assert torch.equal(value, frozen_before[0][name]), name
    assert all(p.grad is None for p in rm.backbone.parameters())
    assert torch.equal(rm.score_head.weight, frozen_before[1]["weight"])
    logged = metrics(trainer.state.log_history)
    assert [row["step"] for row in logged] == list(range(1, steps + 1))
    keys = set().union(*trainer.state.log_history)
    assert {"r2m/grebt_loss", "r2m/omega", "r2m/update_ms", "r2m/rm_reward", "r2m/gold_reward",
            "rewards/r2m/mean"} <= keys
    return logged


def run(models, tmp_path, kind, mode="r2m", **overrides):
    trainer, rm = make_trainer(models, kind, tmp_path / "out", mode=mode, **overrides)
    recorder = Recorder(trainer)
    recorder.initial_policy = snapshot(trainer.model)
    recorder.head0 = snapshot(rm.head)
    frozen = snapshot(rm.backbone), snapshot(rm.score_head)
    trainer.train()
    return trainer, rm, recorder, frozen


def test_grpo_defaults_one_extra_forward_per_batch(models, tmp_path):
    """GRPO's defaults (beta = 0, one iteration) make no pi_old pass: one extra no-grad forward
    per generation batch gives the hidden states, and the count is logged."""
    trainer, rm, recorder, frozen = run(models, tmp_path, "grpo")
    logged = check_common(trainer, rm, recorder, frozen, steps=3, updates=3)
    assert [row["r2m/extra_forwards"] for row in logged] == [1.0, 2.0, 3.0]
    assert [u["omega"] for u in recorder.updates] == [1.0, 0.75, 0.6]  # cosine over T = 3, floor 0.6
    assert [row["r2m/omega"] for row in logged] == pytest.approx([1.0, 0.75, 0.6])  # logged as fp32
    assert all(u["group_size"] == 4 for u in recorder.updates)


def test_grpo_two_iterations_refreshes_hidden_states(models, tmp_path):
    """num_iterations = 2: TRL's own pi_old pass gives the scoring's hidden states (no extra
    forward), and the head update after the second iteration gets the hidden states of that
    iteration's training forward: the policy after the first optimizer step, not pi_old."""
    trainer, rm, recorder, frozen = run(models, tmp_path, "grpo", num_iterations=2, max_steps=4)
    logged = check_common(trainer, rm, recorder, frozen, steps=4, updates=2)
    assert all(row.get("r2m/extra_forwards", 0.0) == 0.0 for row in logged)
    assert len(recorder.scorings) == 2 and len(recorder.policies) == 4
    first, update = recorder.scorings[0], recorder.updates[0]
    valid = first["mask"].bool()
    assert torch.equal(update["mask"], first["mask"])
    after_one_step = fresh_hidden(recorder.policies[0], trainer, first["ids"], first["mask"])[valid]
    torch.testing.assert_close(update["hidden"][valid], after_one_step, rtol=1e-5, atol=1e-5)
    pi_old = first["hidden"][valid]
    assert (after_one_step - pi_old).abs().max() > 1e-3  # the check above tells the two apart


def test_rloo_three_steps(models, tmp_path):
    """RLOO (KL in the reward: a reference model loaded from the policy's folder) always makes
    the pi_old pass; the hidden states come from it."""
    trainer, rm, recorder, frozen = run(models, tmp_path, "rloo")
    logged = check_common(trainer, rm, recorder, frozen, steps=3, updates=3)
    assert all(row["r2m/extra_forwards"] == 0.0 for row in logged)
    assert trainer.ref_model is not None and "kl" in logged[0]
    # the head's share of the within-group reward spread: none at omega = 1, some once omega < 1
    assert logged[0]["r2m/head_share"] == 0.0 and 0 < logged[2]["r2m/head_share"] < 1


@pytest.mark.parametrize("mode", [m for m in MODES if m != "r2m"])
def test_ablation_modes(models, tmp_path, mode):
    trainer, rm, recorder, frozen = run(models, tmp_path, "grpo", mode=mode, max_steps=2)
    logged = metrics(trainer.state.log_history)
    head_changed = any(not torch.equal(v, recorder.head0[k]) for k, v in rm.head.state_dict().items())
    assert head_changed == (mode not in ("static", "r2m-frozen"))
    assert all(torch.equal(s["rewards"], s["rm_rewards"]) for s in recorder.scorings[:1])
    if mode == "static":
        assert all(torch.equal(s["rewards"], s["rm_rewards"]) for s in recorder.scorings)
        assert all(s["hidden"] is None for s in recorder.scorings) and not recorder.updates
        assert all(row["r2m/extra_forwards"] == 0.0 and "r2m/grebt_loss" not in row for row in logged)
    else:
        assert len(recorder.updates) == 2 and all("r2m/grebt_loss" in row for row in logged)
        assert not torch.equal(recorder.scorings[1]["rewards"], recorder.scorings[1]["rm_rewards"])
    assert trainer.head_update.loss.alpha == {"bt-only": 0.0, "gre-only": 1.0}.get(mode, 0.3)


def test_noise_mode_feeds_the_head_noise(models, tmp_path, monkeypatch):
    trainer, rm = make_trainer(models, "grpo", tmp_path / "out", mode="noise", max_steps=1)
    seen = []
    forward = rm.head.forward
    monkeypatch.setattr(rm.head, "forward", lambda rte, hidden, **kw: (seen.append(hidden), forward(rte, hidden, **kw))[1])
    recorder = Recorder(trainer)
    trainer.train()
    update = recorder.updates[0]
    valid = update["mask"].bool()
    assert len(seen) == 2  # the scoring and the update
    for hidden in seen:
        assert (hidden[valid] - update["hidden"][valid]).abs().mean() > 0.5 * update["hidden"][valid].std(0).mean()


def test_noise_like_matches_each_features_statistics():
    """noise_like: fresh Gaussian noise whose per-feature mean and std are those of the hidden
    states over valid positions (padding, filled with outliers here, is ignored)."""
    batch, seq, dim = 64, 48, 24
    mean, std = torch.linspace(-3, 3, dim), torch.linspace(0.5, 4, dim)
    hidden = torch.randn(batch, seq, dim) * std + mean
    lengths = torch.randint(seq // 3, seq + 1, (batch,))
    mask = (torch.arange(seq) >= seq - lengths[:, None]).long()  # left padding
    hidden[mask == 0] = 1e3
    noise = noise_like(hidden, mask)
    assert noise.shape == hidden.shape and noise.dtype == hidden.dtype
    valid = mask.bool()
    want, got = hidden[valid], noise[valid]
    n = got.shape[0]
    assert n > 1000
    # within 5 standard errors, per feature (a pooled mean/std, or padding included, is off by far more)
    assert ((got.mean(0) - want.mean(0)).abs() < 5 * want.std(0) / n ** 0.5).all()
    assert ((got.std(0) / want.std(0) - 1).abs() < 5 / (2 * n) ** 0.5).all()
    assert (got - want).abs().mean() > 0.5 * want.std(0).mean()


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class FilesOnSave(TrainerCallback):
    """The files in each checkpoint folder when on_save reaches this callback."""

    def __init__(self):
        self.names = []

    def on_save(self, args, state, control, **kwargs):
        from pathlib import Path

        self.names.append({p.name for p in (Path(args.output_dir) / f"checkpoint-{state.global_step}").iterdir()})


def test_resume_continues_exactly(models, tmp_path):
    """A run stopped after its checkpoint at step 2 and resumed from it logs the metrics of the
    uninterrupted run at steps 3 and 4 and ends with the same head; resuming in another mode or
    with another schedule length is refused."""
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    straight, straight_rm = make_trainer(models, "grpo", tmp_path / "a", **settings)
    straight.train()
    stopped, _ = make_trainer(models, "grpo", tmp_path / "b", **settings)
    on_save = FilesOnSave()
    stopped.add_callback(StopAfter(2))
    stopped.add_callback(on_save)
    stopped.train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert {"r2m_head.safetensors", "r2m_state.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert {"r2m_head.safetensors", "r2m_state.pt"} <= on_save.names[0]  # other callbacks see it complete
    resumed, resumed_rm = make_trainer(models, "grpo", tmp_path / "b", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    want, got = metrics(straight.state.log_history), metrics(resumed.state.log_history)
    assert [row["step"] for row in got] == [1, 2, 3, 4]
    assert want[2]["r2m/grebt_loss"] != want[1]["r2m/grebt_loss"]  # step 3 is not a replay of step 2
    assert got == want
    for name, value in straight_rm.head.state_dict().items():
        assert torch.equal(resumed_rm.head.state_dict()[name], value), name

    other_mode, _ = make_trainer(models, "grpo", tmp_path / "c", mode="gre-only", **settings)
    with pytest.raises(ValueError, match="mode 'r2m'; this run is 'gre-only'"):
        other_mode.train(resume_from_checkpoint=str(checkpoint))
    longer, _ = make_trainer(models, "grpo", tmp_path / "d", **dict(settings, max_steps=6))
    with pytest.raises(ValueError, match="max_steps=4 .* max_steps=6"):
        longer.train(resume_from_checkpoint=str(checkpoint))


def test_the_pi_old_pass_is_the_first_policy_forward_after_generation(models, tmp_path):
    """The scoring takes TRL's first policy forward after generation for its pi_old pass, unless
    that forward is the only one and TRL makes its reference pass with the policy (a PEFT
    policy: beta != 0, no ref_model); then it makes its own no-grad forward."""
    from r2m.integrations.trl.trainers import _Generation, _PolicyForward

    from tests.support.trl_tiny import POLICY_DIM

    trainer, _ = make_trainer(models, "grpo", tmp_path)
    ids = torch.ones(2, 3, dtype=torch.long)
    seen = _PolicyForward(ids, torch.ones_like(ids), torch.zeros(2, 3, POLICY_DIM))
    generation = _Generation([[5, 6], [7]], [[8], [9, 10]], [seen])
    assert trainer._r2m_policy_states(generation) is seen and trainer._r2m_extra_forwards == 0
    trainer.args.beta, trainer.ref_model = 0.1, None
    own = trainer._r2m_policy_states(generation)
    assert own.hidden.shape == (2, 4, POLICY_DIM) and trainer._r2m_extra_forwards == 1
    generation.policy_forwards.append(None)  # a second policy forward: the first was pi_old's
    assert trainer._r2m_policy_states(generation) is seen


def test_checkpoints_must_fall_between_generation_batches(models, tmp_path):
    with pytest.raises(ValueError, match="save_steps \\(3\\) must be a multiple of .* \\(2 = "):
        make_trainer(models, "grpo", tmp_path, num_iterations=2, save_strategy="steps", save_steps=3)


def test_reward_model_must_read_the_policys_hidden_size(models, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from r2m import R2MRewardModel
    from r2m.integrations.trl import R2MGRPOTrainer

    from tests.support.trl_tiny import trl_config

    rm = R2MRewardModel.from_sequence_classifier(
        AutoModelForSequenceClassification.from_pretrained(models / "rm", num_labels=1), 40, attn_dim=8)
    with pytest.raises(ValueError, match="hidden states of size 40; the policy's hidden size is 32"):
        R2MGRPOTrainer(str(models / "policy"), rm, args=trl_config("grpo", tmp_path),
                       train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}))


def test_the_trainer_sets_the_r2m_configs_head_settings_on_the_head(models, tmp_path):
    """omega_floor and head_backend reach the head once, from R2MConfig through the trainer, and
    are read from the head: the schedule's floor, the GREBT loss's backend."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from r2m import R2MRewardModel
    from r2m.integrations.trl import R2MGRPOTrainer

    from tests.support.trl_tiny import POLICY_DIM, trl_config

    rm = R2MRewardModel.from_sequence_classifier(
        AutoModelForSequenceClassification.from_pretrained(models / "rm", num_labels=1), POLICY_DIM, attn_dim=8,
        omega_floor=0.9, backend="torch")
    trainer = R2MGRPOTrainer(str(models / "policy"), rm, args=trl_config("grpo", tmp_path),
                             r2m_config=R2MConfig(omega_floor=0.45, head_backend="eager"),
                             train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}))
    assert (rm.head.omega_floor, rm.head.backend, trainer.head_update.loss.backend) == (0.45, "eager", "auto")
    trainer.state.global_step, trainer.state.max_steps = 3, 3
    assert trainer._r2m_omega() == 0.45
    with pytest.raises(ValueError, match="omega_floor"):
        rm.head.omega_floor = 1.5


def test_a_head_backend_that_cannot_run_fails_in_the_constructor(models, tmp_path):
    """A head backend this device cannot run fails before any training, naming the setting."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from r2m import R2MRewardModel
    from r2m.integrations.trl import R2MGRPOTrainer
    from r2m_kernels import BackendUnavailableError

    from tests.support.trl_tiny import POLICY_DIM, trl_config

    rm = R2MRewardModel.from_sequence_classifier(
        AutoModelForSequenceClassification.from_pretrained(models / "rm", num_labels=1), POLICY_DIM, attn_dim=8)
    with pytest.raises(BackendUnavailableError, match="head_backend='cuda' cannot run on cpu"):
        R2MGRPOTrainer(str(models / "policy"), rm, args=trl_config("grpo", tmp_path),
                       r2m_config=R2MConfig(head_backend="cuda"), train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}))


@pytest.mark.parametrize("values, field_name", [
    (dict(mode="gold"), "mode"), (dict(attn_dim=0), "attn_dim"), (dict(num_heads=1.5), "num_heads"),
    (dict(head_learning_rate=0.0), "head_learning_rate"), (dict(head_learning_rate=float("inf")), "head_learning_rate"),
    (dict(omega_floor=float("nan")), "omega_floor"), (dict(omega_floor=1.5), "omega_floor"),
    (dict(grebt_alpha=-0.1), "grebt_alpha"), (dict(head_backend="fast"), "head_backend"),
    (dict(attn_dim=10, num_heads=3), "attn_dim"),
])
def test_r2m_config_names_the_bad_field(values, field_name):
    with pytest.raises(ValueError, match=f"^{field_name}"):
        R2MConfig(**values)
    assert R2MConfig(mode="bt-only").alpha == 0.0 and R2MConfig(mode="gre-only").alpha == 1.0
    assert R2MConfig(grebt_alpha=0.45).alpha == 0.45


@pytest.mark.parametrize("mode", ["r2m", "iterative-head"])
def test_the_head_learning_rate_bound_is_where_adamw_overflows(mode):
    """head_learning_rate up to HEAD_LEARNING_RATE_MAX: the head's AdamW takes its first step
    (whose size is 10x the rate); above it torch itself raises converting that step to float32,
    so R2MConfig refuses it, naming the field and the reason."""
    from r2m import R2MRewardModel
    from r2m.config import HEAD_LEARNING_RATE_MAX
    from r2m.experiment.tiny import tiny_reward_backbone, tiny_tokenizer
    from r2m.head_update import HeadUpdate

    def first_step(rate):
        update = HeadUpdate(R2MRewardModel(*tiny_reward_backbone(tiny_tokenizer()), 16, attn_dim=8),
                            R2MConfig(mode=mode, head_learning_rate=HEAD_LEARNING_RATE_MAX))
        update.optimizer.param_groups[0]["lr"] = rate  # past R2MConfig's check
        for p in update.optimizer.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        update.optimizer.step()

    first_step(HEAD_LEARNING_RATE_MAX)
    above = HEAD_LEARNING_RATE_MAX * (1 + 1e-15)
    with pytest.raises(RuntimeError, match="overflow"):
        first_step(above)
    with pytest.raises(ValueError, match=r"^head_learning_rate must be <= 3.403e\+37: .*10x the rate.*float32"):
        R2MConfig(mode=mode, head_learning_rate=above)


def test_evaluation_between_iterations_keeps_the_pending_update(models, tmp_path):
    """An evaluation after the first of two iterations scores with the R2M reward (logged with
    TRL's eval_ prefix) and leaves the training batch's head step in place."""
    trainer, rm = make_trainer(models, "grpo", tmp_path / "out", num_iterations=2, max_steps=2, eval_prompts=2,
                               eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8)
    recorder = Recorder(trainer)
    trainer.train()
    evals = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert len(evals) == 2 and all("eval_r2m/rm_reward" in row and "eval_rewards/r2m/mean" in row for row in evals)
    assert len(recorder.updates) == 1 and len(recorder.scorings) == 3  # one training batch, two evaluations
    assert recorder.updates[0]["hidden"].shape[0] == 8


def test_iterative_head_trains_only_the_score_head(models, tmp_path):
    """The paper's Iterative RMHead baseline: no hidden states are taken, the reward is the
    head's score phi on the RTE alone, and the GREBT step on those rewards moves phi only."""
    import torch.nn.functional as F

    from r2m import GREBTLoss

    trainer, rm, recorder, frozen = run(models, tmp_path, "grpo", mode="iterative-head", max_steps=2)
    logged = metrics(trainer.state.log_history)
    assert all(s["hidden"] is None for s in recorder.scorings) and all(u["hidden"] is None for u in recorder.updates)
    assert all(row["r2m/extra_forwards"] == 0.0 and "r2m/head_share" not in row for row in logged)
    head = rm.head.state_dict()
    for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"):
        assert torch.equal(head[name], recorder.head0[name]), name
    assert not torch.equal(head["score.weight"], recorder.head0["score.weight"])
    first, second = recorder.scorings
    assert torch.equal(first["rewards"], first["rm_rewards"])  # phi starts as the RM's score head
    after_one = recorder.heads[0]
    expected = F.linear(second["rte"], after_one["score.weight"], after_one["score.bias"]).squeeze(-1)
    torch.testing.assert_close(second["rewards"], expected)
    want_loss = GREBTLoss(alpha=0.3)(first["rm_rewards"], group_size=4).item()
    assert logged[0]["r2m/grebt_loss"] == pytest.approx(want_loss, rel=1e-5)
