#!/bin/sh
# A real service behind portBindings (issue 5). Not a test: prints figures.
# PostgreSQL as a Background host step with a bound port, driven by pgbench from the
# host (select-only, one client, kept connection: the request round trip), three
# ways, alternating, ROUNDS rounds (default 3) of SECONDS seconds (default 4), medians:
# - direct:  the same server started on the host, no sandrun;
# - handoff: `sandrun run`: the server's accept(2) takes the host connection itself;
# - proxy:   the same run with SANDRUN_PORT_HANDOFF=off.
# Also connection setup (`pgbench -C`, a new connection per transaction).
# PostgreSQL will not run as root: as root this runs as `sandrun-test` (scripts/test.sh
# creates it). Needs Debian's postgresql package (server and pgbench).
set -eu
ROUNDS="${ROUNDS:-3}"
SECONDS_EACH="${SECONDS:-4}"
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PGBIN/postgres" ] && command -v pgbench >/dev/null || {
    echo "needs PostgreSQL's server and pgbench (Debian: apt-get install postgresql)"
    exit 1
}

if [ "${1:-}" != "--inner" ]; then
    cd "$(dirname "$0")/.."
    . bench/lib.sh
    prepare_workdir pg "$0"
    if [ "$(id -u)" -eq 0 ]; then
        chown sandrun-test: "$W" 2>/dev/null
        as_test_user ROUNDS="$ROUNDS" SECONDS="$SECONDS_EACH" sh "$W/pgbench.sh" --inner "$W" ||
            status=$?
    else
        sh "$W/pgbench.sh" --inner "$W" || status=$?
    fi
    remove_workdir
    exit "${status:-0}"
fi

W="$2"
cd "$W"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo "user: $(id -un), $(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg), $ROUNDS rounds of ${SECONDS_EACH} s"

# direct: the server on the host.
DIRECT=$(free_port)
"$PGBIN/initdb" -D "$W/direct" -A trust -U postgres >/dev/null
"$PGBIN/pg_ctl" -D "$W/direct" -o "-p $DIRECT -k $W -c listen_addresses=127.0.0.1" -l "$W/direct.log" start >/dev/null
trap '"$PGBIN/pg_ctl" -D "$W/direct" stop -m immediate >/dev/null 2>&1; touch ws-handoff/done ws-proxy/done 2>/dev/null' EXIT

start_run() { # name host-port SANDRUN_PORT_HANDOFF
    mkdir -p "ws-$1"
    cat > "ws-$1/stage.yaml" <<YAML
stage:
  identifier: pg
  name: pg
  type: CI
  spec:
    execution:
      steps:
        - step:
            identifier: db
            name: db
            type: Background
            spec:
              shell: Sh
              command: |
                "$PGBIN/initdb" -D "$W/data-$1" -A trust -U postgres >/dev/null
                echo "host all all all trust" >> "$W/data-$1/pg_hba.conf"
                exec "$PGBIN/postgres" -D "$W/data-$1" -p 5432 -k "$W/data-$1" -c listen_addresses='*'
              portBindings:
                "$2": "5432"
        - step:
            identifier: hold
            name: hold
            type: Run
            spec:
              shell: Sh
              command: while [ ! -f done ]; do sleep 0.1; done
YAML
    (cd "ws-$1" && SANDRUN_PORT_HANDOFF=$3 "$W/sandrun" run --color never stage.yaml >run.log 2>&1 &)
    i=0
    until pgbench -i -q -h 127.0.0.1 -p "$2" -U postgres postgres >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -lt 100 ] || { echo "$1: PostgreSQL never answered"; cat "ws-$1/run.log"; exit 1; }
        sleep 0.2
    done
}
pgbench -i -q -h 127.0.0.1 -p "$DIRECT" -U postgres postgres >/dev/null 2>&1
HANDOFF=$(free_port)
start_run handoff "$HANDOFF" on
PROXY=$(free_port)
start_run proxy "$PROXY" off

r=0
while [ $r -lt "$ROUNDS" ]; do
    for line in direct handoff proxy; do
        case $line in direct) port=$DIRECT ;; handoff) port=$HANDOFF ;; proxy) port=$PROXY ;; esac
        kept=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -c 1 -T "$SECONDS_EACH" -S postgres 2>&1 |
            awk '/^tps/{printf "%.0f", $3}')
        fresh=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -c 1 -T 2 -S -C postgres 2>&1 |
            awk '/^tps/{printf "%.1f", $3}')
        echo "$line $kept $fresh" >> results
    done
    r=$((r + 1))
done
python3 - <<'PY'
rows = [l.split() for l in open("results")]
med = lambda v: sorted(v)[len(v) // 2]
d = med([float(r[1]) for r in rows if r[0] == "direct"])
for k in ("direct", "handoff", "proxy"):
    kept = med([float(r[1]) for r in rows if r[0] == k])
    fresh = med([float(r[2]) for r in rows if r[0] == k])
    print(f"{k:8} select-only, kept connection: {kept:6.0f} tps ({kept / d:.2f}x direct, "
          f"{1000 / kept:.3f} ms a query)   new connection each: {fresh:5.1f} tps")
PY
