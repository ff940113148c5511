#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: "Run the tests"). Installs missing Debian
# packages, then:
#   1. builds everything with -Wall -Wextra -Werror and runs every test (ctest: C++ tests, the
#      Python tests with pytest, the load generator and the demo driver)
#   2. the browser tests: the demo page and web/pushbook.js in headless Chromium, driven by
#      playwright-core (scripts/browser-test.sh installs Chromium and playwright-core if missing)
#   3. installs pushbook (checks that the installed server, demo page and Python package work) and
#      builds two consumer projects against it: find_package() on the installed static library,
#      add_subdirectory() as a shared library
#   4. runs every test again under AddressSanitizer + UndefinedBehaviorSanitizer
#   5. the libFuzzer targets (scripts/fuzz.sh, clang): each over its seed corpus for a fixed number
#      of runs, under ASan + UBSan
#   6. runs the concurrency tests under ThreadSanitizer
# Set PUSHBOOK_SKIP_SANITIZERS=1 to stop after step 3 (quick local runs).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bash scripts/setup.sh

jobs=$(nproc)
passed=0
failed_steps=()
step() { printf '\n==> %s\n' "$*"; }
run_step() {  # name, command...
  local name=$1
  shift
  if "$@"; then passed=$((passed + 1)); else failed_steps+=("$name"); fi
}

configure_build() {  # dir, extra cmake args...
  local dir=$1
  shift
  cmake -S "$root" -B "$dir" -G Ninja -DPUSHBOOK_WERROR=ON "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log"; return 1; }
  cmake --build "$dir" -j "$jobs"
}

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1

step "1/6 build (-Werror) and run all tests"
mkdir -p build
run_step "tests" bash -c "$(declare -f configure_build); root='$root'; jobs=$jobs;
  configure_build build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPUSHBOOK_BUILD_TESTS=ON \
    -DPUSHBOOK_BUILD_EXAMPLES=ON -DPUSHBOOK_BUILD_BENCH=ON &&
  ctest --test-dir build --output-on-failure -j $jobs"

step "2/6 browser tests (headless Chromium + playwright-core)"
run_step "browser" env PUSHBOOK_SERVER="$root/build/bin/pushbook-server" bash scripts/browser-test.sh

step "3/6 consumer projects: find_package (installed, static) and add_subdirectory (shared)"
run_step "consumers" bash -c "
  set -e
  rm -rf build/_install build/consumer-find build/consumer-sub
  cmake --install build --prefix build/_install >/dev/null
  /usr/bin/python3 tests/consumers/check_install.py build/_install
  cmake -S tests/consumers/find_package -B build/consumer-find -G Ninja \
    -DCMAKE_PREFIX_PATH='$root/build/_install' >/dev/null
  cmake --build build/consumer-find
  build/consumer-find/consumer
  cmake -S tests/consumers/add_subdirectory -B build/consumer-sub -G Ninja \
    -DPUSHBOOK_SOURCE_DIR='$root' -DBUILD_SHARED_LIBS=ON >/dev/null
  cmake --build build/consumer-sub
  build/consumer-sub/consumer"

if [ "${PUSHBOOK_SKIP_SANITIZERS:-0}" != 1 ]; then
  step "4/6 AddressSanitizer + UndefinedBehaviorSanitizer: all tests"
  mkdir -p build-asan
  run_step "asan+ubsan" bash -c "$(declare -f configure_build); root='$root'; jobs=$jobs;
    configure_build build-asan -DCMAKE_BUILD_TYPE=Debug -DPUSHBOOK_SANITIZE=address,undefined \
      -DPUSHBOOK_BUILD_TESTS=ON -DPUSHBOOK_BUILD_EXAMPLES=OFF -DPUSHBOOK_BUILD_BENCH=OFF \
      -DPUSHBOOK_BUILD_PYTHON=OFF &&
    ctest --test-dir build-asan --output-on-failure -j $jobs"

  step "5/6 libFuzzer targets, short runs (scripts/fuzz.sh)"
  run_step "fuzz" bash scripts/fuzz.sh

  step "6/6 ThreadSanitizer: concurrency tests"
  mkdir -p build-tsan
  # setarch -R: GCC 12's TSan runtime cannot map its shadow memory with the high ASLR entropy of
  # recent kernels; running without address randomisation avoids that.
  run_step "tsan" bash -c "$(declare -f configure_build); root='$root'; jobs=$jobs;
    configure_build build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPUSHBOOK_SANITIZE=thread \
      -DPUSHBOOK_BUILD_TESTS=ON -DPUSHBOOK_BUILD_EXAMPLES=OFF -DPUSHBOOK_BUILD_BENCH=OFF \
      -DPUSHBOOK_BUILD_PYTHON=OFF &&
    setarch \"\$(uname -m)\" -R ctest --test-dir build-tsan --output-on-failure -L concurrency -j $jobs"
fi

echo
if ((${#failed_steps[@]})); then
  echo "FAILED steps: ${failed_steps[*]}"
  echo "steps: $passed passed, ${#failed_steps[@]} failed"
  exit 1
fi
echo "steps: $passed passed, 0 failed"
