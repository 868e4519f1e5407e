"""The README's examples run as written (docs that match the code)."""

import pathlib
import re

import torch


def test_quickstart_runs():
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    scope = {}
    exec(compile(code, "README quickstart", "exec"), scope)
    head, rewards, loss = scope["head"], scope["rewards"], scope["loss"]
    assert rewards.shape == (8,) and loss.ndim == 0
    assert all(p.grad is not None for p in head.parameters())


def test_training_save_and_score_run_as_written(tmp_path, monkeypatch):
    """The Training section's two examples run as written on this machine (a CPU here), in
    order, with tiny local models for the placeholders (RM_DIR, POLICY_DIR, POLICY_HIDDEN_SIZE,
    prompts) and 2 steps instead of 200; the reloaded reward model has the head the config
    describes and scores the pairs."""
    import pytest

    pytest.importorskip("trl")
    from tests.support.trl_tiny import POLICY_DIM, save_tiny_models

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Training", 1)[1].split("\n## ", 1)[0]
    train, score = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    assert "max_steps=200" in train
    models = save_tiny_models(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    scope = {"RM_DIR": str(models / "rm"), "POLICY_DIR": str(models / "policy"), "POLICY_HIDDEN_SIZE": POLICY_DIM,
             "prompts": [[{"role": "user", "content": q}] for q in ("1+2=", "2+2=")]}
    exec(compile(train.replace("max_steps=200", "max_steps=2"), "README training", "exec"), scope)
    assert scope["trainer"].state.global_step == 2
    exec(compile(score, "README scoring", "exec"), scope)
    rm, rewards = scope["rm"], scope["rewards"]
    assert rm.config == scope["r2m_config"] and rm.head.attn_dim == 256
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
