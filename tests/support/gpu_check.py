"""The Python side of scripts/gpu_check.sh: finding CUDA tools, the dry run's Python checks,
pytest outcome counts, and publishing (summary.md, the merged benchmark files, logs.tar.gz).

Only the standard library at import time, so that the summary is written even where torch
or the package is broken; `preflight` imports the project on purpose.

    python -m tests.support.gpu_check which cuobjdump
    python -m tests.support.gpu_check cuda-home
    python -m tests.support.gpu_check preflight --bench "--ops pool --sizes paper-8b" --cases-args "--backends cuda"
    python -m tests.support.gpu_check pytest-counts --xml X.xml --log X.log [--require-passed]
    python -m tests.support.gpu_check publish --work WORK --out OUT [--final]
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

ROOT = Path(__file__).resolve().parents[2]

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


def _is_toolkit(folder: Path) -> bool:
    return (folder / "bin" / "nvcc").is_file() and (folder / "include" / "cuda_runtime.h").is_file()


def _nvcc_top(nvcc: str) -> Path | None:
    """The toolkit folder nvcc itself reports (its TOP in a dry run), so that an nvcc on PATH
    that is a wrapper script or a symlink still leads to the real toolkit."""
    try:
        done = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", done.stdout + done.stderr, re.M)
    return Path(top.group(1).strip()).resolve() if top else None


def usual_cuda_locations() -> list[Path]:
    """/usr/local/cuda, then /usr/local/cuda-X.Y from the newest, then /opt/cuda."""
    versioned = sorted(Path("/usr/local").glob("cuda-*"), key=lambda p: [int(n) for n in re.findall(r"\d+", p.name)],
                       reverse=True)
    return [Path("/usr/local/cuda"), *versioned, Path("/opt/cuda")]


def find_cuda_home(usual_locations=usual_cuda_locations) -> tuple[Path, str] | None:
    """(the CUDA toolkit, how it was found): CUDA_HOME or CUDA_PATH where they hold a toolkit,
    then the usual locations, then the toolkit the nvcc on PATH reports. torch derives the
    toolkit from nvcc's own location, which is wrong where nvcc is a wrapper script (the build
    then fails with `cuda_runtime.h: No such file or directory`)."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value and _is_toolkit(Path(value)):
            return Path(value), variable
    for folder in usual_locations():
        if _is_toolkit(folder):
            return folder, "usual location"
    nvcc = shutil.which("nvcc")
    top = _nvcc_top(nvcc) if nvcc else None
    if top is not None and _is_toolkit(top):
        return top, f"reported by {nvcc}"
    return None


def cmd_cuda_home(args) -> int:
    found = find_cuda_home()
    if found is None:
        print("no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) in CUDA_HOME, CUDA_PATH, /usr/local/cuda*, "
              "/opt/cuda or where the nvcc on PATH points", file=sys.stderr)
        return 1
    print(f"{found[0]}\t{found[1]}")
    return 0


def cmd_which(args) -> int:
    path = find_cuda_tool(args.name)
    if path is None:
        print(f"{args.name}: not found on PATH, in the CUDA toolkit or in Triton's package", file=sys.stderr)
        return 1
    print(path)
    return 0


# ---- preflight: the dry run's Python-side checks ---------------------------------------------------

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
        from r2m.cli import bench

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

    try:
        driver = importlib.import_module("tests.support.kernel_cases")
        for text in args.cases_args:
            parsed = driver._parse_args(shlex.split(text))
            cases = driver.selected_cases(parsed.backends, parsed.match)
            per_backend = Counter(c.backend for c in cases)
            report(bool(cases), f"kernel_cases {text}: {len(cases)} cases ("
                   + ", ".join(f"{b} {n}" for b, n in per_backend.items()) + ")")
    except (Exception, SystemExit) as exc:
        report(False, f"tests.support.kernel_cases: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


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


# The outcome word of a verbose pytest line, serial or from xdist.
OUTCOME_WORD = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


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
        match = OUTCOME_WORD.search(line)
        if match and "::" in line:
            outcome = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(
                match.group(1), "skipped")
            counts[outcome] += 1
            if outcome in ("failed", "errors"):
                failed.append(next(w for w in line.split() if "::" in w))
    return dict(counts), failed, collection


def _test_key(nodeid: str) -> str:
    """A pytest node id ("tests/k/test_a.py::Class::test[p]") as junit XML spells a test
    (classname "tests.k.test_a.Class", name "test[p]"), joined by a dot."""
    path, *rest = nodeid.split("::")
    return ".".join([path.removesuffix(".py").replace("/", "."), *rest])


def not_reached(collected_path: Path, xml_path: Path, log_path: Path) -> tuple[int, list[str]]:
    """(how many tests pytest collected, the ids of those with no outcome in the junit XML, or
    in the verbose log where pytest wrote no XML): the tests a run cut short did not reach."""
    if not collected_path.is_file():
        return 0, []
    collected = [line for line in collected_path.read_text().splitlines() if line]
    reached = set()
    try:
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            reached.add(f"{case.get('classname', '')}.{case.get('name', '')}")
    except (OSError, ET.ParseError):
        for line in _clean_log(_read_log(log_path)):
            if OUTCOME_WORD.search(line):
                reached.update(_test_key(word) for word in line.split() if "::" in word)
    return len(collected), [nodeid for nodeid in collected if _test_key(nodeid) not in reached]


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
    collected, missing = not_reached(work / f"{stage}-collected.txt", work / f"{stage}.xml", work / f"{stage}.log")
    if missing:
        per_file = Counter(nodeid.split("::")[0] for nodeid in missing)
        lines += ["", f"Not reached ({len(missing)} of {collected} collected; the run was cut short):",
                  *[f"- {path}: {n}" for path, n in sorted(per_file.items())]]
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
              "kernel-case reports and the SASS report."]
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
    home = sub.add_parser("cuda-home", help="the CUDA toolkit to build with, and how it was found (tab-separated)")
    home.set_defaults(fn=cmd_cuda_home)
    pre = sub.add_parser("preflight", help="the dry run's Python checks")
    pre.add_argument("--bench", action="append", default=[], help="arguments of one `r2m bench` call")
    pre.add_argument("--cases-args", action="append", default=[], help="arguments of one tests.support.kernel_cases call")
    pre.set_defaults(fn=cmd_preflight)
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
