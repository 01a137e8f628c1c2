#!/usr/bin/env bash
# Tools the operations tests use, from Debian's packages:
# - Compose, for `docker compose config` on compose.yml (Debian packages no Compose v2 plugin: the
#   `docker-compose` package, v1, does the job);
# - promtool and prometheus, to check config/prometheus*.yml and the Grafana queries, and to scrape a
#   gateway with config/prometheus.yml. The .deb is unpacked under /opt/prometheus instead of installed,
#   so no Prometheus service is started on the machine.
# Runs as root with no stdin; does nothing when everything is there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
log() { echo "[ensure-ops-tools] $*"; }
updated=false
apt_update() { $updated || { apt-get update -qq </dev/null; updated=true; }; }

if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    log "installing docker-compose"
    apt_update
    apt-get install -y -qq docker-compose </dev/null
fi

PROM_DIR=${PROM_DIR:-/opt/prometheus}
if [[ ! -x "$PROM_DIR/usr/bin/promtool" || ! -x "$PROM_DIR/usr/bin/prometheus" ]]; then
    log "unpacking Debian's prometheus package into $PROM_DIR"
    apt_update
    work=$(mktemp -d)
    chmod 0755 "$work"  # apt's _apt user downloads into it
    (cd "$work" && apt-get download prometheus </dev/null)
    mkdir -p "$PROM_DIR"
    dpkg-deb -x "$work"/prometheus_*.deb "$PROM_DIR"
    rm -rf "$work"
fi
log "ok: $("$PROM_DIR/usr/bin/promtool" --version 2>&1 | head -n 1)"
