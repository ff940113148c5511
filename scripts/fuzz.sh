#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, docs/fuzzing.md) with clang in build-fuzz and runs each
# over its seed corpus (fuzz/corpus/<target>/).
#   scripts/fuzz.sh                  short: a fixed number of runs per target (the test suite's step)
#   scripts/fuzz.sh --long SECONDS   each target for SECONDS (-max_total_time)
#   scripts/fuzz.sh --runs N         each target for N runs
#   scripts/fuzz.sh ... TARGET...    only these targets
# New inputs go to a temporary copy of the corpus, so the repository's corpus does not grow; a
# crash, a leak or a sanitizer report leaves its input in build-fuzz/artifacts/ and makes the
# script exit non-zero. Prints each target's executions per second.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

targets_all=(fuzz_ws_message fuzz_ws_frames fuzz_http_request fuzz_token fuzz_booking_json fuzz_resume fuzz_json_text)
# Short mode: runs per target, a few seconds each on a 2-core VM (docs/fuzzing.md has the numbers).
declare -A short_runs=([fuzz_ws_message]=3000 [fuzz_ws_frames]=50000 [fuzz_http_request]=20000 [fuzz_token]=20000
  [fuzz_booking_json]=20000 [fuzz_resume]=20000 [fuzz_json_text]=30000)
runs=""
long_seconds=""
targets=()
while (($#)); do
  case $1 in
    --long) long_seconds=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    fuzz_*) targets+=("$1"); shift ;;
    *) echo "fuzz.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
((${#targets[@]})) || targets=("${targets_all[@]}")

build=build-fuzz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CC=${FUZZ_CC:-clang} CXX=${FUZZ_CXX:-clang++}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPUSHBOOK_WERROR=ON \
  -DPUSHBOOK_FUZZ=ON -DPUSHBOOK_BUILD_TESTS=OFF -DPUSHBOOK_BUILD_EXAMPLES=OFF \
  -DPUSHBOOK_BUILD_BENCH=OFF -DPUSHBOOK_BUILD_PYTHON=OFF -DPUSHBOOK_INSTALL=OFF \
  >"$work/configure.log" 2>&1 || { cat "$work/configure.log"; exit 1; }
cmake --build "$build" --target "${targets[@]}"

# Leaks count as failures; a sanitizer report aborts the run (libFuzzer saves the input).
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
artifacts="$root/$build/artifacts"
mkdir -p "$artifacts"

failed=()
for t in "${targets[@]}"; do
  cp -r "fuzz/corpus/$t" "$work/$t"
  limit=(-runs="${runs:-${short_runs[$t]}}")
  [ -n "$long_seconds" ] && limit=(-max_total_time="$long_seconds")
  dict=()
  [ -f "fuzz/$t.dict" ] && dict=(-dict="fuzz/$t.dict")
  log="$work/$t.log"
  start=$EPOCHREALTIME
  if "$build/bin/$t" "${limit[@]}" "${dict[@]}" -seed=1 -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$artifacts/$t-" "$work/$t" >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
  fi
  elapsed=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  # libFuzzer's own average rounds down to whole seconds of run time: computed here instead.
  per_second=$(awk -v n="${execs:-0}" -v s="$elapsed" 'BEGIN { printf "%d", n / s }')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  printf '%-20s %-6s %9s runs %8s exec/s %6.1f s  %s\n' "$t" "$status" "${execs:-?}" "${per_second:-?}" \
    "$elapsed" "$cov"
  if [ "$status" = FAILED ]; then
    grep -E -A40 'ERROR:|invariant failed|runtime error|deadly signal' "$log" | head -80 || tail -40 "$log"
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: FAILED ${failed[*]} (inputs in $artifacts/)"
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"
