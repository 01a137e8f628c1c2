#!/usr/bin/env bash
# Make sure a Docker Engine answers: install docker.io if dockerd is missing, then start dockerd
# detached (so it outlives the make target that ran this) with the vfs storage driver, which works
# inside containers and VMs without overlayfs support. Runs as root with no stdin.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

LOG_FILE=${DOCKERD_LOG:-/var/log/dockerd.log}
log() { echo "[ensure-docker] $*"; }

docker_answers() { docker info >/dev/null 2>&1; }

wait_for_docker() {
    local deadline=$(( $(date +%s) + 60 ))
    while (( $(date +%s) < deadline )); do
        docker_answers && return 0
        # Stop waiting early if dockerd already died.
        if [[ -f /var/run/docker.pid ]] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
            return 1
        fi
        sleep 1
    done
    return 1
}

start_dockerd() {
    log "starting dockerd $* (log: $LOG_FILE)"
    rm -f /var/run/docker.pid
    # setsid + nohup: detached from this shell's session, so it keeps running after make exits.
    setsid nohup dockerd --storage-driver=vfs --data-root /var/lib/docker \
        --pidfile /var/run/docker.pid "$@" >"$LOG_FILE" 2>&1 </dev/null &
}

stop_dockerd() {
    if [[ -f /var/run/docker.pid ]]; then
        local pid
        pid=$(cat /var/run/docker.pid)
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
}

# Compose (compose.yml is validated in the tests) and promtool/prometheus for the operations tests.
"$(dirname "$0")/ensure-ops-tools.sh"

if docker_answers; then
    log "Docker Engine is running"
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    log "dockerd not found: installing docker.io"
    apt-get update -qq </dev/null
    apt-get install -y -qq docker.io </dev/null
fi

if [[ -f /var/run/docker.pid ]] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    # A dockerd is already starting (or stuck): wait for it rather than start a second one.
    log "dockerd (pid $(cat /var/run/docker.pid)) is running; waiting for it to answer"
else
    start_dockerd
fi
if wait_for_docker; then
    log "Docker Engine is up"
    exit 0
fi

# Without NET_ADMIN (or with no iptables), dockerd cannot set up its bridge: start without it.
# Containers then need --network host (which the tests use).
log "dockerd did not answer within 60s; retrying with --iptables=false --bridge=none"
stop_dockerd
start_dockerd --iptables=false --bridge=none
if wait_for_docker; then
    log "Docker Engine is up (no bridge network: use --network host)"
    exit 0
fi

log "error: could not start the Docker Engine; last lines of $LOG_FILE:" >&2
tail -n 20 "$LOG_FILE" >&2 || true
exit 1
