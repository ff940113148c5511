#!/usr/bin/env bash
# Installs the Debian packages pushbook needs to build and test, and nothing else.
# Idempotent and quiet: when everything is present it prints nothing and exits 0.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git
  libboost1.81-dev libboost-json1.81-dev libboost-url1.81-dev
  libfmt-dev doctest-dev libssl-dev libsqlite3-dev
  redis-server libhiredis-dev  # RedisBus: hiredis's RESP reader; the tests start their own redis-server
  postgresql-15 libpq-dev  # PostgresStore: libpq; the tests start their own server (initdb as postgres)
  nginx  # the cluster's load balancer (examples/cluster, the cluster test): started by them, never as a service
  python3 python3-dev pybind11-dev python3-pytest python3-websockets python3-aiohttp
  python3-fastapi python3-starlette python3-uvicorn
  clang libclang-rt-14-dev  # the libFuzzer targets (scripts/fuzz.sh): clang 14 and its libFuzzer
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
((${#missing[@]} == 0)) && exit 0

echo "pushbook setup: installing ${missing[*]}" >&2
sudo_cmd=()
if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
# Debian starts the services it installs (nginx on port 80, redis-server, PostgreSQL). pushbook's
# tests and examples start their own on free ports, so keep the packages from starting theirs now:
# a policy-rc.d that refuses (exit 101) while apt runs, unless the machine already has one. (On a
# machine that boots with systemd they stay enabled: `systemctl disable nginx` if port 80 is
# another's.)
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  trap '"${sudo_cmd[@]}" rm -f "$policy"' EXIT  # also when apt-get is interrupted
  printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
  "${sudo_cmd[@]}" chmod +x "$policy"
  own_policy=1
fi
status=0
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
if ((own_policy)); then "${sudo_cmd[@]}" rm -f "$policy"; fi
exit $status
