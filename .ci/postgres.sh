#!/usr/bin/env bash
# The PostgreSQL backend's tests on a real, throwaway server: installs PostgreSQL when missing,
# starts a cluster in a temp dir on a free loopback port (as the `postgres` user when run as
# root, as CI is), exports IDEMSTORE_PG_URL (and what the restart fault test needs), runs the
# backend's and the contract suite's tests, and stops the cluster on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin=""
find_pg_bin() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            pg_bin="$dir"
            return 0
        fi
    done
    return 1
}
if ! find_pg_bin; then
    echo "PostgreSQL is missing: installing it"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    find_pg_bin || { echo "PostgreSQL could not be installed" >&2; exit 1; }
fi

# initdb and the server refuse to run as root: run them as `postgres` then.
run_as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    local port
    for port in $(seq 55432 55632); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    return 1
}

work="$(mktemp -d /tmp/idemstore-pg.XXXXXX)"
chmod 755 "$work"
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$work"
fi
port="$(free_port)"
data="$work/data"
stop_cluster() {
    run_as_pg "$pg_bin/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap stop_cluster EXIT

run_as_pg "$pg_bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
run_as_pg "$pg_bin/pg_ctl" -D "$data" -l "$work/server.log" -w \
    -o "-p $port -k $work -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $data)"

export IDEMSTORE_PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
# For tests/faults.rs: restarting the server with `pg_ctl restart -m immediate`.
export IDEMSTORE_PG_DATA="$data"
export IDEMSTORE_PG_CTL="$pg_bin/pg_ctl"
if [ "$(id -u)" = 0 ]; then
    export IDEMSTORE_PG_RUN_AS=postgres
fi

cargo test -p idemstore-postgres -p idemstore-contract
