"""Benchmark rows and their outputs: text tables, CSV, JSON and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .cases import OPS


@dataclass
class Row:
    op: str
    size: str
    backend: str
    dtype: str
    device: str
    forward_ms: float | None = None
    backward_ms: float | None = None
    fwd_bwd_ms: float | None = None  # for update and rm-update: the whole step with the optimizer
    peak_extra_bytes: int | None = None  # above inputs/weights/optimizer state; None on the CPU
    peak_total_bytes: int | None = None
    floor_pass_ms: float | None = None  # one read of hidden at the measured read bandwidth
    pct_floor_fwd: float | None = None
    pct_floor_bwd: float | None = None
    pct_floor_fwd_bwd: float | None = None
    speedup_fwd: float | None = None  # over the op's baseline row at the same size
    speedup_bwd: float | None = None
    speedup_fwd_bwd: float | None = None
    note: str = ""
    error: str = ""


FIELDS = [f.name for f in fields(Row)]


def _ratio(num, den):
    return None if num is None or den is None or den <= 0 else num / den


def derive(rows: list[Row], bandwidth) -> None:
    """Fill the floor percentages and the speedups over each op's baseline, in place."""
    baselines = {(r.op, r.size): r for r in rows if r.backend == OPS[r.op].baseline and not r.error}
    for r in rows:
        passes = OPS[r.op].floor_passes
        if passes is not None and r.floor_pass_ms is not None:
            floors = [n * r.floor_pass_ms for n in passes]
            r.pct_floor_fwd, r.pct_floor_bwd, r.pct_floor_fwd_bwd = (
                None if x is None else 100.0 * f / x
                for f, x in zip(floors, (r.forward_ms, r.backward_ms, r.fwd_bwd_ms)))
        base = baselines.get((r.op, r.size))
        if base is not None:
            r.speedup_fwd = _ratio(base.forward_ms, r.forward_ms)
            r.speedup_bwd = _ratio(base.backward_ms, r.backward_ms)
            r.speedup_fwd_bwd = _ratio(base.fwd_bwd_ms, r.fwd_bwd_ms)


def _ms(x):
    return "n/a" if x is None else f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _gib(x):
    return "n/a" if x is None else f"{x / 2**30:.3f} GiB"


def _pct(x):
    return "n/a" if x is None else f"{x:.0f}%"


def _times(x):
    return "n/a" if x is None else f"{x:.2f}x"


COLUMNS = [("backend", lambda r: r.backend), ("size", lambda r: r.size),
           ("fwd ms", lambda r: _ms(r.forward_ms)), ("bwd ms", lambda r: _ms(r.backward_ms)),
           ("fwd+bwd ms", lambda r: _ms(r.fwd_bwd_ms)),
           ("peak extra", lambda r: _gib(r.peak_extra_bytes)), ("peak total", lambda r: _gib(r.peak_total_bytes)),
           ("floor fwd", lambda r: _pct(r.pct_floor_fwd)), ("floor bwd", lambda r: _pct(r.pct_floor_bwd)),
           ("floor f+b", lambda r: _pct(r.pct_floor_fwd_bwd)),
           ("speedup fwd", lambda r: _times(r.speedup_fwd)), ("speedup f+b", lambda r: _times(r.speedup_fwd_bwd))]


def table(op: str, rows: list[Row], skipped: dict[str, str]) -> str:
    """The text table of one op: one line per (size, backend), then notes."""
    spec = OPS[op]
    body = [[get(r) for _, get in COLUMNS] for r in rows if not r.error]
    header = [name for name, _ in COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [f"== {op}: {spec.title}", f"   speedup over `{spec.baseline}`; floor = time to read hidden "
           + ("n/a for this op" if spec.floor_passes is None else
              "once (fwd), once (bwd), twice (fwd+bwd) at the measured read bandwidth, as % of the time "
              "(over 100% means hidden was served from a cache, as at tiny sizes on the CPU)"),
           line(header), line(["-" * w for w in widths]), *(line(b) for b in body)]
    notes = [f"   {r.size} {r.backend}: {r.note}" for r in rows if r.note and not r.error]
    notes += [f"   {r.size} {r.backend}: FAILED: {r.error}" for r in rows if r.error]
    notes += [f"   {name} not timed: {why}" for name, why in skipped.items()]
    return "\n".join(out + (["   notes:"] + notes if notes else []))


def write_csv(path: Path, rows: list[Row]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})


def write_json(path: Path, meta: dict, rows: list[Row]) -> None:
    def clean(v):  # JSON has no NaN/Inf
        return None if isinstance(v, float) and not math.isfinite(v) else v

    payload = dict(meta, rows=[{k: clean(v) for k, v in asdict(r).items()} for r in rows])
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot(path: Path, op: str, rows: list[Row], machine: str) -> None:
    """Bars per size and backend: the speedup over the baseline, the time as % of the floor
    (ops that have one) and the peak memory (where it was measured), forward+backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = OPS[op]
    rows = [r for r in rows if not r.error]
    sizes = list(dict.fromkeys(r.size for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    panels = [(lambda r: r.speedup_fwd_bwd, f"speedup over {spec.baseline} ({spec.combined})", "x")]
    if spec.floor_passes is not None:
        panels.append((lambda r: r.pct_floor_fwd_bwd, f"{spec.combined}, % of the read floor", "%"))
    if any(r.peak_total_bytes is not None for r in rows):
        panels.append((lambda r: None if r.peak_total_bytes is None else r.peak_total_bytes / 2**30,
                       f"peak memory, {spec.combined}", "GiB"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for ax, (value, label, unit) in zip(axes[0], panels):
        for i, backend in enumerate(backends):
            by_size = {r.size: value(r) for r in rows if r.backend == backend}
            heights = [by_size.get(s) or 0.0 for s in sizes]
            ax.bar([j + i * width for j in range(len(sizes))], heights, width, label=backend)
        ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(sizes))], sizes)
        ax.set_ylabel(unit)
        ax.set_title(label, fontsize="medium")
        if unit == "x":
            ax.axhline(1.0, color="grey", linewidth=0.8)
        if backends:
            ax.legend(fontsize="small")
    fig.suptitle(f"r2m bench {op}\n{machine}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
