#!/usr/bin/env bash
# HAProxy from Debian's package, for the load-balancer example (config/haproxy.cfg) and its test
# (tests/test_load_balancer.py). Runs as root with no stdin (CI), or through sudo otherwise; does
# nothing when haproxy is already installed. The package's own service is not needed by the test (it
# starts its own haproxy with a generated config), so it is stopped and disabled when this script
# installed it and systemd is running.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
log() { echo "[ensure-haproxy] $*"; }

if command -v haproxy >/dev/null 2>&1; then
    log "ok: $(haproxy -v 2>&1 | head -n 1)"
    exit 0
fi
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { log "error: not root and no sudo; install haproxy (apt-get install haproxy)" >&2; exit 1; }
    SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
fi
log "installing haproxy from Debian"
"${SUDO[@]}" apt-get update -qq </dev/null
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends haproxy </dev/null
if [[ -d /run/systemd/system ]]; then
    "${SUDO[@]}" systemctl disable --now haproxy >/dev/null 2>&1 || true
fi
command -v haproxy >/dev/null 2>&1 || { log "error: haproxy is still missing after apt-get install" >&2; exit 1; }
log "ok: $(haproxy -v 2>&1 | head -n 1)"
