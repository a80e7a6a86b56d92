#!/usr/bin/env bash
# Provision a local PostgreSQL for berthd's store tests (CI, developer VMs).
#
# Run as root on Debian 12. Idempotent: safe to run again on a machine where it already
# ran (it only installs, creates or restarts what is missing or changed). Leaves the
# server listening on 127.0.0.1:5432 only, with role "berthd" (password "berthd") owning
# database "berthd_test", and prints the line to export for the tests:
#
#   eval "$(sudo ops/postgres.sh | tail -n 1)"
#
# Test credentials only: never point this at a server that holds real data.
set -euo pipefail

ROLE=berthd
PASSWORD=berthd
DATABASE=berthd_test
PORT=5432
CLUSTER=main

log() { printf 'postgres.sh: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (it installs packages and manages the cluster)"
    exit 1
fi

# 1. Packages: the Debian "postgresql" metapackage pulls the distribution's major version
#    and creates a "main" cluster on install.
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    log "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q postgresql
fi

VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if [[ -z "$VERSION" ]]; then
    log "no PostgreSQL server version found under /usr/lib/postgresql"
    exit 1
fi

# 2. Cluster: created by the package, but an image may have dropped it.
if ! pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c {found=1} END {exit !found}'; then
    log "creating cluster $VERSION/$CLUSTER"
    pg_createcluster "$VERSION" "$CLUSTER" --port="$PORT"
fi

# 3. Loopback only, fixed port. A drop-in file, so package upgrades keep their own
#    postgresql.conf; restart only when the drop-in actually changed.
CONF_DIR=/etc/postgresql/$VERSION/$CLUSTER/conf.d
CONF_FILE=$CONF_DIR/berthd.conf
WANTED=$(printf "# Written by berthd ops/postgres.sh\nlisten_addresses = '127.0.0.1'\nport = %s\n" "$PORT")
CHANGED=0
mkdir -p "$CONF_DIR"
if [[ ! -f "$CONF_FILE" ]] || [[ "$(cat "$CONF_FILE")" != "$WANTED" ]]; then
    printf '%s\n' "$WANTED" >"$CONF_FILE"
    chown postgres:postgres "$CONF_FILE"
    CHANGED=1
fi

# Containers often mount /run as an empty tmpfs: the socket directory must exist.
install -d -o postgres -g postgres -m 2775 /var/run/postgresql

cluster_online() {
    pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c && $4 == "online" {found=1} END {exit !found}'
}

if cluster_online; then
    if [[ $CHANGED -eq 1 ]]; then
        log "restarting cluster $VERSION/$CLUSTER (configuration changed)"
        pg_ctlcluster "$VERSION" "$CLUSTER" restart
    fi
else
    log "starting cluster $VERSION/$CLUSTER"
    pg_ctlcluster "$VERSION" "$CLUSTER" start
fi

# 4. Wait until it answers on the loopback address.
for _ in $(seq 1 60); do
    if pg_isready -q -h 127.0.0.1 -p "$PORT" -t 1; then
        break
    fi
    sleep 0.5
done
if ! pg_isready -q -h 127.0.0.1 -p "$PORT" -t 1; then
    log "server did not answer on 127.0.0.1:$PORT; see /var/log/postgresql/postgresql-$VERSION-$CLUSTER.log"
    exit 1
fi

# 5. Role and database, through the local socket as the postgres superuser (peer auth).
as_postgres() {
    runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PORT" -d postgres "$@"
}

if [[ "$(as_postgres -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != "1" ]]; then
    log "creating role $ROLE"
    as_postgres -c "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'"
else
    # Re-assert the password and login, in case someone changed them.
    as_postgres -c "ALTER ROLE $ROLE LOGIN PASSWORD '$PASSWORD'"
fi

if [[ "$(as_postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != "1" ]]; then
    log "creating database $DATABASE"
    as_postgres -c "CREATE DATABASE $DATABASE OWNER $ROLE"
fi

# 6. Prove the exact URL the tests will use works (password auth over TCP).
if ! PGPASSWORD=$PASSWORD psql -X -q -h 127.0.0.1 -p "$PORT" -U "$ROLE" -d "$DATABASE" -tAc 'SELECT 1' >/dev/null; then
    log "cannot log in as $ROLE over 127.0.0.1:$PORT (check pg_hba.conf for a host/127.0.0.1 password rule)"
    exit 1
fi

log "ready: PostgreSQL $VERSION on 127.0.0.1:$PORT"
echo "export BERTHD_TEST_POSTGRES=postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
