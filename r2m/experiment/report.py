"""The experiment's report: per arm and seed, what the held-out set measured; per arm, the
paired difference from the static arm of the same seed (never a proxy reward compared across
arms: each arm optimises its own); the pairing checks; a table, CSV, JSON, a Markdown summary and
the over-optimisation picture (gold and frozen-RM reward against KL, as in Gao et al.)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .stats import area_under, holm, paired_summary

# held-out endpoints compared within a seed: gold averaged (trapezoid) over the run, over its
# second half (the evaluations at steps >= T/2), and at the last step
PAIRED_METRICS = ("gold_auc", "gold_second_half", "gold_final")
HEAD_TO_HEAD = (("r2m", "iterative-head"),)  # contrasts between two arms, beside each arm's against static
# the primary endpoint and the family of contrasts Holm's correction runs over on it (fixed before
# the confirmatory run in docs/experiment/pilot-plan.md): policy feedback against the frozen RM, and
# against the same head trained without policy feedback (the paper's Iterative RMHead)
PRIMARY_ENDPOINT = "gold_second_half"
PRIMARY_FAMILY = ("r2m − static", "r2m − iterative-head")
FAMILY_ALPHA = 0.05

# TRL log keys of the training batches, each averaged over the first third, the last third and the
# whole of the run's scorings that logged it (the arms whose reward has a head; the attention
# diagnostics in the arms that read hidden states)
TRAIN_METRICS = ("r2m/agree_gold", "r2m/rm_agree_gold", "r2m/agree_length", "r2m/rm_agree_length",
                 "r2m/head_share", "r2m/rerank_share", "r2m/attn_completion_mass", "r2m/attn_max_weight",
                 "r2m/attn_shared_argmax", "r2m/grebt_loss")


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def run_metrics(record: dict) -> dict:
    """One arm of one seed, from its held-out rows and TRL's per-step log."""
    rows = record["eval"]
    steps = [r["step"] for r in rows]
    metrics = {"arm": record["arm"], "seed": record["seed"], "head_learning_rate": record.get("head_learning_rate"),
               "head_attends": record.get("head_attends"), "seconds": record["seconds"],
               "gold_auc": area_under(steps, [r["gold"] for r in rows]),
               "gold_second_half": area_under(*zip(*[(r["step"], r["gold"]) for r in rows
                                                       if 2 * r["step"] >= steps[-1]])),
               "gold_start": rows[0]["gold"], "gold_final": rows[-1]["gold"],
               "rm_reward_final": rows[-1]["rm_reward"], "kl_final": rows[-1]["kl"],
               "length_start": rows[0]["length"], "length_final": rows[-1]["length"]}
    for key in ("agree_gold", "rm_agree_gold", "agree_length", "rm_agree_length"):
        metrics[f"eval_{key}_final"] = rows[-1][key]
    train = [row for row in record["train"] if "step" in row]
    for key in TRAIN_METRICS:
        name, values = key.split("/")[1], [row[key] for row in train if key in row]
        third = max(1, len(values) // 3)
        metrics[f"train_{name}_first_third"] = _mean(values[:third])
        metrics[f"train_{name}_last_third"] = _mean(values[len(values) - third:])
        metrics[f"train_{name}_run"] = _mean(values)
    return metrics


def pairing_checks(records: list[dict]) -> dict:
    """Per seed: whether every arm trained on the same prompts in the same order, and drew the
    same held-out samples at step 0 (same policy, same evaluation seed), and evaluated at the
    same steps."""
    checks = {}
    for seed in sorted({r["seed"] for r in records}):
        arms = [r for r in records if r["seed"] == seed]
        checks[seed] = {
            "same_prompts": all(r["prompts"] == arms[0]["prompts"] for r in arms),
            "same_eval_samples_at_step_0": len({r["eval"][0]["digest"] for r in arms}) == 1,
            "same_eval_steps": len({tuple(row["step"] for row in r["eval"]) for r in arms}) == 1,
        }
    return checks


def summarise(records: list[dict], meta: dict) -> dict:
    runs = [run_metrics(r) for r in records]
    by_key = {(m["arm"], m["seed"]): m for m in runs}
    seeds = sorted({m["seed"] for m in runs})
    arms = [a for a in meta["arms"] if a != "static"]

    def contrast(arm, baseline):
        out = {}
        for metric in PAIRED_METRICS:
            diffs = [by_key[arm, s][metric] - by_key[baseline, s][metric] for s in seeds
                     if (arm, s) in by_key and (baseline, s) in by_key]
            out[metric] = {"per_seed": diffs, **paired_summary(diffs)} if diffs else None
        return out

    paired = {arm: contrast(arm, "static") for arm in arms}
    # the paper's own contrast: policy feedback (r2m) against none (its Iterative RMHead baseline)
    head_to_head = {f"{a} − {b}": contrast(a, b) for a, b in HEAD_TO_HEAD if a in arms and b in arms}
    contrasts = {**{f"{arm} − static": c for arm, c in paired.items()}, **head_to_head}
    family = {name: contrasts[name][PRIMARY_ENDPOINT]["p_value"] for name in PRIMARY_FAMILY
              if name in contrasts and contrasts[name][PRIMARY_ENDPOINT]}
    primary = {"endpoint": PRIMARY_ENDPOINT, "alpha": FAMILY_ALPHA, "holm": holm(family, FAMILY_ALPHA)}
    # the initial policy's held-out samples: step 0 of one run per seed (every arm of a seed draws
    # the same ones, pairing_checks), so the set-up is described with or without a static arm
    first_of_seed = list({r["seed"]: r for r in reversed(records)}.values())
    setup = {"rm_fit": meta.get("rm_fit", {}).get("stats"),
             "initial_held_out": {
                 key: _mean(r["eval"][0][key] for r in first_of_seed)
                 for key in ("gold", "rm_agree_gold", "rm_agree_length", "length", "rm_reward")},
             "gold_max": meta.get("gold_max")}
    return {"meta": meta, "setup": setup, "runs": runs, "paired": paired, "head_to_head": head_to_head,
            "primary": primary, "pairing": pairing_checks(records)}


def _fmt(value, spec=".3f", signed=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, ("+" if signed else "") + spec)


def paired_line(name: str, s: dict) -> str:
    """One contrast's paired difference: mean ± SD, the seeds, and the test, interval and detectable
    effect only where the sample supports them (stats.paired_summary's `untested` says why not)."""
    per_seed = ", ".join(_fmt(d, signed=True) for d in s["per_seed"])
    if s["n"] < 2:
        return (f"  {name:<24} {_fmt(s['mean'], signed=True)} (n={s['n']}; "
                f"no p-value, CI or detectable effect: {s['untested']})")
    if s["untested"] is not None:
        spread = f" ± {_fmt(s['sd'])}" if s["sd"] == 0 else ""  # an SD of two seeds is not shown
        return (f"  {name:<24} {_fmt(s['mean'], signed=True)}{spread} (n={s['n']}; per seed {per_seed}; "
                f"no p-value, CI or detectable effect: {s['untested']})")
    return (f"  {name:<24} {_fmt(s['mean'], signed=True)} ± {_fmt(s['sd'])} (n={s['n']}; per seed {per_seed}; "
            f"SE {_fmt(s['se'])}, 95% CI [{_fmt(s['ci_low'], signed=True)}, {_fmt(s['ci_high'], signed=True)}], "
            f"p {_fmt(s['p_value'], '.2f')}, smallest detectable {_fmt(s['mde'])})")


def holm_lines(primary: dict) -> list[str]:
    """The primary endpoint's family of contrasts after Holm's correction."""
    if not primary["holm"]:
        return []
    lines = ["", f"primary endpoint ({primary['endpoint']}), Holm's correction over "
                 f"{' and '.join(primary['holm'])} at family-wise α = {primary['alpha']}:"]
    for name, h in primary["holm"].items():
        verdict = ("untested" if math.isnan(h["p_holm"]) else
                   "rejected (the arms differ)" if h["reject"] else "not rejected")
        lines.append(f"  {name:<24} Holm-adjusted p {_fmt(h['p_holm'], '.3f')}: {verdict}")
    return lines


def _change(m: dict, name: str, spec: str = ".2f") -> str:
    first, last = m[f"train_{name}_first_third"], m[f"train_{name}_last_third"]
    if math.isnan(first) and math.isnan(last):
        return "n/a"
    return f"{_fmt(first, spec)}→{_fmt(last, spec)}"


def training_table(summary: dict) -> str:
    """What each run's reward did on its training batches (the arms with a head): how often it
    re-ranked a group's ends against the frozen RM, the head's share of the reward spread, and
    where the head's attention went; first third → last third of the run's scorings."""
    runs = [m for m in summary["runs"] if m["arm"] != "static"]
    if not runs:
        return ""
    head = (f"{'arm':<15}{'seed':>5}{'re-ranked':>11}{'head share':>13}{'attn on compl.':>16}"
            f"{'max weight':>13}{'shared focus':>14}")
    lines = ["on the training batches, first third → last third of the run's scorings:", head, "-" * len(head)]
    for m in runs:
        lines.append(f"{m['arm']:<15}{m['seed']:>5}{_change(m, 'rerank_share'):>11}{_change(m, 'head_share'):>13}"
                     f"{_change(m, 'attn_completion_mass'):>16}{_change(m, 'attn_max_weight'):>13}"
                     f"{_change(m, 'attn_shared_argmax'):>14}")
    lines += ["re-ranked: share of groups whose best or worst completion the reward puts elsewhere than the frozen RM;",
              "head share: the head term's share of a group's reward spread; attn on compl.: the head's attention",
              "on completion tokens; max weight: its largest weight; shared focus: share of groups where every row's",
              "most-attended position holds a hidden state the whole group shares",
              "(n/a: not logged in that arm: iterative-head reads no hidden states)"]
    return "\n".join(lines)


def table(summary: dict) -> str:
    """The printed table: every run, then per endpoint the paired differences of each arm from
    static and of r2m from iterative-head."""
    lines = []
    head = f"{'arm':<15}{'seed':>5}{'gold AUC':>10}{'gold 0→T':>15}{'frozen RM T':>13}{'KL/tok T':>10}{'len 0→T':>13}"
    lines += [head, "-" * len(head)]
    for m in summary["runs"]:
        lines.append(f"{m['arm']:<15}{m['seed']:>5}{m['gold_auc']:>10.3f}"
                     f"{m['gold_start']:>8.3f}→{m['gold_final']:.3f}{m['rm_reward_final']:>13.3f}"
                     f"{m['kl_final']:>10.4f}{m['length_start']:>7.1f}→{m['length_final']:.1f}")
    for metric, title in (("gold_auc", "gold AUC (mean over the run)"),
                          ("gold_second_half", "gold over the second half of the run")):
        paired = [(f"{arm} − static", m[metric]) for arm, m in summary["paired"].items() if m[metric]]
        paired += [(name, m[metric]) for name, m in summary.get("head_to_head", {}).items() if m[metric]]
        if paired:
            lines += ["", f"paired difference of held-out {title}, same seed:"]
            lines += [paired_line(name, s) for name, s in paired]
    lines += holm_lines(summary["primary"])
    bad = {seed: [k for k, ok in c.items() if not ok] for seed, c in summary["pairing"].items()}
    bad = {seed: keys for seed, keys in bad.items() if keys}
    lines.append("pairing: " + ("every arm of a seed saw the same prompts and the same held-out samples at step 0"
                                if not bad else f"BROKEN {bad}"))
    return "\n".join(lines)


def plot(records: list[dict], meta: dict, path: Path) -> None:
    """Gold and frozen-RM reward on the held-out set against KL per token, every arm: thin
    lines per seed, a thick line for the mean over seeds at each evaluation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, arm in enumerate(meta["arms"]):
        runs = [r for r in records if r["arm"] == arm]
        color = colors[i % len(colors)]
        for ax, key in zip(axes, ("gold", "rm_reward")):
            for r in runs:
                ax.plot([row["kl"] for row in r["eval"]], [row[key] for row in r["eval"]], color=color, alpha=0.3,
                        linewidth=0.8)
            n = min(len(r["eval"]) for r in runs)
            kl = [_mean(r["eval"][j]["kl"] for r in runs) for j in range(n)]
            ax.plot(kl, [_mean(r["eval"][j][key] for r in runs) for j in range(n)], color=color, linewidth=2.2,
                    marker="o", markersize=3, label=arm)
    for ax, title in zip(axes, ("gold reward (judge), held-out", "frozen RM's reward, held-out")):
        ax.set_title(title)
        ax.set_xlabel("KL(policy ‖ initial) per token, held-out")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{len(meta['seeds'])} seeds × {meta['max_steps']} steps; thin: one seed, thick: mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict) -> str:
    meta, setup = summary["meta"], summary["setup"]
    v = meta["versions"]
    fit = setup["rm_fit"] or {}
    initial = setup["initial_held_out"]
    lines = ["# r2m experiment", "",
             f"Command: `{meta['command']}`", "",
             f"Versions: r2m {v['r2m']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
             f"Python {v['python']} ({v['machine']}, {v['threads']} threads). This command's wall time "
             f"{meta['seconds']:.0f} s; the runs' own {sum(m['seconds'] for m in summary['runs']):.0f} s (the runs of "
             "an experiment continued in parts were made by the earlier commands).", "",
             f"Arms {', '.join(meta['arms'])}; seeds {', '.join(map(str, meta['seeds']))}; T = {meta['max_steps']} "
             "optimizer steps (= omega's schedule length).", "",
             "## Set-up", "",
             f"- Reward model on the initial policy's samples it was fitted on: agrees with its labels on "
             f"{_fmt(fit.get('agree_labels'), '.0%')}, with gold on {_fmt(fit.get('agree_gold'), '.0%')}, with length "
             f"on {_fmt(fit.get('agree_length'), '.0%')} of within-group pairs (below 50%: it prefers shorter).",
             f"- On the initial policy's held-out samples: the RM agrees with gold on "
             f"{_fmt(initial['rm_agree_gold'], '.0%')} and with length on {_fmt(initial['rm_agree_length'], '.0%')} of "
             f"within-group pairs; gold {_fmt(initial['gold'])} (the judge's maximum is {_fmt(setup['gold_max'], '.1f')}); "
             f"length {_fmt(initial['length'], '.1f')} tokens.", "",
             "## Runs and paired differences", "", "```", table(summary), "```", "",
             "## What the reward did on the training batches", "", "```", training_table(summary), "```", "",
             "## Agreement within groups (arms with a head: training batches; mean of the per-step fractions "
             "over the first and the last third of the run)", "",
             "| arm | seed | reward vs gold (first → last third) | frozen RM vs gold | reward vs length | "
             "frozen RM vs length | head share (run / last third) |",
             "|---|---|---|---|---|---|---|"]
    for m in summary["runs"]:
        if m["arm"] == "static":
            continue
        lines.append(f"| {m['arm']} | {m['seed']} | {_fmt(m['train_agree_gold_first_third'], '.2f')} → "
                     f"{_fmt(m['train_agree_gold_last_third'], '.2f')} | {_fmt(m['train_rm_agree_gold_first_third'], '.2f')} → "
                     f"{_fmt(m['train_rm_agree_gold_last_third'], '.2f')} | {_fmt(m['train_agree_length_last_third'], '.2f')} | "
                     f"{_fmt(m['train_rm_agree_length_last_third'], '.2f')} | {_fmt(m['train_head_share_run'], '.2f')} / "
                     f"{_fmt(m['train_head_share_last_third'], '.2f')} |")
    lines += ["", "Smallest detectable effect: (t_{0.975,n-1} + t_{0.8,n-1}) × SD / √n, the true mean paired "
              "difference a two-sided paired t-test at α = 0.05 finds with power 0.8, given the observed SD; "
              "95% CI: mean ± t_{0.975,n-1} × SD / √n. Neither, nor a p-value, is given for fewer than 3 seeds or "
              "a difference that does not vary between seeds. The CI and p-value beside each contrast are "
              f"unadjusted; on the primary endpoint ({PRIMARY_ENDPOINT}) the family {' and '.join(PRIMARY_FAMILY)} is "
              "also tested with Holm's step-down correction (the smaller p-value against α/2, then the other "
              "against α).", "",
              "![gold and frozen-RM reward against KL](report.png)", ""]
    return "\n".join(lines)


def write_report(records: list[dict], meta: dict, out: Path) -> dict:
    summary = summarise(records, meta)
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary["runs"][0]))
        writer.writeheader()
        writer.writerows(summary["runs"])
    plot(records, meta, out / "report.png")
    (out / "report.md").write_text(markdown(summary))
    return summary
