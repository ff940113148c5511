#!/usr/bin/env bash
# The cluster test at full length (tests/python/test_cluster.py, which the README's test command
# runs at scale 1, about 30 s): Redis, PostgreSQL, three pushbook-server nodes and nginx; a
# booking decided on another node than the client's WebSocket; kill -9 of a node under load; a
# rolling restart under load. SCALE multiplies the users and the durations (default 4: 480
# WebSocket, 80 SSE and 80 long-poll users, a few minutes).
#
#   scripts/cluster-test.sh [SCALE]        PUSHBOOK_TEST_SEED=N repeats a run
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DPUSHBOOK_BUILD_TESTS=ON -DPUSHBOOK_BUILD_EXAMPLES=ON >/dev/null
cmake --build build --target pushbook-server
PUSHBOOK_CLUSTER_SCALE="${1:-4}" PUSHBOOK_SERVER="$PWD/build/bin/pushbook-server" \
  exec /usr/bin/python3 -m pytest -q -s -p no:cacheprovider tests/python/test_cluster.py
