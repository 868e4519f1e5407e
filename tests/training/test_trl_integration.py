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


def test_every_step_row_has_its_batchs_r2m_metrics(models, tmp_path):
    """num_iterations = 2: each generation batch serves two optimizer steps, and both steps' log
    rows carry its R2M metrics (TRL logs its own reward metrics on the first only); the head
    update's, on the row of the step it follows."""
    trainer, rm, recorder, frozen = run(models, tmp_path, "grpo", num_iterations=2, max_steps=4)
    logged = metrics(trainer.state.log_history)
    assert [row["step"] for row in logged] == [1, 2, 3, 4] and len(recorder.scorings) == 2
    batch_keys = ("r2m/rm_reward", "r2m/omega", "r2m/gold_reward", "r2m/extra_forwards",
                  "r2m/head_share")
    for row, scoring in zip(logged, [s for s in recorder.scorings for _ in range(2)]):
        assert all(key in row for key in batch_keys), row
        assert row["r2m/omega"] == pytest.approx(scoring["omega"])
        assert row["r2m/rm_reward"] == pytest.approx(scoring["rm_rewards"].mean().item())
    assert [("reward" in row, "r2m/grebt_loss" in row) for row in logged] == [(True, False), (False, True)] * 2


def test_counts_are_logged_as_counts(models, tmp_path):
    """With a log row every 2 steps, `r2m/extra_forwards` is the count of extra forwards so far
    (2, then 4), not the mean of the running count over the window; the batch metrics are the
    mean over the window's steps."""
    trainer, rm, recorder, frozen = run(models, tmp_path, "grpo", max_steps=4, logging_steps=2)
    logged = metrics(trainer.state.log_history)
    assert [row["step"] for row in logged] == [2, 4]
    assert [row["r2m/extra_forwards"] for row in logged] == [2.0, 4.0]
    omegas = [s["omega"] for s in recorder.scorings]
    assert [row["r2m/omega"] for row in logged] == pytest.approx([sum(omegas[:2]) / 2, sum(omegas[2:]) / 2])


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
    uninterrupted run at steps 3 and 4 and ends with the same head; resuming in another mode,
    with the head attending to something else or with another schedule length is refused."""
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
    completion_only, _ = make_trainer(models, "grpo", tmp_path / "e", head_attends="completion", **settings)
    with pytest.raises(ValueError, match="head_attends='sequence'; this run has head_attends='completion'"):
        completion_only.train(resume_from_checkpoint=str(checkpoint))


def test_the_pi_old_pass_is_the_first_policy_forward_after_generation(models, tmp_path):
    """The scoring takes TRL's first policy forward after generation for its pi_old pass, unless
    that forward is the only one and TRL makes its reference pass with the policy (a PEFT
    policy: beta != 0, no ref_model); then it makes its own no-grad forward."""
    from r2m.integrations.trl.trainers import _Generation, _PolicyForward

    from tests.support.trl_tiny import POLICY_DIM

    trainer, _ = make_trainer(models, "grpo", tmp_path)
    ids = torch.ones(2, 3, dtype=torch.long)
    seen = _PolicyForward(ids, torch.ones_like(ids), 2, torch.zeros(2, 3, POLICY_DIM))
    generation = _Generation([[5, 6], [7]], [[8], [9, 10]], [seen])
    assert trainer._r2m_policy_states(generation) is seen and trainer._r2m_extra_forwards == 0
    trainer.args.beta, trainer.ref_model = 0.1, None
    own = trainer._r2m_policy_states(generation)
    assert own.hidden.shape == (2, 4, POLICY_DIM) and trainer._r2m_extra_forwards == 1
    generation.policy_forwards.append(None)  # a second policy forward: the first was pi_old's
    assert trainer._r2m_policy_states(generation) is seen


def test_checkpoints_must_fall_between_generation_batches(models, tmp_path, caplog):
    """With 3 optimizer steps per generation batch (num_iterations 3): TRL's default save_steps
    (500) is aligned to the nearest multiple, 501, said once; a save_steps given that is not a
    multiple is refused naming the nearest valid ones, a ratio of max_steps as well, and a ratio
    of a length in epochs when training begins, before any step."""
    from r2m.integrations.trl.trainers import SaveStepsError

    with caplog.at_level("WARNING", logger="r2m"):
        trainer, _ = make_trainer(models, "grpo", tmp_path / "a", num_iterations=3, save_strategy="steps")
    notes = [r.getMessage() for r in caplog.records if "save_steps" in r.getMessage()]
    assert trainer.args.save_steps == 501 and len(notes) == 1, notes
    assert "TRL's default 500 is not a multiple of the optimizer steps per generation batch (3 = " in notes[0]
    assert notes[0].endswith("checkpoints every 501 steps instead")
    caplog.clear()
    with caplog.at_level("WARNING", logger="r2m"):
        trainer, _ = make_trainer(models, "grpo", tmp_path / "b", num_iterations=2, save_strategy="steps")
    assert trainer.args.save_steps == 500 and not caplog.records  # already a multiple of 2
    with pytest.raises(SaveStepsError, match=r"^save_steps \(7\) must be a multiple of .* \(3 = .*valid: 6 or 9$"):
        make_trainer(models, "grpo", tmp_path, num_iterations=3, save_strategy="steps", save_steps=7)
    with pytest.raises(SaveStepsError, match=r"^save_steps \(2\) must be .*valid: 3$"):
        make_trainer(models, "grpo", tmp_path, num_iterations=3, save_strategy="steps", save_steps=2)
    with pytest.raises(SaveStepsError, match=r"save_steps \(0.25 of max_steps 10 = 3 steps\) .* \(2 = .*: 2 or 4$"):
        make_trainer(models, "grpo", tmp_path, num_iterations=2, max_steps=10, save_strategy="steps", save_steps=0.25)
    ratio, _ = make_trainer(models, "grpo", tmp_path / "c", num_iterations=2, max_steps=10, save_strategy="steps",
                            save_steps=0.2)
    assert ratio.args.save_steps == 0.2
    in_epochs, _ = make_trainer(models, "grpo", tmp_path / "d", num_iterations=2, max_steps=-1, num_train_epochs=2,
                                save_strategy="steps", save_steps=0.25)
    steps = []
    in_epochs.training_step = lambda *a, **k: steps.append(1)
    with pytest.raises(SaveStepsError, match=r"save_steps \(0.25 of max_steps 12 = 3 steps\)"):
        in_epochs.train()
    assert not steps


def test_reward_model_must_read_the_policys_hidden_size(models, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from r2m import R2MRewardModel
    from r2m.integrations.trl import R2MGRPOTrainer

    from tests.support.trl_tiny import trl_config

    rm = R2MRewardModel.from_sequence_classifier(
        AutoModelForSequenceClassification.from_pretrained(models / "rm", num_labels=1), 40)
    with pytest.raises(ValueError, match="hidden states of size 40; the policy's hidden size is 32"):
        R2MGRPOTrainer(str(models / "policy"), rm, args=trl_config("grpo", tmp_path),
                       train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}))


@pytest.mark.parametrize("name, value", [("attn_dim", 8), ("num_heads", 4), ("omega_floor", 0.45),
                                         ("head_backend", "eager")])
def test_a_reward_model_whose_head_disagrees_with_r2m_config_is_refused(models, tmp_path, name, value):
    """R2MConfig decides the head: a reward model built with other head settings than the
    trainer's r2m_config is an error naming both values, never a silent choice; without
    r2m_config the trainer takes the reward model's own."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from r2m import R2MRewardModel
    from r2m.integrations.trl import R2MGRPOTrainer

    from tests.support.trl_tiny import POLICY_DIM, trl_config

    built = R2MConfig(attn_dim=16, num_heads=2, omega_floor=0.2, head_backend="torch")
    rm = R2MRewardModel.from_sequence_classifier(
        AutoModelForSequenceClassification.from_pretrained(models / "rm", num_labels=1), POLICY_DIM, config=built)
    given = R2MConfig(**{**built.__dict__, name: value})
    with pytest.raises(ValueError, match=f"head has {name}={getattr(built, name)!r} but r2m_config has "
                                         f"{name}={value!r}"):
        R2MGRPOTrainer(str(models / "policy"), rm, args=trl_config("grpo", tmp_path), r2m_config=given,
                       train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}))
    run = R2MConfig(**{**built.__dict__, "mode": "bt-only", "head_learning_rate": 0.5})  # the head's settings agree
    trainer = R2MGRPOTrainer(str(models / "policy"), rm, args=trl_config("grpo", tmp_path), r2m_config=run,
                             train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}))
    assert rm.config == run  # what save_model records is the run's
    assert trainer.head_update.optimizer.param_groups[0]["lr"] == 0.5 and trainer.head_update.loss.alpha == 0.0
    trainer = R2MGRPOTrainer(str(models / "policy"), rm, args=trl_config("grpo", tmp_path), r2m_config=None,
                             train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}))
    assert trainer.r2m_config == run and trainer.head_update.loss.backend == "torch"
    trainer.state.global_step, trainer.state.max_steps = 3, 3
    assert trainer._r2m_omega() == 0.2


def test_a_head_backend_that_cannot_run_fails_in_the_constructor(models, tmp_path):
    """A head backend this device cannot run fails before any training, naming the setting."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from r2m import R2MRewardModel
    from r2m.integrations.trl import R2MGRPOTrainer
    from r2m_kernels import BackendUnavailableError

    from tests.support.trl_tiny import POLICY_DIM, trl_config

    rm = R2MRewardModel.from_sequence_classifier(
        AutoModelForSequenceClassification.from_pretrained(models / "rm", num_labels=1), POLICY_DIM,
        config=R2MConfig(head_backend="cuda"))
    with pytest.raises(BackendUnavailableError, match="head_backend='cuda' cannot run on cpu"):
        R2MGRPOTrainer(str(models / "policy"), rm, args=trl_config("grpo", tmp_path),
                       r2m_config=R2MConfig(head_backend="cuda"), train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}))


@pytest.mark.parametrize("values, field_name", [
    (dict(mode="gold"), "mode"), (dict(attn_dim=0), "attn_dim"), (dict(num_heads=1.5), "num_heads"),
    (dict(head_learning_rate=0.0), "head_learning_rate"), (dict(head_learning_rate=float("inf")), "head_learning_rate"),
    (dict(omega_floor=float("nan")), "omega_floor"), (dict(omega_floor=1.5), "omega_floor"),
    (dict(grebt_alpha=-0.1), "grebt_alpha"), (dict(head_backend="fast"), "head_backend"),
    (dict(attn_dim=10, num_heads=3), "attn_dim"), (dict(head_attends="prompt"), "head_attends"),
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
        config = R2MConfig(mode=mode, attn_dim=8, head_learning_rate=HEAD_LEARNING_RATE_MAX)
        update = HeadUpdate(R2MRewardModel(*tiny_reward_backbone(tiny_tokenizer()), 16, config=config), config)
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
    assert all(not any(key.startswith("r2m/attn_") for key in row) and "r2m/rerank_share" in row for row in logged)
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


@pytest.mark.parametrize("conversational, rm_has_pad", [(True, True), (True, False), (False, True)])
def test_static_reward_is_trls_reward(models, tmp_path, conversational, rm_has_pad):
    """Mode static gives exactly the reward TRL's own GRPOTrainer computes with the same
    sequence-classification RM as reward_funcs (trl's _calculate_rewards, run on the same
    completions): the RM re-reads the decoded text through its chat template, or text prompt +
    completion, and scores the token transformers' classifier picks. Without a pad token the RM
    tokenizer pads with EOS (as TRL sets it), so a trailing EOS is passed over."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOTrainer

    from r2m import R2MRewardModel
    from r2m.integrations.trl import R2MGRPOTrainer

    from tests.support.trl_tiny import POLICY_DIM, trl_config

    rm_dir = models / "rm"
    if not rm_has_pad:
        rm_dir = tmp_path / "rm_without_pad"
        rm_tok = AutoTokenizer.from_pretrained(models / "rm")
        rm_tok.pad_token = None
        AutoModelForSequenceClassification.from_pretrained(models / "rm", num_labels=1).save_pretrained(rm_dir)
        rm_tok.save_pretrained(rm_dir)
    prompts = (models / "prompts.txt").read_text().split()
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts] if conversational
                                 else prompts})
    policy_tok = AutoTokenizer.from_pretrained(models / "policy", padding_side="left")
    config = R2MConfig(mode="static", attn_dim=16)
    rm = R2MRewardModel.from_sequence_classifier(
        AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1), POLICY_DIM, config=config)
    trainer = R2MGRPOTrainer(str(models / "policy"), rm, args=trl_config("grpo", tmp_path / "r2m", max_steps=2,
                                                                         max_completion_length=12),
                             r2m_config=config, train_dataset=dataset, processing_class=policy_tok)
    scored, score = [], trainer._r2m_score

    def record(inputs, prompts, completions, completion_ids):
        score(inputs, prompts, completions, completion_ids)
        scored.append((inputs, prompts, completions, completion_ids, torch.tensor(trainer._r2m_reward.values)))

    trainer._r2m_score = record
    trainer.train()
    trl_trainer = GRPOTrainer(str(models / "policy"), args=trl_config("grpo", tmp_path / "trl"),
                              reward_funcs=AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1),
                              train_dataset=dataset, processing_class=policy_tok)
    assert len(scored) == 2
    for inputs, prompts, completions, completion_ids, r2m_rewards in scored:
        want = trl_trainer._calculate_rewards(inputs, prompts, completions, completion_ids)[:, 0]
        torch.testing.assert_close(r2m_rewards, want, rtol=1e-5, atol=1e-6)
    if not rm_has_pad:  # the chat template ends the text with EOS, now the pad token: passed over
        ids, mask = rm.rm_inputs(scored[0][1], scored[0][2])
        assert rm.tokenizer.pad_token_id == rm.tokenizer.eos_token_id
        assert (rm.reward_positions(ids, mask) < mask.sum(-1) - 1).all()


def test_save_model_then_reload_and_score_as_the_trainer_scored(models, tmp_path):
    """trainer.save_model() writes the policy and, in OUTPUT_DIR/r2m_reward_model, the reward
    model (head, config, the RM by its path); reloaded, R2MRewardModel.score gives the rewards
    the trainer computed for the same (prompt, completion) pairs, given the policy and head as
    they were at that scoring (omega < 1, so the head's term counts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2m import R2MRewardModel

    trainer, rm = make_trainer(models, "grpo", tmp_path / "out", max_steps=3)
    tok = trainer.processing_class
    scored, score = [], trainer._r2m_score

    def record(inputs, prompts, completions, completion_ids):
        state = dict(policy=snapshot(trainer.model), head=snapshot(rm.head), omega=trainer._r2m_omega())
        score(inputs, prompts, completions, completion_ids)
        scored.append(dict(state, prompts=prompts, completions=completions, ids=completion_ids,
                           rewards=torch.tensor(trainer._r2m_reward.values)))

    trainer._r2m_score = record
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert {"r2m_config.json", "r2m_head.safetensors"} <= {p.name for p in (out / "r2m_reward_model").iterdir()}
    assert not (out / "r2m_reward_model" / "reward_backbone").exists()  # the RM is recorded by its path
    loaded = R2MRewardModel.from_pretrained(out / "r2m_reward_model")
    assert loaded.config == trainer.r2m_config and loaded.name_or_path == str(models / "rm")
    for name, value in rm.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[name], value), name

    batch = scored[2]
    assert batch["omega"] == 0.6
    # the pairs whose completion tokens are their text's (a random policy also samples special
    # tokens, which the decoded text drops), EOS included where the completion ended with it
    ended = [ids[-1] == tok.eos_token_id for ids in batch["ids"]]
    rows = [i for i, (c, ids, e) in enumerate(zip(batch["completions"], batch["ids"], ended))
            if tok(text=c[0]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * e == list(ids)]
    assert len(rows) >= 3
    policy = AutoModelForCausalLM.from_pretrained(models / "policy")
    policy.load_state_dict(batch["policy"])
    loaded.head.load_state_dict(batch["head"])
    rewards = loaded.score(policy, AutoTokenizer.from_pretrained(models / "policy"),
                           [batch["prompts"][i] for i in rows], [batch["completions"][i] for i in rows],
                           omega=batch["omega"], ended=[ended[i] for i in rows])
    torch.testing.assert_close(rewards, batch["rewards"][rows], rtol=1e-5, atol=1e-6)
    prompts, completions = [batch["prompts"][i] for i in rows], [batch["completions"][i] for i in rows]
    rm_reward = loaded.static_reward(loaded.reward_token_embeddings(*loaded.rm_inputs(prompts, completions)))
    assert (rewards - rm_reward).abs().max() > 1e-4  # the head's term counts


@pytest.mark.parametrize("head_attends", ["sequence", "completion"])
def test_head_attends_and_attention_diagnostics(models, tmp_path, head_attends):
    """head_attends is a mask: with "completion" the trainer zeroes the prompt's columns of the
    mask it gives the head, at scoring and in the head update, so the R2M reward does not move
    when the prompt's hidden states do; with "sequence" it does. The attention diagnostics and
    the re-ranking share logged are those of the scored batch."""
    from r2m.head_update import HeadUpdate
    from r2m.metrics import completion_attention_mass, max_attention_weight, reranked_share, shared_focus
    from r2m.tokens import completion_positions

    trainer, rm = make_trainer(models, "rloo", tmp_path / "out", head_attends=head_attends)
    generated, masks = [], []
    keep_generated, head_mask = trainer._r2m_generated, trainer.head_update.head_mask
    trainer._r2m_generated = lambda p, c: (generated.append((p, c)), keep_generated(p, c))[1]
    trainer.head_update.head_mask = lambda mask, start: (masks.append((mask, start)), head_mask(mask, start))[1]
    recorder = Recorder(trainer)
    head0 = snapshot(rm.head)
    trainer.train()
    assert len(masks) == len(generated) == len(recorder.scorings) == 3
    for (prompt_ids, completion_ids), (full, start), scoring, update in zip(generated, masks, recorder.scorings,
                                                                            recorder.updates):
        assert start == max(len(p) for p in prompt_ids)  # TRL's layout: left-padded prompts, then completions
        assert all(row[start:start + len(c)].tolist() == c for row, c in zip(scoring["ids"], completion_ids))
        completion = completion_positions(full, start)
        assert completion.any(-1).all() and full[:, :start].any()
        want = completion.to(full.dtype) if head_attends == "completion" else full
        assert torch.equal(scoring["mask"], want) and torch.equal(update["mask"], want)

    # the reward against the prompt's hidden states, with the head as trained, at omega < 1
    last = recorder.scorings[-1]
    start = masks[-1][1]
    moved = last["hidden"].clone()
    moved[:, :start] = torch.randn_like(moved[:, :start]) * 3
    rewards = [HeadUpdate.rewards(trainer.head_update, last["rte"], h, last["mask"], 0.6)
               for h in (last["hidden"], moved)]
    if head_attends == "completion":
        torch.testing.assert_close(rewards[0], rewards[1], rtol=1e-6, atol=1e-6)
    else:
        assert (rewards[0] - rewards[1]).abs().max() > 1e-3

    logged = metrics(trainer.state.log_history)
    first = recorder.scorings[0]  # scored with the initial head, 2 groups of 4: all of them sampled
    rm.head.load_state_dict(head0)
    weights = rm.head.attention_weights(first["rte"], first["hidden"], mask=first["mask"])
    mass = completion_attention_mass(weights, completion_positions(first["mask"], masks[0][1])).mean().item()
    assert logged[0]["r2m/attn_completion_mass"] == pytest.approx(mass, rel=1e-6)
    assert logged[0]["r2m/attn_max_weight"] == pytest.approx(max_attention_weight(weights).mean().item(), rel=1e-6)
    shared = shared_focus(weights, first["hidden"], first["mask"], 4).double().mean().item()
    assert logged[0]["r2m/attn_shared_argmax"] == pytest.approx(shared)
    if head_attends == "completion":
        assert all(row["r2m/attn_completion_mass"] == pytest.approx(1.0) for row in logged)
    else:
        assert all(0 < row["r2m/attn_completion_mass"] < 1 for row in logged)
    assert logged[0]["r2m/rerank_share"] == 0.0  # omega = 1: the frozen RM's reward
    assert [row["r2m/rerank_share"] for row in logged] == [
        reranked_share(s["rewards"], s["rm_rewards"], 4) for s in recorder.scorings]
