#!/usr/bin/env bash
# Everything owed to a GPU, in one call: build the CUDA extension, run the gpu tests, the
# benchmarks, compute-sanitizer and the SASS check, each stage under its own time limit.
#
#   bash scripts/gpu_check.sh --out DIR [--budget SECONDS] [--stages a,b,...] [--label TEXT]
#   bash scripts/gpu_check.sh --dry-run [--out DIR] [--budget SECONDS] [--stages a,b,...]
#   (--python PYTHON picks the interpreter; python3 by default; --budget 540 by default)
#
# Through the device tool, from the repository root:
#   bash scripts/gpu_check.sh --out $OUT/gpu --budget 540          (timeout_s 600)
#
# Stage limits are shares of the time still left, by weight, never under a stage's minimum,
# leaving the later stages theirs where that does not cut an earlier one below its own; a
# stage that needs less hands its time on. A stage
# that runs out of time is marked TIMEOUT (it gets Ctrl-C first, so pytest still writes its
# report) and the next one runs. --stages reruns a subset (build is cheap to repeat on a warm
# machine: it builds in place, into build/cuda/, and ninja recompiles only what changed).
#
# DIR receives at most 8 files (the device tool returns 8): summary.md, logs.tar.gz,
# bench.csv, bench.json and one PNG per bench op (pool, head, grebt, update). summary.md and
# logs.tar.gz are rewritten after every stage, so a run cut short keeps what finished.
# Exit status: 0 when every stage passed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=(-m tests.support.gpu_check)   # "$PYTHON" "${TOOLS[@]}" SUBCOMMAND ...
CASES=(-m tests.support.kernel_cases)

# name | weight | minimum seconds | what it checks
# build's minimum: a cold build (setup.py build_ext --inplace, -g0, sm_90 alone) took BUILD_NEED s on a 2-core
# CPU with MAX_JOBS=2; the GPU machine's 16 cores compile the three sources side by side, so it
# is an upper bound there (binding.cpp alone took 46 s of CPU).
STAGE_TABLE='
build|12|90|CUDA extension r2m_kernels._cuda built in place for this GPU'"'"'s architecture
pytest-gpu|30|90|pytest -m gpu: triton and cuda against float64, bf16/fp16/fp32
bench-pool|10|45|r2m bench pool at paper-8b and heads, every backend
bench-head|12|60|r2m bench head (with torch.compile) at paper-8b and heads
bench-grebt|5|30|r2m bench grebt at paper-8b (64 groups of 8) and groups-16k
bench-update|7|40|r2m bench update at paper-8b and heads
kernel-cases|5|30|each kernel once at small odd sizes against float64 (fills the Triton cache)
memcheck|9|45|compute-sanitizer memcheck on those cases, triton and cuda
racecheck|6|30|compute-sanitizer racecheck then synccheck on the cuda cases
sass|2|15|cuda SASS: 128-bit loads in the pool kernels, no local memory (Triton reported)
bench-pool-variants|4|30|r2m bench pool --pool-variants: per-head against many-head Triton pool, n_h 1..32
'
declare -a STAGES=()
declare -A WEIGHT=() MINIMUM=() WHAT=()
while IFS='|' read -r name weight minimum what; do
  [[ -n "$name" ]] || continue
  STAGES+=("$name"); WEIGHT[$name]=$weight; MINIMUM[$name]=$minimum; WHAT[$name]=$what
done <<<"$STAGE_TABLE"

# Sizes per bench op. grebt's cost does not depend on n_h, so heads would repeat paper-8b:
# it runs at its large case (16k groups) instead.
# pool-variants: both variants of the Triton pool, each forced, over n_h (what places MANY_HEADS_MIN).
declare -A BENCH_OPTIONS=([pool]="--ops pool --sizes paper-8b heads" [head]="--ops head --sizes paper-8b heads"
                          [grebt]="--ops grebt --sizes paper-8b groups-16k" [update]="--ops update --sizes paper-8b heads"
                          [pool-variants]="--ops pool --sizes heads --num-heads 1,2,4,8,16,32 --backends triton --pool-variants")
PYTEST_SELECTION=(-m gpu tests -p no:cacheprovider --continue-on-collection-errors)
# The most valuable first (the kernels against float64, then the error contract, then the rest;
# tests/conftest.py orders them): a run cut short by its limit has done those, and its summary
# names what it did not reach. (pytest collects overlapping paths in its own order.)
export R2M_RUN_FIRST="tests/kernels/ tests/api/"
BUILD_NEED=82       # seconds, measured (above); the dry run checks the build's limit against it
RESERVE=10          # seconds kept for the last summary
MIN_STAGE=10        # a stage with less than this left is skipped
KILL_AFTER=10       # seconds between Ctrl-C and SIGKILL for a stage's command

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { echo "gpu_check: $*" >&2; exit 2; }

OUT_DIR="" BUDGET=540 DRY_RUN=0 LABEL="" SELECTED="" PYTHON=${PYTHON:-python3}
while (( $# )); do
  case "$1" in
    --out) OUT_DIR=${2:?--out needs a folder}; shift 2 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --stages) SELECTED=${2:?--stages needs a comma-separated list}; shift 2 ;;
    --label) LABEL=${2:?--label needs a text}; shift 2 ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "--budget must be a whole number of seconds, got '$BUDGET'"
DRY_OUT_TEMPORARY=0
if (( DRY_RUN )); then
  [[ -n "$OUT_DIR" ]] || { OUT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/r2m-gpu-check-dry.XXXXXX"); DRY_OUT_TEMPORARY=1; }
else
  [[ -n "$OUT_DIR" ]] || die "--out DIR is required (see --help)"
fi
if [[ -n "$SELECTED" ]]; then
  declare -a CHOSEN=()
  IFS=',' read -r -a wanted <<<"$SELECTED"
  for name in "${wanted[@]}"; do
    [[ -n "${WEIGHT[$name]:-}" ]] || die "unknown stage '$name'; stages: ${STAGES[*]}"
  done
  for name in "${STAGES[@]}"; do  # table order, whatever order they were given in
    [[ ",$SELECTED," == *",$name,"* ]] && CHOSEN+=("$name")
  done
  STAGES=("${CHOSEN[@]}")
fi

# ---- time -------------------------------------------------------------------------------------

# Seconds for stage $1 when $2 seconds of the budget are used: its weight's share of what is
# left, at least its minimum, leaving every later stage its minimum unless that would cut this
# one below its own (earlier stages come first).
stage_limit() {
  local stage=$1 used=$2 left later_min=0 weights=0 seen=0 share limit cap name
  left=$(( BUDGET - RESERVE - used ))
  for name in "${STAGES[@]}"; do
    [[ "$name" == "$stage" ]] && seen=1
    (( seen )) || continue
    weights=$(( weights + WEIGHT[$name] ))
    [[ "$name" != "$stage" ]] && later_min=$(( later_min + MINIMUM[$name] ))
  done
  share=$(( left * WEIGHT[$stage] / weights ))
  limit=$(( share > MINIMUM[$stage] ? share : MINIMUM[$stage] ))
  cap=$(( left - later_min ))
  (( cap < MINIMUM[$stage] )) && cap=${MINIMUM[$stage]}
  (( limit > cap )) && limit=$cap
  (( limit > left )) && limit=$left
  echo $(( limit > 0 ? limit : 0 ))
}

# Runs a command until the current stage's deadline: Ctrl-C then, SIGKILL KILL_AFTER later.
# Exit status 124 when the time ran out. In a dry run it prints the command instead.
# timeout runs in the background and is waited for, so that a signal to this script reaches
# finish() at once (bash defers traps while a foreground command runs); timeout leads its own
# process group, which finish() interrupts.
limited() {
  if (( DRY_RUN )); then echo "    \$ $*"; return 0; fi
  local left=$(( STAGE_DEADLINE - SECONDS )) rc=0
  (( left > 0 )) || return 124
  echo "\$ $*"
  timeout --signal=INT --kill-after="$KILL_AFTER" "$left" "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}

# ---- stages (each writes to its log; returns 0 pass, 124 out of time, else fail; NOTE is
#      one line for the summary's table) ------------------------------------------------------

stage_build() {
  local arch=9.0  # this GPU's compute capability; nvcc builds for it alone
  if (( ! DRY_RUN )); then
    arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null) || arch=9.0
  fi
  local toolkit
  # torch derives the toolkit from nvcc's location, wrong where nvcc is a wrapper script.
  if ! toolkit=$("$PYTHON" "${TOOLS[@]}" cuda-home 2>/dev/null | cut -f1) || [[ -z "$toolkit" ]]; then
    (( DRY_RUN )) && toolkit="(the toolkit found there)" || { NOTE="no CUDA toolkit found"; return 2; }
  fi
  NOTE="sm $arch, CUDA_HOME=$toolkit"
  # In place: the module lands in r2m_kernels/ and the objects in build/cuda/ (both git-ignored),
  # nothing is written into the Python environment, and a second build recompiles only what
  # changed. Tests and benchmarks import r2m from the tree (they run from its root).
  limited env CUDA_HOME="$toolkit" MAX_JOBS="$(nproc)" R2M_CUDA_ARCHS="$arch" \
    "$PYTHON" setup.py build_ext --inplace || return
  limited "$PYTHON" -c 'import r2m_kernels, r2m_kernels._cuda as ext; print("extension:", ext.__file__); print("available backends:", r2m_kernels.available_backends())'
}

stage_pytest_gpu() {
  local extra=()
  # The GPU machine has both plugins; without them the stage runs serially, with no per-test limit.
  local workers=$(( $(nproc) / 2 > 8 ? 8 : $(nproc) / 2 ))
  if "$PYTHON" -c 'import xdist' 2>/dev/null; then extra+=(-n "$(( workers > 1 ? workers : 1 ))"); fi
  if "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then extra+=(--timeout 300 -o timeout_method=thread); fi
  local rc=0
  limited env R2M_COLLECTED_IDS="$WORK/pytest-gpu-collected.txt" \
    "$PYTHON" -m pytest "${PYTEST_SELECTION[@]}" -v --junitxml="$WORK/pytest-gpu.xml" \
    ${extra[@]+"${extra[@]}"} || rc=$?
  (( DRY_RUN || rc != 0 )) && return "$rc"
  # All skipped (torch saw no GPU) is no pass.
  "$PYTHON" "${TOOLS[@]}" pytest-counts --xml "$WORK/pytest-gpu.xml" --log "$WORK/pytest-gpu.log" --require-passed
}

bench_args() {  # BENCH_ARGS: the arguments of `r2m bench` for op $1 (the dry run checks them too)
  # shellcheck disable=SC2206  # the sizes are separate words
  BENCH_ARGS=(--device cuda ${BENCH_OPTIONS[$1]} --out "$WORK/bench-$1")
}
bench() {
  bench_args "$1"
  limited "$PYTHON" -m r2m.cli bench "${BENCH_ARGS[@]}"
}
stage_bench_pool() { bench pool; }
stage_bench_head() { bench head; }
stage_bench_grebt() { bench grebt; }
stage_bench_update() { bench update; }
stage_bench_pool_variants() { bench pool-variants; }

stage_kernel_cases() {
  limited "$PYTHON" "${CASES[@]}" --report "$WORK/kernel-cases.md"
}

find_sanitizer() {
  SANITIZER=$("$PYTHON" "${TOOLS[@]}" which compute-sanitizer 2>/dev/null) && return 0
  (( DRY_RUN )) && SANITIZER=compute-sanitizer && return 0
  NOTE="compute-sanitizer not found"
  echo "$NOTE"
  return 2
}

# A sanitizer that refuses the device ("Device not supported", then error 999 at the first
# allocation) fails within seconds: status UNAVAILABLE (exit 75), not errors found (exit 3),
# and the later sanitizer stages do not try again. Reads the stage's log ($1).
SANITIZER_REFUSED=""
sanitizer_verdict() {
  local log=$1 rc=$2 refused
  (( rc == 0 || rc == 124 || rc == 137 )) && return "$rc"
  refused=$(grep -m1 -E "Device not supported|error 999|CUDA_ERROR_UNKNOWN|unknown error|Target application terminated before first instrumented API call" "$log" || true)
  if (( rc != 3 )) && [[ -n "$refused" ]]; then
    SANITIZER_REFUSED=$refused NOTE="compute-sanitizer unavailable on this device: $refused"
    return 75
  fi
  (( rc == 3 )) && NOTE="errors found (see the log)"
  return "$rc"
}

sanitizer_usable() {
  [[ -z "$SANITIZER_REFUSED" ]] && return 0
  NOTE="compute-sanitizer unavailable on this device (memcheck): $SANITIZER_REFUSED"
  return 1
}

stage_memcheck() {
  find_sanitizer || return
  sanitizer_usable || return 75
  local rc=0
  # Without the caching allocator each tensor is its own allocation, so memcheck sees an
  # access past any tensor's end. API errors are torch's own probing, not the kernels'.
  limited env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --report-api-errors no \
    --error-exitcode 3 "$PYTHON" "${CASES[@]}" --report "$WORK/memcheck-cases.md" || rc=$?
  (( DRY_RUN )) || sanitizer_verdict "$WORK/memcheck.log" "$rc"
}

stage_racecheck() {
  find_sanitizer || return
  sanitizer_usable || return 75
  local race=0 sync=0 deadline=$STAGE_DEADLINE
  STAGE_DEADLINE=$(( SECONDS + (deadline - SECONDS) / 2 ))  # racecheck: the first half
  limited "$SANITIZER" --tool racecheck --racecheck-report all --report-api-errors no --error-exitcode 3 \
    "$PYTHON" "${CASES[@]}" --backends cuda --report "$WORK/racecheck-cases.md" || race=$?
  if (( ! DRY_RUN )); then
    sanitizer_verdict "$WORK/racecheck.log" "$race" || race=$?
    (( race == 75 )) && return 75
  fi
  STAGE_DEADLINE=$deadline
  limited "$SANITIZER" --tool synccheck --report-api-errors no --error-exitcode 3 \
    "$PYTHON" "${CASES[@]}" --backends cuda --report "$WORK/synccheck-cases.md" || sync=$?
  (( DRY_RUN )) || sanitizer_verdict "$WORK/racecheck.log" "$sync" || sync=$?
  return $(( race != 0 ? race : sync ))
}

stage_sass() {  # tests/kernels/test_sass.py: cuobjdump on the built extension and the Triton cache
  local rc=0
  limited env R2M_SASS_REPORT="$WORK/sass.md" "$PYTHON" -m pytest tests/kernels/test_sass.py -m gpu \
    -p no:cacheprovider -v -s --junitxml="$WORK/sass.xml" || rc=$?
  (( DRY_RUN || rc != 0 )) && return "$rc"
  # Skipped (torch saw no GPU) is no pass.
  "$PYTHON" "${TOOLS[@]}" pytest-counts --xml "$WORK/sass.xml" --log "$WORK/sass.log" --require-passed
}


# ---- bookkeeping ------------------------------------------------------------------------------

publish() {
  "$PYTHON" "${TOOLS[@]}" publish --work "$WORK" --out "$OUT_DIR" "$@" ||
    echo "gpu_check: could not write $OUT_DIR/summary.md" >&2
}

record() {  # name status seconds limit note; the line on the console (fd 3) too
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/stages.tsv"
  rm -f "$WORK/running"
  printf '[%4d s] %-14s %-11s %4s s of %4s s  %s\n' "$SECONDS" "$1" "$2" "$3" "$4" "$5" >&3
}

run_stage() {
  local name=$1 limit start rc=0 status
  limit=$(stage_limit "$name" "$SECONDS")
  if (( limit < MIN_STAGE )); then
    record "$name" SKIPPED 0 "$limit" "not enough of the budget left"
    publish
    return
  fi
  NOTE="" start=$SECONDS STAGE_DEADLINE=$(( SECONDS + limit ))
  printf '%s\t%s\t%s\n' "$name" "$limit" "$(date +%s)" >"$WORK/running"
  "stage_${name//-/_}" >"$WORK/$name.log" 2>&1 || rc=$?
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT ;;
    75) status=UNAVAILABLE ;;
    *) status=FAIL ;;
  esac
  record "$name" "$status" "$(( SECONDS - start ))" "$limit" "$NOTE"
  publish
}

# The device tool copies the working tree without .git: the dry run records the commit in
# COMMIT_FILE (git-ignored; the device call carries it), which the summary falls back to.
COMMIT_FILE="$ROOT/.gpu-check-commit"
commit_line() {
  git -C "$ROOT" describe --always --dirty 2>/dev/null && return
  [[ -s "$COMMIT_FILE" ]] && echo "$(head -n 1 "$COMMIT_FILE") (recorded by the dry run; no .git in this copy)" && return
  echo "unknown (no .git in this copy, and no $COMMIT_FILE from a dry run)"
}

collect_info() {
  local info="$WORK/info.tsv"
  {
    printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    [[ -n "$LABEL" ]] && printf 'label\t%s\n' "$LABEL"
    printf 'command\tbash scripts/gpu_check.sh %s\n' "$ARGS"
    printf 'budget\t%s s (stages: %s)\n' "$BUDGET" "${STAGES[*]}"
    printf 'commit\t%s\n' "$(commit_line)"
    printf 'gpu\t%s\n' "$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
      --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
    timeout 60 "$PYTHON" - <<'EOF' 2>/dev/null || printf 'python\tfailed to import torch\n'
import platform, torch, triton
print(f"python\t{platform.python_version()}")
print(f"torch\t{torch.__version__} (CUDA {torch.version.cuda})")
print(f"triton\t{triton.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device\t{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm {p.major}.{p.minor}")
EOF
    local tool
    tool=$("$PYTHON" "${TOOLS[@]}" which nvcc 2>/dev/null) &&
      printf 'nvcc\t%s\n' "$(timeout 20 "$tool" --version 2>/dev/null | grep -i release)"
    tool=$("$PYTHON" "${TOOLS[@]}" which compute-sanitizer 2>/dev/null) &&
      printf 'compute-sanitizer\t%s\n' "$(timeout 20 "$tool" --version 2>/dev/null | grep -i version | head -n 1)"
    printf 'cpus\t%s\n' "$(nproc)"
  } >"$info"
}

finish() {
  local rc=$? tick
  trap - EXIT INT TERM HUP
  if [[ -n "${CHILD:-}" ]] && kill -0 "$CHILD" 2>/dev/null; then  # stopped during a command
    kill -INT -- "-$CHILD" 2>/dev/null || true  # Ctrl-C: pytest still writes its report
    for tick in $(seq 20); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$CHILD" 2>/dev/null || true
  fi
  if [[ -f "$WORK/running" ]]; then
    local name limit started
    IFS=$'\t' read -r name limit started <"$WORK/running"
    record "$name" INTERRUPTED "$(( $(date +%s) - started ))" "$limit" "the script was stopped during this stage"
  fi
  publish --final
  echo "gpu_check: $OUT_DIR/summary.md" >&3
  exit "$rc"
}

# ---- dry run ----------------------------------------------------------------------------------

dry_run() {
  local failed=0 used=0 limit name
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/r2m-gpu-check-dry-work.XXXXXX")
  TRITON_CACHE_DIR="$WORK/triton-cache" NOTE="" STAGE_DEADLINE=0
  check() {  # ok text / fail text
    if [[ "$1" == ok ]]; then echo "  ok   $2"; else echo "  FAIL $2"; failed=1; fi
  }

  # pytest collection is the slowest check: it runs beside all the others.
  local collect_log="$WORK/collect.log" collect_pid
  # As a GPU machine collects them: torch reports a CUDA device (tests/support/as_if_cuda.py).
  TRITON_INTERPRET=1 "$PYTHON" -m pytest -p tests.support.as_if_cuda "${PYTEST_SELECTION[@]}" --collect-only -q \
    >"$collect_log" 2>&1 &
  collect_pid=$!

  echo "gpu_check dry run: budget $BUDGET s, ${#STAGES[@]} stages, output $OUT_DIR"
  local commit
  if commit=$(git -C "$ROOT" describe --always --dirty 2>/dev/null); then
    echo "$commit" >"$COMMIT_FILE"
    echo "commit $commit recorded in $COMMIT_FILE (carry it to the device: it copies no .git)"
  fi
  echo "stages (limits if each stage used all of its time; a faster stage hands its time on):"
  declare -A PLANNED=()
  for name in "${STAGES[@]}"; do
    limit=$(stage_limit "$name" "$used")
    PLANNED[$name]=$limit
    printf '  %-14s %4s s  %s\n' "$name" "$limit" "${WHAT[$name]}"
    "stage_${name//-/_}"
    used=$(( used + limit ))
  done

  echo "checks:"
  if [[ -n "${PLANNED[build]:-}" ]]; then
    (( PLANNED[build] >= BUILD_NEED )) && check ok "build limit ${PLANNED[build]} s >= the measured cold build, $BUILD_NEED s" ||
      check fail "build limit ${PLANNED[build]} s < the measured cold build, $BUILD_NEED s (raise --budget)"
    local tree_build
    tree_build=$("$PYTHON" -c 'from r2m_kernels.cuda.build import BUILD_TEMP; print(BUILD_TEMP)' 2>/dev/null) &&
      git -C "$ROOT" check-ignore -q "$tree_build" 2>/dev/null &&
      check ok "build folder: $ROOT/$tree_build (in the tree, git-ignored: a rerun is incremental)" ||
      check fail "build folder: r2m_kernels.cuda.build.BUILD_TEMP is not a git-ignored folder in the tree"
  fi
  (( BASH_VERSINFO[0] > 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] >= 4) )) &&
    check ok "bash $BASH_VERSION" || check fail "bash $BASH_VERSION: 4.4 or newer needed"
  for name in timeout nproc mktemp; do
    command -v "$name" >/dev/null && check ok "$name" || check fail "$name: not found"
  done
  if "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    check ok "python: $(command -v "$PYTHON" || echo "$PYTHON") ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"
    local args=() op
    for op in pool head grebt update pool-variants; do
      [[ " ${STAGES[*]} " == *" bench-$op "* ]] && bench_args "$op" && args+=(--bench "${BENCH_ARGS[*]}")
    done
    local preflight
    preflight=$("$PYTHON" "${TOOLS[@]}" preflight ${args[@]+"${args[@]}"} \
      --cases-args "--report x.md" --cases-args "--backends cuda --report x.md" 2>&1) || failed=1
    echo "$preflight" | sed 's/^/  /'
  else
    check fail "python: '$PYTHON' is not a Python 3.10+ interpreter (--python)"
  fi

  local collected gpu_tests
  if wait "$collect_pid"; then
    collected=$(grep -Eo '^[0-9]+(/[0-9]+)? tests? collected' "$collect_log" | tail -n 1)
    gpu_tests=${collected%%[/ ]*}
    check ok "pytest collects the gpu tests as a GPU machine would: ${collected:-see log} (${PYTEST_SELECTION[*]})"
    if [[ " ${STAGES[*]} " == *" pytest-gpu "* && -n "$gpu_tests" ]]; then
      echo "         pytest-gpu: $gpu_tests tests in ${PLANNED[pytest-gpu]} s (kernels first: a run cut short names what it left)"
    fi
  else
    check fail "pytest collection of the gpu tests failed: $(grep -E 'ERROR|error' "$collect_log" | head -n 3 | tr '\n' ' ')"
  fi

  local probe
  if mkdir -p "$OUT_DIR" && probe=$(mktemp "$OUT_DIR/.write-test.XXXXXX") && rm -f "$probe"; then
    check ok "output folder writable: $OUT_DIR"
  else
    check fail "output folder not writable: $OUT_DIR"
  fi
  local files=2  # summary.md, logs.tar.gz
  # One PNG per bench op (bench-OP/OP.png); the pool-variants sweep's plot (pool.png) stays in logs.tar.gz.
  for name in "${STAGES[@]}"; do
    [[ "$name" == bench-* && "$name" != bench-pool-variants ]] && files=$(( files + 1 ))
  done
  [[ " ${STAGES[*]} " == *" bench-"* ]] && files=$(( files + 2 ))  # bench.csv, bench.json
  (( files <= 8 )) && check ok "files written to the output folder: $files (the device tool returns 8)" ||
    check fail "files written to the output folder: $files, over the device tool's 8"

  echo "on the GPU machine only (not needed here):"
  local toolkit
  toolkit=$("$PYTHON" "${TOOLS[@]}" cuda-home 2>/dev/null) && echo "  found   CUDA toolkit: ${toolkit%%$'\t'*} (${toolkit#*$'\t'}; the build's CUDA_HOME)" ||
    echo "  missing CUDA toolkit (the build stage fails without one)"
  for name in nvidia-smi nvcc compute-sanitizer cuobjdump; do
    local path
    path=$("$PYTHON" "${TOOLS[@]}" which "$name" 2>/dev/null) && echo "  found   $name: $path" ||
      echo "  missing $name"
  done
  rm -rf "$WORK"
  (( DRY_OUT_TEMPORARY )) && rmdir "$OUT_DIR"
  if (( failed )); then echo "dry run FAILED"; return 1; fi
  echo "dry run passed"
}

# ---- main -------------------------------------------------------------------------------------

# Every Python process imports the checkout being checked, installed or not; every command
# runs from its root.
[[ "$PYTHON" == */* && "$PYTHON" != /* ]] && PYTHON="$PWD/$PYTHON"  # before the cd below
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"
exec 3>&1  # the console, for lines written while a stage's output goes to its log
CHILD=""
if (( DRY_RUN )); then
  dry_run
  exit
fi

ARGS="--out $OUT_DIR --budget $BUDGET${SELECTED:+ --stages $SELECTED}${LABEL:+ --label '$LABEL'}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/r2m-gpu-check.XXXXXX")
# The Triton cache outlives the run (a rerun on a warm machine compiles nothing) and holds only
# what these stages compile, for the SASS report.
export TRITON_CACHE_DIR="${TMPDIR:-/tmp}/r2m-gpu-check-cache/triton"
# The extension comes from the build stage; a JIT build inside a test would hide its failure.
export R2M_CUDA_JIT=0
for name in "${STAGES[@]}"; do printf '%s\t%s\n' "$name" "${WHAT[$name]}"; done >"$WORK/plan.tsv"
trap finish EXIT
trap 'exit 130' INT TERM HUP
collect_info
echo "gpu_check: ${#STAGES[@]} stages in $BUDGET s; work folder $WORK; results in $OUT_DIR"
publish
for name in "${STAGES[@]}"; do
  # Autotune timings are cached on disk for the kernel-case runs only, so that the sanitizer
  # runs do not autotune under instrumentation; tests and benchmarks autotune for themselves.
  if [[ "$name" == kernel-cases || "$name" == memcheck || "$name" == racecheck ]]; then
    export TRITON_CACHE_AUTOTUNING=1
  else
    unset TRITON_CACHE_AUTOTUNING
  fi
  run_stage "$name"
done
FAILED=$(cut -f2 "$WORK/stages.tsv" | grep -vc '^PASS$' || true)
(( FAILED == 0 ))
