#!/bin/sh
# Warm stage benchmark (issue 14). Not a test: prints figures.
# One CI stage: three Background services (two PostgreSQL servers on port 5432 and a
# Redis, from the recipes in images/) and five Run steps that wait for and use them.
# sandrun (`sandrun run stage.yaml`) against podman doing the same work rootless: a
# pod, the services as `podman run -d --pod`, the five steps as `podman run --rm --pod`,
# then the pod stopped and removed. Rootless podman networks need slirp4netns, which
# needs /dev/net/tun (not open to users here), so the pod has `--network none`: one
# namespace with loopback only, cheaper than sandrun's bridge with a namespace per
# step. In it the second PostgreSQL listens on 5433 (PG2_PORT; sandrun's steps use 5432
# on their own address) and the identifiers are --add-host names for 127.0.0.1. Both use the same images: sandrun builds them from the
# recipes and `sandrun save` writes them into an archive that `podman load` reads.
# Alternating order, ROUNDS rounds (default 10), medians.
#
# Figures:
# - wall:     the whole command (sandrun run / the podman sequence), start to exit.
# - work:     what the steps themselves spend: each Run step stamps /proc/uptime (10 ms
#             resolution) as its command starts and ends, into the workspace; work is
#             the sum of the five (end - start). It includes waiting for the services to
#             accept connections (initdb, server start), which is the services' work.
# - overhead: wall - work: images, networks, containers, service start and stop, output.
# - peak RSS: VmHWM of the `sandrun run` process (polled every 10 ms from /proc; the
#             high-water mark only grows, the last reading before it exits is the peak),
#             and the largest VmHWM of any sandrun process of the run (its helpers).
# Targets: sandrun wall <= 0.25x podman's; sandrun overhead < 300 ms; peak RSS < 40 MB.
#
# As root it re-runs itself as the rootless test user `sandrun-test` (scripts/test.sh).
set -eu
ROUNDS="${ROUNDS:-10}"

if [ "${1:-}" != "--inner" ]; then
    cd "$(dirname "$0")/.."
    command -v podman >/dev/null || apt-get install -y podman
    . bench/lib.sh
    prepare_workdir stage "$0"
    mkdir -p "$W/ws"
    cp -r images "$W/ws/images"
    DL=/tmp/sandrun-test-downloads
    if [ "$(id -u)" -eq 0 ]; then
        chown -R sandrun-test: "$W"
        as_test_user ROUNDS="$ROUNDS" SANDRUN_DOWNLOAD_CACHE="$DL" sh "$W/stage.sh" --inner "$W" || status=$?
    else
        SANDRUN_DOWNLOAD_CACHE="$DL" sh "$W/stage.sh" --inner "$W" || status=$?
    fi
    remove_workdir
    exit "${status:-0}"
fi

W="$2"
cd "$W"
export SANDRUN_HOME="$W/store"
echo "user: $(id -un) (uid $(id -u)), $ROUNDS rounds, $(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# The five steps, as scripts in the workspace (mounted at /harness by both tools), each
# stamping its own start and end.
mkdir -p ws/steps
STEPS=
step() { # NAME IMAGE BODY
    printf 'read up _ < /proc/uptime; echo "$up" >> /harness/stamps\n%s\nread up _ < /proc/uptime; echo "$up" >> /harness/stamps\n' "$3" > "ws/steps/$1.sh"
    STEPS="$STEPS $1:$2"
}
step ask_pg1 postgres 'until pg_isready -q -h pg1 -U postgres; do sleep 0.05; done; psql -h pg1 -U postgres -tAc "select 1"'
step ask_pg2 postgres 'until pg_isready -q -h pg2 -p ${PG2_PORT:-5432} -U postgres; do sleep 0.05; done; psql -h pg2 -p ${PG2_PORT:-5432} -U postgres -tAc "select 2"'
step ask_cache redis 'until redis-cli -h cache ping >/dev/null 2>&1; do sleep 0.05; done; redis-cli -h cache set k v >/dev/null; redis-cli -h cache get k'
step write postgres 'psql -h pg1 -U postgres -qc "create table t (n int); insert into t select generate_series(1, 1000)"; psql -h pg2 -p ${PG2_PORT:-5432} -U postgres -qc "create table u (n int)"'
step read postgres 'psql -h pg1 -U postgres -tAc "select sum(n) from t"; psql -h pg2 -p ${PG2_PORT:-5432} -U postgres -tAc "select count(*) from u"'

{
    printf 'stage:\n  identifier: bench\n  name: bench\n  type: CI\n  spec:\n    execution:\n      steps:\n'
    for s in pg1:postgres pg2:postgres cache:redis; do
        printf '        - step:\n            type: Background\n            name: %s\n            identifier: %s\n            spec:\n              image: ./images/%s.yaml\n' "${s%%:*}" "${s%%:*}" "${s#*:}"
        [ "${s#*:}" = postgres ] && printf '              envVariables:\n                POSTGRES_HOST_AUTH_METHOD: trust\n'
    done
    for s in $STEPS; do
        printf '        - step:\n            type: Run\n            name: %s\n            identifier: %s\n            spec:\n              image: ./images/%s.yaml\n              shell: Sh\n              command: sh /harness/steps/%s.sh\n' "${s%%:*}" "${s%%:*}" "${s#*:}" "${s%%:*}"
    done
} > ws/stage.yaml

# The images: built from the recipes, saved, and loaded into podman's storage.
cd ws
for r in postgres redis; do ../sandrun build --color never "images/$r.yaml"; done
cd ..
# One archive per image: `podman load` refuses an OCI archive holding several images.
PG=localhost/sandrun-bench-postgres:15
RD=localhost/sandrun-bench-redis:7
load_in_podman() { # REF PODMAN_NAME
    ./sandrun save --color never -o image.tar "$1" >/dev/null
    loaded=$(podman load -q -i image.tar | sed -n 's/^Loaded image[^:]*: *//p' | head -n 1)
    podman tag "$loaded" "$2"
    rm -f image.tar
}
load_in_podman localhost/postgres:15 "$PG"
load_in_podman localhost/redis:7 "$RD"

# runc: crun refuses this hybrid cgroup host rootless (as in bench/start.sh).
run_podman() {
    podman --runtime runc pod create --name sandrun-bench --network none \
        --add-host pg1:127.0.0.1 --add-host pg2:127.0.0.1 --add-host cache:127.0.0.1 >/dev/null || return 1
    podman --runtime runc run -d --pod sandrun-bench --name pg1 -e POSTGRES_HOST_AUTH_METHOD=trust "$PG" >/dev/null || return 1
    podman --runtime runc run -d --pod sandrun-bench --name pg2 -e POSTGRES_HOST_AUTH_METHOD=trust "$PG" postgres -c port=5433 >/dev/null || return 1
    podman --runtime runc run -d --pod sandrun-bench --name cache "$RD" >/dev/null || return 1
    for s in $STEPS; do
        img=$PG; [ "${s#*:}" = redis ] && img=$RD
        podman --runtime runc run --rm --pod sandrun-bench -e PG2_PORT=5433 -v "$W/ws:/harness" -w /harness "$img" \
            sh "/harness/steps/${s%%:*}.sh" >/dev/null || return 1
    done
    podman --runtime runc pod rm -f -t 10 sandrun-bench >/dev/null
}

now() { date +%s%N; }
# Peak RSS (kB) of the `sandrun run` process and of its largest sandrun process, polled.
watch_rss() { # PID
    main=0; any=0
    while kill -0 "$1" 2>/dev/null; do
        h=$(awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || true)
        [ -n "$h" ] && [ "$h" -gt "$main" ] && main=$h
        for p in $(pgrep -f "$W/sandrun|\.\./sandrun" 2>/dev/null); do
            h=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
            [ -n "$h" ] && [ "$h" -gt "$any" ] && any=$h
        done
        sleep 0.01
    done
    echo "$main $any" >> rss
}
measure() { # TOOL
    : > ws/stamps; chmod 666 ws/stamps  # the redis image runs as user redis
    t0=$(now)
    if [ "$1" = sandrun ]; then
        (cd ws && exec ../sandrun run --color never stage.yaml >../sandrun.out 2>&1) & pid=$!
        watch_rss "$pid" & watcher=$!
        wait "$pid" || { echo "sandrun failed:"; cat sandrun.out; exit 1; }
        wait "$watcher"
    else
        run_podman || { echo "podman failed"; exit 1; }
    fi
    t1=$(now)
    wall=$(( (t1 - t0) / 1000000 ))
    work=$(awk 'NR % 2 { s = $1; next } { w += $1 - s } END { printf "%d", w * 1000 }' ws/stamps)
    echo "$wall $work" >> "times.$1"
}

# One warm-up each (page cache, podman's storage).
measure sandrun
measure podman
rm -f times.* rss
i=1
while [ "$i" -le "$ROUNDS" ]; do
    if [ $((i % 2)) -eq 1 ]; then measure sandrun; measure podman; else measure podman; measure sandrun; fi
    i=$((i + 1))
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }
SW=$(cut -d' ' -f1 times.sandrun | median)
SK=$(cut -d' ' -f2 times.sandrun | median)
SO=$(awk '{print $1 - $2}' times.sandrun | median)
PW=$(cut -d' ' -f1 times.podman | median)
PK=$(cut -d' ' -f2 times.podman | median)
PO=$(awk '{print $1 - $2}' times.podman | median)
RM=$(cut -d' ' -f1 rss | median)
RA=$(cut -d' ' -f2 rss | sort -n | tail -1)
echo "medians of $ROUNDS (ms):   wall   work   overhead (wall - work)"
printf 'sandrun               %6d %6d %6d\n' "$SW" "$SK" "$SO"
printf 'podman                %6d %6d %6d\n' "$PW" "$PK" "$PO"
awk -v s="$SW" -v p="$PW" 'BEGIN {printf "sandrun/podman wall = %.2f (target <= 0.25)\n", s / p}'
echo "sandrun overhead = $SO ms (target < 300 ms)"
echo "sandrun peak RSS: run process $((RM / 1024)) MB (median), any sandrun process $((RA / 1024)) MB (max) (target < 40 MB)"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
podman rmi -f "$PG" "$RD" localhost/postgres:15 localhost/redis:7 >/dev/null 2>&1 || true
