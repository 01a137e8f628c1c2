#!/usr/bin/env bash
# Make sure Redis answers at REDIS_URL (default redis://127.0.0.1:6379/0), used by `make run`.
# If nothing answers and redis-server is installed, start one under ./var (daemonized, no
# persistence) for a local host/port URL; otherwise explain what to do and exit 1.
set -euo pipefail

REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
VAR_DIR=${VAR_DIR:-./var}
log() { echo "[ensure-redis] $*"; }

# redis[s]://[user[:password]@]host[:port][/db]
if [[ ! $REDIS_URL =~ ^rediss?://(([^@/]*)@)?(\[[^]]+\]|[^:/]+)?(:([0-9]+))?(/([0-9]*))?$ ]]; then
    log "error: cannot parse REDIS_URL (expected redis://[user:password@]host[:port][/db])" >&2
    exit 1
fi
CREDENTIALS=${BASH_REMATCH[2]}
HOST=${BASH_REMATCH[3]:-127.0.0.1}
HOST=${HOST#[}; HOST=${HOST%]}
PORT=${BASH_REMATCH[5]:-6379}
SCHEME=${REDIS_URL%%://*}
PASSWORD=""
if [[ $CREDENTIALS == *:* ]]; then PASSWORD=${CREDENTIALS#*:}; fi

ping_redis() {
    if command -v redis-cli >/dev/null 2>&1; then
        local args=(-h "$HOST" -p "$PORT")
        [[ $SCHEME == rediss ]] && args+=(--tls)
        # The password goes through the environment, never the command line (ps would show it).
        [[ $(REDISCLI_AUTH=$PASSWORD timeout 3 redis-cli "${args[@]}" ping 2>/dev/null) == PONG ]]
        return
    fi
    # No redis-cli: speak the inline protocol over bash's /dev/tcp. (AUTH rejects an unauthenticated
    # PING with NOAUTH, which still proves a server is there.)
    local reply
    reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$PORT && printf 'PING\r\n' >&3 \
        && IFS= read -r -t 2 line <&3 && printf '%s' \"\$line\"" 2>/dev/null || true)
    [[ $reply == +PONG* || $reply == -NOAUTH* ]]
}

if ping_redis; then
    log "Redis answers at $HOST:$PORT"
    exit 0
fi

case $HOST in
    127.0.0.1 | localhost | ::1) ;;
    *)
        log "error: nothing answers at $HOST:$PORT; start Redis there or set REDIS_URL" >&2
        exit 1
        ;;
esac
if ! command -v redis-server >/dev/null 2>&1; then
    log "error: nothing answers at $HOST:$PORT and redis-server is not installed." >&2
    log "Install it (apt-get install redis-server) or set REDIS_URL to a running Redis." >&2
    exit 1
fi

mkdir -p "$VAR_DIR"
VAR_DIR=$(cd "$VAR_DIR" && pwd)
log "starting redis-server on $HOST:$PORT (dir $VAR_DIR, no persistence)"
args=(--daemonize yes --bind "$HOST" --port "$PORT" --dir "$VAR_DIR"
      --pidfile "$VAR_DIR/redis-$PORT.pid" --logfile "$VAR_DIR/redis-$PORT.log"
      --save "" --appendonly no)
[[ -n $PASSWORD ]] && args+=(--requirepass "$PASSWORD")
redis-server "${args[@]}" </dev/null

for _ in $(seq 1 50); do
    if ping_redis; then
        log "Redis is up at $HOST:$PORT"
        exit 0
    fi
    sleep 0.1
done
log "error: redis-server did not answer; see $VAR_DIR/redis-$PORT.log" >&2
exit 1
