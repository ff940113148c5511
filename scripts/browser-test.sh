#!/usr/bin/env bash
# Browser tests (tests/browser/): the demo page and web/pushbook.js in headless Chromium against
# a real pushbook-server, plus unit tests of the client. Installs what is missing: Chromium and
# Node.js from Debian (apt-get, as root or through sudo), playwright-core from npm (`npm ci`,
# pinned by tests/browser/package-lock.json) when node_modules is missing or stale. Then runs
# `node --test`; the exit code is the tests'.
#   PUSHBOOK_SERVER   the server binary to test (default: build/bin/pushbook-server; build it first)
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT
apt_install() {  # packages...
  local sudo_cmd=()
  if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo -n); fi
  echo "browser-test: installing $* (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { "${sudo_cmd[@]}" apt-get update -qq &&
         "${sudo_cmd[@]}" apt-get install -y -qq "$@"; } >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
}

[ -x /usr/bin/chromium ] || apt_install chromium
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
# playwright-core needs Node 20 or later (Debian 12's own nodejs is 18).
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "browser-test: Node $(node --version) is too old: the browser tests need Node 20 or later" >&2
  exit 1
fi

server=${PUSHBOOK_SERVER:-build/bin/pushbook-server}
if [ ! -x "$server" ]; then
  echo "browser-test: no server binary at $server:" \
    "build it first (scripts/test.sh) or set PUSHBOOK_SERVER" >&2
  exit 1
fi
export PUSHBOOK_SERVER=$(realpath "$server")

cd tests/browser
# npm ci leaves node_modules/.package-lock.json behind: older than the lock file means stale.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ] ||
   [ package.json -nt node_modules/.package-lock.json ]; then
  if ! npm ci --no-audit --no-fund >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
fi
node --test
