"""The Python side of scripts/gpu_check.sh: finding CUDA tools, the dry run's Python checks,
the SASS check, and publishing (summary.md, the merged benchmark files, logs.tar.gz).

Only the standard library at import time, so that the summary is written even where torch
or the package is broken; `preflight` imports the project on purpose.

    python scripts/gpu_check_tools.py which cuobjdump
    python scripts/gpu_check_tools.py preflight --bench "--ops pool --sizes paper-8b" --cases-args "--backends cuda"
    python scripts/gpu_check_tools.py sass --cuobjdump PATH --extension SO --triton-cache DIR --report sass.md
    python scripts/gpu_check_tools.py publish --work WORK --out OUT [--final]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the device tool returns from $OUT: at most 8 files, 16 MiB each.
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
LOG_TAIL_LINES = 30


# ---- tools --------------------------------------------------------------------------------------

def find_cuda_tool(name: str) -> str | None:
    """A CUDA command-line tool: on PATH, in the toolkit, or (cuobjdump, nvdisasm, ptxas) the
    copy that Triton's package carries."""
    found = shutil.which(name)
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", "/usr/local/nvidia"):
        if base and Path(base, "bin", name).is_file():
            return str(Path(base, "bin", name))
    spec = importlib.util.find_spec("triton")  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location, "backends", "nvidia", "bin", name)
        if candidate.is_file():
            return str(candidate)
    return None


def cmd_which(args) -> int:
    path = find_cuda_tool(args.name)
    if path is None:
        print(f"{args.name}: not found on PATH, in the CUDA toolkit or in Triton's package", file=sys.stderr)
        return 1
    print(path)
    return 0


# ---- preflight: the dry run's Python-side checks ---------------------------------------------------

def _load_script(path: Path):
    """Import a script by path (its `if __name__ == "__main__"` part does not run)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cmd_preflight(args) -> int:
    failures = 0

    def report(ok: bool, text: str, required: bool = True) -> None:
        nonlocal failures
        failures += required and not ok
        print(f"{'ok  ' if ok else 'FAIL' if required else 'info'} {text}")

    versions = []
    for name in ("torch", "triton", "pytest", "matplotlib", "r2m", "r2m_kernels"):
        try:
            module = importlib.import_module(name)
            versions.append(f"{name} {getattr(module, '__version__', '')}".strip())
        except Exception as exc:  # any import failure is the finding
            report(False, f"import {name}: {type(exc).__name__}: {exc}")
    if len(versions) == 6:
        report(True, "imports: " + ", ".join(versions))
    for name, use in (("xdist", "pytest-xdist: the gpu tests run in parallel workers"),
                      ("pytest_timeout", "pytest-timeout: a hung gpu test is stopped")):
        present = importlib.util.find_spec(name) is not None
        report(present, f"{use} ({'installed' if present else 'not installed here; the stage runs without it'})",
               required=False)

    try:
        from r2m import bench

        for text in args.bench:
            parser = argparse.ArgumentParser(prog="r2m bench", exit_on_error=False)
            bench.add_arguments(parser)
            try:
                parser.parse_args(shlex.split(text))
                report(True, f"r2m bench accepts: {text}")
            except (argparse.ArgumentError, SystemExit) as exc:
                report(False, f"r2m bench rejects `{text}`: {exc}")
    except Exception as exc:
        report(False, f"r2m.bench: {type(exc).__name__}: {exc}")

    for script in args.script:
        try:
            _load_script(ROOT / script)
            report(True, f"{script} imports")
        except (Exception, SystemExit) as exc:
            report(False, f"{script}: {type(exc).__name__}: {exc}")

    try:
        driver = _load_script(ROOT / "scripts" / "gpu_kernel_cases.py")
        for text in args.cases_args:
            parsed = driver._parse_args(shlex.split(text))
            cases = driver.selected_cases(parsed.backends, parsed.match)
            per_backend = Counter(c.backend for c in cases)
            report(bool(cases), f"gpu_kernel_cases.py {text}: {len(cases)} cases ("
                   + ", ".join(f"{b} {n}" for b, n in per_backend.items()) + ")")
    except (Exception, SystemExit) as exc:
        report(False, f"scripts/gpu_kernel_cases.py: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


# ---- SASS -----------------------------------------------------------------------------------------

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
# "/*0070*/   @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;" -> "LDG.E.128"
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
# The cuda pool kernels: template <typename T, int VEC, ...>; VEC > 1 is the 16-byte path.
_POOL_KERNEL = re.compile(r"(pool_(?:forward|backward)_kernel)I(f|6__half|13__nv_bfloat16)Li(\d+)E")
# "...19pool_forward_kernelI13__nv_bfloat16Li8ELi1ELi8EE...": a length-prefixed name, then the
# template arguments (a type, then integers and bools).
_TEMPLATE = re.compile(r"(\w+_kernel)I(f|d|6__half|13__nv_bfloat16)((?:L[ib]\d+E)*)")
_TYPE_NAMES = {"f": "fp32", "d": "fp64", "6__half": "fp16", "13__nv_bfloat16": "bf16"}


def parse_sass(text: str) -> dict[str, list[str]]:
    """cuobjdump -sass output -> {function: [opcode with modifiers, ...]}."""
    functions: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = _FUNCTION.match(line)
        if match:
            current = functions.setdefault(match.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            current.append(match.group(1))
    return functions


def load_counts(opcodes: list[str]) -> dict[str, int]:
    base = [op.split(".")[0] for op in opcodes]
    return {
        "ldg128": sum(1 for op in opcodes if op.startswith("LDG.") and ".128" in op),
        "ldg": base.count("LDG"),
        "local": base.count("LDL") + base.count("STL"),
    }


def readable_name(mangled: str) -> str:
    """`pool_forward_kernel<bf16, 8, 1, 8>` for a mangled template kernel; others unchanged."""
    match = _TEMPLATE.search(mangled)
    if not match:
        return mangled
    prefixed = match.group(1)  # e.g. "...cu_9362dd5f19pool_forward_kernel": find the length prefix
    name = next((prefixed[m.end():] for m in re.finditer(r"\d+", prefixed)
                 if int(m.group()) == len(prefixed) - m.end()), prefixed)
    values = re.findall(r"L[ib](\d+)E", match.group(3))
    return f"{name}<{', '.join([_TYPE_NAMES[match.group(2)], *values])}>"


def check_extension_sass(functions: dict[str, list[str]]) -> tuple[list[tuple], list[str]]:
    """Rows (name, ldg128, other ldg, local, verdict) and the failures: every 16-byte (VEC > 1)
    instantiation of the pool kernels must load with 128-bit LDGs; no function may use local
    memory (LDL/STL)."""
    rows, failures = [], []
    for mangled, opcodes in sorted(functions.items(), key=lambda kv: readable_name(kv[0])):
        counts = load_counts(opcodes)
        name = readable_name(mangled)
        problems = []
        pool = _POOL_KERNEL.search(mangled)
        if pool and int(pool.group(3)) > 1 and counts["ldg128"] == 0:
            problems.append("no 128-bit loads on the 16-byte path")
        if counts["local"]:
            problems.append(f"{counts['local']} local-memory instructions")
        failures += [f"{name}: {p}" for p in problems]
        rows.append((name, counts["ldg128"], counts["ldg"] - counts["ldg128"], counts["local"],
                     "; ".join(problems) or "ok"))
    return rows, failures


def _sass_of(cuobjdump: str, path: Path) -> str:
    done = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {path} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _triton_kernel_names() -> set[str]:
    """Functions defined in the project's Triton sources, to tell its cubins from inductor's."""
    names = set()
    for source in [*ROOT.glob("r2m_kernels/triton/*.py"), *ROOT.glob("r2m/bench/*.py")]:
        names.update(re.findall(r"^def (\w+)\(", source.read_text(), flags=re.M))
    return names


def cmd_sass(args) -> int:
    lines, failed = [], False
    text = _sass_of(args.cuobjdump, args.extension)
    if args.listing:
        args.listing.write_text(text)
    functions = parse_sass(text)
    rows, failures = check_extension_sass(functions)
    if not functions:
        failures = [f"no functions in the SASS of {args.extension}"]
    failed = bool(failures)
    lines += [f"cuda extension `{args.extension.name}`, {len(functions)} kernels "
              f"(`cuobjdump -sass`, {args.cuobjdump}). Checked: 128-bit loads (LDG.*.128) in every "
              "16-byte instantiation of the pool kernels, no local memory (LDL/STL) anywhere.", "",
              "| kernel | 128-bit LDG | other LDG | LDL+STL | check |", "|---|---|---|---|---|"]
    lines += [f"| `{name}` | {a} | {b} | {c} | {verdict} |" for name, a, b, c, verdict in rows]
    lines += ["", f"**{'FAIL' if failed else 'PASS'}**" + (": " + "; ".join(failures) if failures else ""), ""]

    if args.triton_cache and args.triton_cache.is_dir():
        ours = _triton_kernel_names()
        per_kernel: dict[str, Counter] = {}
        for cubin in sorted(args.triton_cache.rglob("*.cubin")):
            if cubin.stem not in ours:
                continue
            try:
                for _, opcodes in parse_sass(_sass_of(args.cuobjdump, cubin)).items():
                    counts = load_counts(opcodes)
                    tally = per_kernel.setdefault(cubin.stem, Counter())
                    tally["cubins"] += 1
                    tally["with 128-bit loads"] += counts["ldg128"] > 0
                    tally["with local memory"] += counts["local"] > 0
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                lines.append(f"- {cubin}: {exc}")
        lines += ["Triton kernels (reported, not checked): compiled specialisations in the Triton cache "
                  "(autotune configs, dtypes, constexpr flags).", "",
                  "| kernel | cubins | with 128-bit loads | with local memory |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {t['cubins']} | {t['with 128-bit loads']} | {t['with local memory']} |"
                  for k, t in sorted(per_kernel.items())] or ["| (none found) | | | |"]
    args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


# ---- publish: summary.md, merged benchmark files, logs.tar.gz -----------------------------------

def _read_tsv(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def _read_log(path: Path) -> str:
    """A log as written: carriage returns kept (read_text would turn them into newlines)."""
    return path.read_bytes().decode(errors="replace") if path.is_file() else ""


def _clean_log(text: str) -> list[str]:
    """Lines as a terminal shows them: progress bars rewritten in place keep their last state."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]  # splitlines splits at \r


def _log_tail(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    if not path.is_file():
        return ["(no log)"]
    lines = [line for line in _clean_log(_read_log(path)) if line.strip()]
    return lines[-n:] or ["(empty log)"]


def _code(lines: list[str]) -> list[str]:
    return ["```", *lines, "```"]


def pytest_counts(xml_path: Path, log_path: Path) -> tuple[dict, list[str], list[str]]:
    """({passed, failed, errors, skipped}, failed test ids, collection errors) from the junit
    XML, or from the verbose log where pytest was stopped before writing it."""
    counts = Counter()
    failed, collection = [], []
    if xml_path.is_file():
        try:
            for case in ET.parse(xml_path).getroot().iter("testcase"):
                name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
                error, failure = case.find("error"), case.find("failure")
                if error is not None and error.get("message") == "collection failure":
                    counts["collection errors"] += 1
                    detail = [line for line in (error.text or "").splitlines() if line.startswith("E ")]
                    collection.append(f"{case.get('name')}: {detail[-1][1:].strip() if detail else 'collection failure'}")
                elif error is not None or failure is not None:
                    counts["failed" if failure is not None else "errors"] += 1
                    message = (failure if failure is not None else error).get("message", "")
                    failed.append(f"{name}: {message.splitlines()[0][:200] if message else ''}")
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                elif case.get("name"):
                    counts["passed"] += 1
            return dict(counts), failed, collection
        except ET.ParseError:
            counts.clear()
    # Verbose lines: "tests/x.py::test[p] PASSED [ 1%]" or, from xdist, "[gw0] [ 1%] PASSED tests/x.py::test[p]".
    for line in _clean_log(_read_log(log_path)):
        match = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
        if match and "::" in line:
            outcome = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(
                match.group(1), "skipped")
            counts[outcome] += 1
            if outcome in ("failed", "errors"):
                failed.append(next(w for w in line.split() if "::" in w))
    return dict(counts), failed, collection


def cmd_pytest_counts(args) -> int:
    counts, _, _ = pytest_counts(args.xml, args.log)
    print("pytest: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    if args.require_passed and not counts.get("passed"):
        print("pytest: no test passed", file=sys.stderr)
        return 1
    return 0


def _section_pytest(work: Path, stage: str) -> list[str]:
    counts, failed, collection = pytest_counts(work / f"{stage}.xml", work / f"{stage}.log")
    source = "junit XML" if (work / f"{stage}.xml").is_file() else "the log (no junit XML was written)"
    order = ("passed", "failed", "errors", "skipped", "collection errors")
    lines = [", ".join(f"{counts.get(k, 0)} {k}" for k in order) + f" (from {source})"]
    if collection:
        lines += ["", "Collection errors (these modules' tests did not run):", *[f"- {c}" for c in collection], ""]
    if failed:
        lines += ["", f"Failed ({len(failed)}):", *[f"- `{f}`" for f in failed[:40]]]
        lines += [f"- ... and {len(failed) - 40} more (logs.tar.gz)"] if len(failed) > 40 else []
    return lines


def _section_bench(work: Path, stage: str) -> list[str]:
    tables = work / stage / "tables.txt"
    return _code(tables.read_text().rstrip().splitlines()) if tables.is_file() else ["(no tables written)"]


def _section_sanitizer(work: Path, stage: str) -> list[str]:
    """Per compute-sanitizer run in the stage's log (each begins with its "$ ... --tool X"
    line): its summary lines, its first reported problems, and how many cases matched."""
    log = work / f"{stage}.log"
    runs: list[tuple[str, list[str]]] = []
    for line in _clean_log(_read_log(log)):
        tool = re.search(r"^\$ .*--tool (\w+)", line)
        if tool:
            runs.append((tool.group(1), []))
        elif runs:
            runs[-1][1].append(line)
    lines = []
    for tool, text in runs:
        summary = [l.strip("= ") for l in text if re.search(r"(ERROR|RACECHECK|SYNCCHECK) SUMMARY", l)]
        problems = [l for l in text if l.startswith("========= ") and "SUMMARY" not in l and l.strip("= ")]
        cases = [l for l in text if re.match(r"\d+ of \d+ cases", l)]
        lines.append(f"- {tool}: " + "; ".join(summary or ["no sanitizer summary (stopped early?)"])
                     + (f"; {cases[-1]}" if cases else ""))
        lines += _code(problems[:20]) if problems else []
    return lines or ["(no compute-sanitizer run)"]


def _section_file(name: str):
    def section(work: Path, stage: str) -> list[str]:
        path = work / name
        return path.read_text().rstrip().splitlines() if path.is_file() else [f"(no {name})"]
    return section


def _section_pool_variants(work: Path, stage: str) -> list[str]:
    lines = _clean_log(_read_log(work / f"{stage}.log"))
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("n_h")), None)
    return _code(lines[start:]) if start is not None else ["(no table printed)"]


def _section_build(work: Path, stage: str) -> list[str]:
    lines = _clean_log(_read_log(work / f"{stage}.log"))
    found = [line for line in lines if line.startswith("extension: ") or line.startswith("available backends: ")]
    return found or ["(extension not importable)"]


SECTIONS = {
    "build": _section_build,
    "pytest-gpu": _section_pytest,
    "kernel-cases": _section_file("kernel-cases.md"),
    "memcheck": _section_sanitizer,
    "racecheck": _section_sanitizer,
    "sass": _section_file("sass.md"),
    "pool-variants": _section_pool_variants,
}


def merge_bench(work: Path, out: Path, ops: list[str]) -> list[str]:
    """bench.csv (every op's rows), bench.json ({"runs": [each op's bench.json]}) and each op's
    PNG into `out`; returns the names written."""
    written, header, rows, runs = [], None, [], []
    for op in ops:
        folder = work / f"bench-{op}"
        if (folder / "bench.csv").is_file():
            with open(folder / "bench.csv", newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, header)
                rows += list(reader)
        if (folder / "bench.json").is_file():
            runs.append(json.loads((folder / "bench.json").read_text()))
        if (folder / f"{op}.png").is_file():
            shutil.copyfile(folder / f"{op}.png", out / f"{op}.png")
            written.append(f"{op}.png")
    if header:
        with open(out / "bench.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([header, *rows])
        written.append("bench.csv")
    if runs:
        (out / "bench.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
        written.append("bench.json")
    return written


def write_logs_archive(work: Path, out: Path) -> list[str]:
    """logs.tar.gz of the work folder; files over 4 MiB are left out if the archive would not
    come back (over 16 MiB). Returns the names left out."""
    def build(skip: set[Path]) -> Path:
        tmp = out / ".logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(work.rglob("*")):
                if path.is_file() and path not in skip:
                    tar.add(path, arcname=str(Path("logs") / path.relative_to(work)))
        return tmp

    left_out: set[Path] = set()
    tmp = build(left_out)
    if tmp.stat().st_size > MAX_FILE_BYTES:
        left_out = {p for p in work.rglob("*") if p.is_file() and p.stat().st_size > 4 * 2**20}
        tmp = build(left_out)
    os.replace(tmp, out / "logs.tar.gz")
    return sorted(str(p.relative_to(work)) for p in left_out)


def write_summary(work: Path, out: Path, final: bool, left_out: list[str]) -> None:
    info = dict(row[:2] for row in _read_tsv(work / "info.tsv") if len(row) >= 2)
    plan = _read_tsv(work / "plan.tsv")
    done = {row[0]: row for row in _read_tsv(work / "stages.tsv")}
    running = _read_tsv(work / "running")
    lines = ["# r2m GPU check", ""]
    if final and any(row[1] == "INTERRUPTED" for row in done.values()):
        state = "**stopped** by a signal before its end"
    elif final:
        state = "complete"
    elif running:
        state = (f"**in progress**: stage `{running[0][0]}` was running when this was written; if this is "
                 "the last summary, the run was cut off there")
    else:
        state = "**in progress**"
    lines += [f"Run: {state}. Written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()] + [""]

    lines += ["## Stages", "", "| stage | status | seconds | limit s | what | note |", "|---|---|---|---|---|---|"]
    statuses = Counter()
    for name, what, *_ in plan:
        row = done.get(name)
        if row:
            _, status, seconds, limit, *note = row + [""] * (5 - len(row))
        else:
            status, seconds, limit, note = ("RUNNING" if running and running[0][0] == name else
                                            "NOT RUN" if final else "pending"), "", "", [""]
        statuses[status] += 1
        lines.append(f"| {name} | {status} | {seconds} | {limit} | {what} | {note[0] if note else ''} |")
    lines += ["", ", ".join(f"{n} {s}" for s, n in statuses.items()), ""]

    for name, what, *_ in plan:
        if name not in done:
            continue
        status = done[name][1]
        section = _section_bench if name.startswith("bench-") else SECTIONS.get(name)
        lines += [f"## {name}: {status}", ""]
        if status == "SKIPPED":
            lines += [f"Not run: {done[name][4] if len(done[name]) > 4 else ''}", ""]
        elif section:
            lines += section(work, name) + [""]
        if status not in ("PASS", "SKIPPED") and (work / f"{name}.log").is_file():
            lines += [f"Last lines of `{name}.log`:", *_code(_log_tail(work / f"{name}.log")), ""]

    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    files = sorted(set(files) | {"summary.md"})
    lines += ["## Files", "", f"In this folder ({len(files)} of at most {MAX_FILES}): " + ", ".join(files) + ".",
              "logs.tar.gz holds every stage's log, the junit XML, each bench op's own folder, the "
              "kernel-case reports and the SASS listing."]
    if left_out:
        lines.append("Left out of logs.tar.gz to keep it under 16 MiB: " + ", ".join(left_out) + ".")
    if len(files) > MAX_FILES:
        lines.append(f"**More than {MAX_FILES} files here: the device tool returns only {MAX_FILES}.**")
    tmp = out / ".summary.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "summary.md")


def cmd_publish(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    ops = [row[0].removeprefix("bench-") for row in _read_tsv(args.work / "plan.tsv") if row[0].startswith("bench-")]
    merge_bench(args.work, args.out, ops)
    left_out = write_logs_archive(args.work, args.out)
    write_summary(args.work, args.out, args.final, left_out)
    return 0


# ---- command line ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    which = sub.add_parser("which", help="path of a CUDA tool")
    which.add_argument("name")
    which.set_defaults(fn=cmd_which)
    pre = sub.add_parser("preflight", help="the dry run's Python checks")
    pre.add_argument("--bench", action="append", default=[], help="arguments of one `r2m bench` call")
    pre.add_argument("--script", action="append", default=[], help="a script a stage runs (imported, not run)")
    pre.add_argument("--cases-args", action="append", default=[], help="arguments of one gpu_kernel_cases.py call")
    pre.set_defaults(fn=cmd_preflight)
    sass = sub.add_parser("sass", help="SASS check of the cuda extension (Triton kernels reported)")
    sass.add_argument("--cuobjdump", required=True)
    sass.add_argument("--extension", type=Path, required=True)
    sass.add_argument("--triton-cache", type=Path)
    sass.add_argument("--report", type=Path, required=True)
    sass.add_argument("--listing", type=Path, help="write the extension's full SASS here")
    sass.set_defaults(fn=cmd_sass)
    counts = sub.add_parser("pytest-counts", help="outcomes of a pytest run from its junit XML or verbose log")
    counts.add_argument("--xml", type=Path, required=True)
    counts.add_argument("--log", type=Path, required=True)
    counts.add_argument("--require-passed", action="store_true", help="exit 1 unless some test passed")
    counts.set_defaults(fn=cmd_pytest_counts)
    pub = sub.add_parser("publish", help="write summary.md, the merged bench files and logs.tar.gz")
    pub.add_argument("--work", type=Path, required=True)
    pub.add_argument("--out", type=Path, required=True)
    pub.add_argument("--final", action="store_true")
    pub.set_defaults(fn=cmd_publish)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
