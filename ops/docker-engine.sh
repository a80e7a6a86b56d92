#!/usr/bin/env bash
# Start a private Docker engine for berthd's integration tests and CI.
#
# Why a private engine: tests create and remove containers by the dozen; a socket, data root
# and exec root of their own keep them away from whatever else runs on the machine, and make
# "wipe /var/lib/berthd-ci" a complete reset.
#
# Idempotent: if an engine already answers on the socket it is reused as is (nothing is
# restarted); if a dockerd from our pidfile is alive but not answering yet, we only wait.
# Run as root on Debian 12. Prints the environment line it implies at the end.
#
# Note: on a machine where the packaged docker.service also runs, both daemons share the
# docker0 bridge; set BERTHD_DOCKERD_EXTRA_ARGS (e.g. "--bridge=none") if that bothers you.
set -euo pipefail

RUN_DIR=/run/berthd-ci
SOCK="$RUN_DIR/docker.sock"
DOCKER_HOST_URL="unix://$SOCK"
DATA_ROOT=/var/lib/berthd-ci/docker
EXEC_ROOT="$RUN_DIR/exec"
PIDFILE="$RUN_DIR/docker.pid"
LOG="$RUN_DIR/dockerd.log"
WAIT_SECONDS=60

log() { printf 'docker-engine: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (dockerd needs it)"
    exit 1
fi

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)  # the battery gives its private engine a bridge
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# Answering means the API replies to /_ping, not merely that the socket file exists.
answers() {
    [ -S "$SOCK" ] && curl -fsS --max-time 3 --unix-socket "$SOCK" http://localhost/_ping >/dev/null 2>&1
}

pid_alive() {
    [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

if answers; then
    log "engine already answering on $SOCK (reused)"
else
    if pid_alive; then
        log "dockerd $(cat "$PIDFILE") is starting; waiting for it"
    else
        mkdir -p "$RUN_DIR" "$DATA_ROOT" "$EXEC_ROOT"
        rm -f "$PIDFILE"
        log "starting dockerd on $SOCK (log: $LOG)"
        # setsid + nohup: the engine must outlive this script and the CI step that ran it.
        # shellcheck disable=SC2086  # extra args are meant to be split
        setsid nohup dockerd \
            --host "$DOCKER_HOST_URL" \
            --data-root "$DATA_ROOT" \
            --exec-root "$EXEC_ROOT" \
            --pidfile "$PIDFILE" \
            ${BERTHD_DOCKERD_EXTRA_ARGS:-} \
            >>"$LOG" 2>&1 </dev/null &
        started_pid=$!
    fi
    deadline=$((SECONDS + WAIT_SECONDS))
    until answers; do
        if [ -n "${started_pid:-}" ] && ! kill -0 "$started_pid" 2>/dev/null; then
            log "dockerd exited during startup; last log lines:"
            tail -n 30 "$LOG" >&2 || true
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "dockerd did not answer within ${WAIT_SECONDS}s; last log lines:"
            tail -n 30 "$LOG" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "engine up"
fi

echo "export DOCKER_HOST=$DOCKER_HOST_URL"
