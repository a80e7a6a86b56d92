#!/usr/bin/env bash
# Run a local image registry for berthd's pull tests, and put the busybox test image in it.
#
# Debian's docker-registry (distribution 2.8) on 127.0.0.1:5000, storage under
# /var/lib/berthd-ci/registry, backgrounded with a pidfile. The Docker engine treats
# 127.0.0.0/8 registries as insecure (plain HTTP) by default, so no TLS is needed.
# Then berthd-test/busybox:latest is tagged and pushed as
# 127.0.0.1:5000/berthd-test/busybox:latest, so the pull tests have something to pull.
#
# Idempotent: a registry already answering on the address is reused. Run as root on
# Debian 12 after ops/docker-engine.sh and ops/test-images.sh. Prints the environment lines
# it implies at the end.
set -euo pipefail

export DOCKER_HOST="${BERTHD_DOCKER_HOST:-unix:///run/berthd-ci/docker.sock}"
ADDR=127.0.0.1:5000
STATE_DIR=/var/lib/berthd-ci/registry
CONFIG="$STATE_DIR/config.yml"
RUN_DIR=/run/berthd-ci
PIDFILE="$RUN_DIR/registry.pid"
LOG="$RUN_DIR/registry.log"
SOURCE_REF=berthd-test/busybox:latest
PUSHED_REF="$ADDR/berthd-test/busybox:latest"
WAIT_SECONDS=30

log() { printf 'registry: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root"
    exit 1
fi

need_pkgs=()
command -v docker-registry >/dev/null 2>&1 || need_pkgs+=(docker-registry)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    # The package starts its own service on :5000 (all interfaces, htpasswd auth) under
    # systemd; it would hold the port we want, so turn it off.
    if [ -d /run/systemd/system ]; then
        systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
    fi
fi

answers() {
    curl -fsS --max-time 3 "http://$ADDR/v2/" >/dev/null 2>&1
}

if answers; then
    log "registry already answering on $ADDR (reused)"
else
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        log "registry $(cat "$PIDFILE") is starting; waiting for it"
    else
        mkdir -p "$STATE_DIR/data" "$RUN_DIR"
        cat >"$CONFIG" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE_DIR/data
  delete:
    enabled: true
http:
  addr: $ADDR
EOF
        log "starting docker-registry on $ADDR (log: $LOG)"
        setsid nohup docker-registry serve "$CONFIG" >>"$LOG" 2>&1 </dev/null &
        echo $! >"$PIDFILE"
    fi
    deadline=$((SECONDS + WAIT_SECONDS))
    until answers; do
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            log "docker-registry exited; last log lines:"
            tail -n 30 "$LOG" >&2 || true
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "registry did not answer within ${WAIT_SECONDS}s"
            tail -n 30 "$LOG" >&2 || true
            exit 1
        fi
        sleep 0.3
    done
    log "registry up"
fi

if ! docker image inspect "$SOURCE_REF" >/dev/null 2>&1; then
    log "$SOURCE_REF not found in the engine at $DOCKER_HOST; run ops/test-images.sh first"
    exit 1
fi
docker tag "$SOURCE_REF" "$PUSHED_REF"
docker push "$PUSHED_REF" >/dev/null
log "pushed $PUSHED_REF"

echo "export DOCKER_HOST=$DOCKER_HOST"
echo "export BERTHD_TEST_REGISTRY=$ADDR"
