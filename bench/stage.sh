#!/bin/sh
# Warm stage benchmark (issue 14). Not a test: prints figures.
# One CI stage: three Background services (two PostgreSQL servers on port 5432 and a
# Redis, from the recipes in images/) and five Run steps that wait for and use them.
# sandrun (`sandrun run stage.yaml`) against podman doing the same work rootless: a
# pod, the services as `podman run -d --pod`, the five steps as `podman run --rm --pod`
# one after the other, then the pod removed. Both use the same images: sandrun builds
# them from the recipes, `sandrun save` writes each into an archive and `podman load`
# reads it into a podman storage of the benchmark's own (overlay, native rootless).
# Alternating order, ROUNDS rounds (default 10), medians. Then RSS_ROUNDS (default 3)
# untimed runs of sandrun under bench/rss.c for its memory.
#
# What differs between the two, and why (this host: rootless podman 4.3 through runc,
# since crun refuses this hybrid cgroup host rootless):
# - Network. Rootless podman networks need slirp4netns (or pasta), which opens
#   /dev/net/tun; users cannot open it here (mode 0600). So the pod has
#   `--network none`: one network namespace with loopback only, shared by all its
#   containers. That is cheaper than what sandrun does (a bridge, and a namespace,
#   veth and address for every step and service), so it favours podman.
# - Names. With `--network none` podman writes no `--add-host` entries into
#   /etc/hosts (podman 4.3), so every step container of the pod gets the same hosts
#   file, bound over /etc/hosts, naming pg1, pg2 and cache as 127.0.0.1. (Without it
#   the names do not resolve, `pg_isready -h pg1` answers "no response" for ever: the
#   earlier version of this script hung there.)
# - Ports. One namespace cannot hold two servers on 5432, so podman's second
#   PostgreSQL listens on 5433 (`-c port=5433`; its steps get PG2_PORT=5433). sandrun's
#   two servers both listen on 5432, each on its own address.
# - Storage. The benchmark gives podman a storage of its own (`--root`, `--runroot`
#   under the work directory) with the overlay driver: the user's default storage here
#   is vfs, which copies the 400 MB PostgreSQL image for every container.
#
# Figures:
# - wall:     the whole command (sandrun run / the podman sequence), start to exit.
# - steps:    what the steps themselves spend: each Run step stamps /proc/uptime (10 ms
#             resolution) as its command starts and ends, into the workspace; the sum
#             of the five (end - start). It includes the steps' own waits for the
#             services to accept connections (initdb and server start), which are the
#             services' work, not the tool's.
# - ready:    sandrun itself waits, before the step after a Background step, until the
#             service accepts connections on its ports (podman does not: there the
#             steps' waits above take that time). That too is the services' work: the
#             time the stage was held for it, from sandrun's `--json` events
#             (`step_ready`'s `waited`, from the service's start to its ports
#             answering: services started together count once, with the longest wait).
#             Each wait includes that service's container start (sandrun's), which is
#             at most the Redis service's whole wait; the script prints it.
# - overhead: wall - steps - ready: images, networks, the containers of steps and
#             services, stopping the services at the end, output, cleanup.
# The timed sandrun runs use `--json` (for the millisecond waits); the memory runs the
# default terminal output.
# - memory:   from bench/rss.c, in separate untimed runs (sampling /proc every 2 ms
#             would slow the timed runs): the VmHWM of the `sandrun run` process, the
#             largest VmHWM of any sandrun process (runner, zygote, per-step helpers),
#             and the peak of the sum of their VmRSS (an upper bound: pages they share
#             count in each) and of their PSS (shared pages divided; rootless the
#             runner's smaps cannot be read from outside its user namespace).
# Targets: sandrun wall <= 0.25x podman's; sandrun overhead < 300 ms; peak RSS < 40 MB.
# Every wait is bounded: a step gives up on a service after 60 s, a whole run after
# TIMEOUT seconds (default 300), and so does every podman command; the script then
# stops with a message.
#
# As root it re-runs itself as the rootless test user `sandrun-test` (scripts/test.sh).
set -eu
ROUNDS="${ROUNDS:-10}"
RSS_ROUNDS="${RSS_ROUNDS:-3}"
TIMEOUT="${TIMEOUT:-300}"

if [ "${1:-}" != "--inner" ]; then
    cd "$(dirname "$0")/.."
    command -v podman >/dev/null || apt-get install -y podman
    . bench/lib.sh
    prepare_workdir stage "$0"
    gcc -O2 -o "$W/rss" bench/rss.c
    mkdir -p "$W/ws"
    cp -r images "$W/ws/images"
    DL=/tmp/sandrun-test-downloads
    if [ "$(id -u)" -eq 0 ]; then
        chown -R sandrun-test: "$W"
        as_test_user ROUNDS="$ROUNDS" RSS_ROUNDS="$RSS_ROUNDS" TIMEOUT="$TIMEOUT" \
            SANDRUN_DOWNLOAD_CACHE="$DL" sh "$W/stage.sh" --inner "$W" || status=$?
    else
        SANDRUN_DOWNLOAD_CACHE="$DL" sh "$W/stage.sh" --inner "$W" || status=$?
    fi
    # podman's storage holds files of sub-ids: removed from inside its user namespace.
    if [ -d "$W/podman" ]; then
        if [ "$(id -u)" -eq 0 ]; then
            as_test_user podman unshare rm -rf "$W/podman" 2>/dev/null || true
        else
            podman unshare rm -rf "$W/podman" 2>/dev/null || true
        fi
    fi
    remove_workdir
    exit "${status:-0}"
fi

W="$2"
cd "$W"
export SANDRUN_HOME="$W/store"
echo "user: $(id -un) (uid $(id -u)), $ROUNDS rounds, $(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"
fail() { echo "stage.sh: $*" >&2; exit 1; }

# The five steps, as scripts in the workspace (mounted at /harness by both tools), each
# stamping its own start and end. `ready WHAT COMMAND...` retries COMMAND every 50 ms
# for at most 60 s.
mkdir -p ws/steps
STEPS=
step() { # NAME IMAGE BODY
    {
        echo 'read up _ < /proc/uptime; echo "$up" >> /harness/stamps'
        echo 'ready() { w=$1; shift; n=0; until "$@" >/dev/null 2>&1; do n=$((n + 1)); [ $n -lt 1200 ] || { echo "$w: not ready after 60 s" >&2; exit 1; }; sleep 0.05; done; }'
        echo "$3"
        echo 'read up _ < /proc/uptime; echo "$up" >> /harness/stamps'
    } > "ws/steps/$1.sh"
    STEPS="$STEPS $1:$2"
}
step ask_pg1 postgres 'ready pg1 pg_isready -h pg1 -U postgres; psql -h pg1 -U postgres -tAc "select 1"'
step ask_pg2 postgres 'ready pg2 pg_isready -h pg2 -p ${PG2_PORT:-5432} -U postgres; psql -h pg2 -p ${PG2_PORT:-5432} -U postgres -tAc "select 2"'
step ask_cache redis 'ready cache redis-cli -h cache ping; redis-cli -h cache set k v >/dev/null; redis-cli -h cache get k'
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
for r in postgres redis; do ../sandrun build --color never "images/$r.yaml" >/dev/null || fail "sandrun build images/$r.yaml failed"; done
cd ..
PG=localhost/postgres:15
RD=localhost/redis:7
# Every podman command is bounded by TIMEOUT.
podman() { timeout "$TIMEOUT" podman --root "$W/podman/root" --runroot "$W/podman/run" --storage-driver overlay --runtime runc "$@"; }
for ref in "$PG" "$RD"; do
    # One archive per image: `podman load` refuses an OCI archive holding several.
    ./sandrun save --color never -o image.tar "$ref" >/dev/null 2>&1 || fail "sandrun save $ref failed"
    podman load -q -i image.tar 2>&1 | grep -q "Loaded image.*$ref" || fail "podman load of $ref failed"
    rm -f image.tar
done
# The names the steps use, for the pod's containers (see the header).
printf '127.0.0.1 localhost pg1 pg2 cache\n::1 localhost ip6-localhost\n' > hosts
chmod 644 hosts

run_podman() {
    podman pod create --name sandrun-bench --network none >/dev/null || return 1
    podman run -d --pod sandrun-bench --name pg1 -e POSTGRES_HOST_AUTH_METHOD=trust "$PG" >/dev/null || return 1
    podman run -d --pod sandrun-bench --name pg2 -e POSTGRES_HOST_AUTH_METHOD=trust "$PG" postgres -c port=5433 >/dev/null || return 1
    podman run -d --pod sandrun-bench --name cache "$RD" >/dev/null || return 1
    for s in $STEPS; do
        img=$PG; [ "${s#*:}" = redis ] && img=$RD
        podman run --rm --pod sandrun-bench -e PG2_PORT=5433 -v "$W/hosts:/etc/hosts:ro" \
            -v "$W/ws:/harness" -w /harness "$img" sh "/harness/steps/${s%%:*}.sh" >>podman.out 2>&1 || return 1
    done
    podman pod rm -f -t 10 sandrun-bench >/dev/null
}

now() { date +%s%N; }
measure() { # TOOL
    : > ws/stamps; chmod 666 ws/stamps  # the redis image runs as user redis
    t0=$(now)
    if [ "$1" = sandrun ]; then
        (cd ws && exec timeout "$TIMEOUT" ../sandrun run --json stage.yaml) >sandrun.out 2>sandrun.err \
            || { cat sandrun.err; grep -v '"output"' sandrun.out; fail "sandrun run failed (or took over $TIMEOUT s)"; }
        # sandrun's own waits for the services' ports (see the header).
        ready=$(awk -F'"waited":' '
            /"event":"step_started"/ && /"step_type":"Background"/ { if (seen) { total += cur; cur = 0; seen = 0 } }
            /"event":"step_ready"/ { w = $2 + 0; if (w > cur) cur = w; seen = 1 }
            END { printf "%d", total + cur }' sandrun.out)
        cache=$(awk -F'"waited":' '/"event":"step_ready"/ && /"step":"cache"/ { printf "%d", $2 }' sandrun.out)
    else
        : > podman.out
        ready=0 cache=0
        run_podman || { cat podman.out; podman pod rm -f -t 0 sandrun-bench >/dev/null 2>&1; fail "podman's run failed (or a command took over $TIMEOUT s)"; }
    fi
    t1=$(now)
    [ "$(wc -l < ws/stamps)" -eq 10 ] || { cat ws/stamps; fail "$1: the steps left $(wc -l < ws/stamps) stamps, not 10"; }
    wall=$(( (t1 - t0) / 1000000 ))
    work=$(awk 'NR % 2 { s = $1; next } { w += $1 - s } END { printf "%d", w * 1000 }' ws/stamps)
    echo "$wall $work $ready $cache" >> "times.$1"
}

# One warm-up each (page cache, podman's storage).
measure sandrun
measure podman
rm -f times.*
i=1
while [ "$i" -le "$ROUNDS" ]; do
    if [ $((i % 2)) -eq 1 ]; then measure sandrun; measure podman; else measure podman; measure sandrun; fi
    i=$((i + 1))
done
load_timed=$(cut -d' ' -f1-3 /proc/loadavg)

# Memory, untimed.
i=1
while [ "$i" -le "$RSS_ROUNDS" ]; do
    (cd ws && exec timeout "$TIMEOUT" ../rss ../rss.out ../sandrun ../sandrun run --color never stage.yaml) >sandrun.out 2>sandrun.err \
        || { cat sandrun.err sandrun.out; fail "sandrun run under rss failed"; }
    i=$((i + 1))
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }
SW=$(cut -d' ' -f1 times.sandrun | median)
SK=$(cut -d' ' -f2 times.sandrun | median)
SR=$(cut -d' ' -f3 times.sandrun | median)
SO=$(awk '{print $1 - $2 - $3}' times.sandrun | median)
SC=$(cut -d' ' -f4 times.sandrun | median)
PW=$(cut -d' ' -f1 times.podman | median)
PK=$(cut -d' ' -f2 times.podman | median)
PO=$(awk '{print $1 - $2}' times.podman | median)
# mb COLUMN: the largest value of that column of ./rss.out, in MB (-1: not readable).
mb() { cut -d' ' -f"$1" rss.out | sort -n | tail -n 1 | awk '{ if ($1 < 0) print "unreadable"; else printf "%.1f MB", $1 / 1024 }'; }
echo "medians of $ROUNDS (ms):   wall  steps  ready  overhead (wall - steps - ready)"
printf 'sandrun               %6d %6d %6d %6d\n' "$SW" "$SK" "$SR" "$SO"
printf 'podman                %6d %6d %6s %6d\n' "$PW" "$PK" - "$PO"
awk -v s="$SW" -v p="$PW" 'BEGIN {printf "sandrun/podman wall = %.2f (target <= 0.25)\n", s / p}'
echo "sandrun overhead = $SO ms (target < 300 ms); its ready waits include the services' container starts, at most $SC ms each (the Redis service's whole wait, median)"
echo "every round (wall steps ready cache, ms): sandrun $(tr '\n' ',' < times.sandrun) podman $(tr '\n' ',' < times.podman)"
echo "sandrun memory, largest of $RSS_ROUNDS runs (target < 40 MB): runner VmHWM $(mb 1),"
echo "  largest sandrun process VmHWM $(mb 2); all sandrun processes at once: VmRSS sum $(mb 3) (shared pages counted in each), PSS sum $(mb 4); up to $(cut -d' ' -f5 rss.out | sort -n | tail -n 1) processes"
echo "load average after the timed rounds: $load_timed; now: $(cut -d' ' -f1-3 /proc/loadavg)"
