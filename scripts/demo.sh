#!/usr/bin/env bash
# The main job (README: "Run the demo"): installs missing Debian packages, builds the examples
# and runs the quickstart, which submits bookings and prints each pushed decision with timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPUSHBOOK_BUILD_EXAMPLES=ON >/dev/null
cmake --build build --target pushbook-quickstart -j "$(nproc)"
echo
exec build/bin/pushbook-quickstart "$@"
