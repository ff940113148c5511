#!/usr/bin/env bash
# The main job (README: "Run the demo"): the case study's comparison, reproduced on this machine.
# Installs missing Debian packages, builds pushbook-server and the load generator, then
# scripts/compare.py starts pushbook-server on a free loopback port per run, loads it with
# pushbook-bench in poll, longpoll, SSE and push modes at the same offered load (1,000 and
# 10,000 users; decision delay 0 and a 5 s business step), stops it; then the case study's
# production shape, a cluster (examples/cluster: three nodes behind nginx, PostgreSQL, Redis) at
# 10,000 users, polling (each poll reads PostgreSQL) against push; then the case study's TLS
# cost: polling with a new TLS connection per request, polling over one TLS connection and push
# over WSS, at 1,000 and 10,000 users. Prints the tables and writes the latency picture
# (build/demo/latency-cdf.svg). About six minutes on 2 cores.
#
#   scripts/demo.sh            the full comparison
#   scripts/demo.sh --quick    a quarter of the load (a quick look)
#   scripts/demo.sh --only 1k  one block (1k, 10k, slow-1k, slow-10k, cluster-10k,
#                              cluster-slow-10k, tls-1k, tls-10k); see scripts/compare.py --help
#
# Then watch one booking live in a browser: build/bin/pushbook-server --demo (docs/getting-started-browser.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPUSHBOOK_BUILD_EXAMPLES=ON \
  -DPUSHBOOK_BUILD_BENCH=ON >/dev/null
cmake --build build --target pushbook-server pushbook-bench -j "$(nproc)"
echo
exec /usr/bin/python3 scripts/compare.py --build build "$@"
