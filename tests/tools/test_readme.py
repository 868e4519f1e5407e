"""The README's quickstart runs as written (docs that match the code)."""

import pathlib
import re


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
