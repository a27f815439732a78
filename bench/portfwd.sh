#!/bin/sh
# Port binding throughput end to end (issue 5). Not a test: prints figures.
# A Background step of a busybox image serves a TCP sink (bench/sink.c, static) behind
# `portBindings`; a pusher on the host sends MIB MiB to the host port. Three lines,
# alternating every round, ROUNDS rounds (default 7), medians:
# - direct:  the same sink run on the host, pushed to over the host's loopback;
# - handoff: `sandrun run` as it is: the service's accept(2) takes the host connection
#            itself (seccomp notification, src/net/handoff.rs);
# - host:    the same with the sink as a host step (no image), also handed over;
# - proxy:   the container run with SANDRUN_PORT_HANDOFF=off: the splice(2) port proxy.
# Also the machine's CPU-seconds per GiB moved (all processes, from /proc/stat), and
# the time to a first answer on a fresh connection (connect, 8-byte answer).
# As root it runs root, then rootless as `sandrun-test` (scripts/test.sh creates it).
# Target: handoff (and proxy) at least 0.8x direct.
set -eu
ROUNDS="${ROUNDS:-7}"
MIB="${MIB:-2048}"

if [ "${1:-}" != "--inner" ]; then
    cd "$(dirname "$0")/.."
    . bench/lib.sh
    prepare_workdir portfwd "$0"
    gcc -O2 -static -o "$W/sink" bench/sink.c
    chmod 755 "$W/sink"
    if [ "$(id -u)" -eq 0 ]; then
        echo "== root"
        mkdir "$W/root"
        ROUNDS="$ROUNDS" MIB="$MIB" sh "$W/portfwd.sh" --inner "$W/root" || status=$?
        if id sandrun-test >/dev/null 2>&1; then
            echo "== rootless (sandrun-test)"
            mkdir "$W/rootless"
            chown sandrun-test: "$W/rootless"
            as_test_user ROUNDS="$ROUNDS" MIB="$MIB" sh "$W/portfwd.sh" --inner "$W/rootless" ||
                status=$?
        fi
    else
        echo "== rootless"
        mkdir "$W/rootless"
        sh "$W/portfwd.sh" --inner "$W/rootless" || status=$?
    fi
    remove_workdir
    exit "${status:-0}"
fi

D="$2"
B=$(dirname "$D")
cd "$D"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
hz=$(getconf CLK_TCK)

# The image: busybox and the sink.
mkdir -p rootfs/bin rootfs/etc
cp /bin/busybox "$B/sink" rootfs/bin/
ln -s busybox rootfs/bin/sh
printf 'root:x:0:0:root:/root:/bin/sh\n' > rootfs/etc/passwd
export SANDRUN_HOME="$D/store"
. "$B/lib.sh"
load_image "$B/sandrun" sink:bench

start_run() { # name host-port image|- [env...]
    name=$1 port=$2 image=$3
    shift 3
    if [ "$image" = - ]; then
        image_line="" sink="$B/sink"
    else
        image_line="image: $image" sink=/bin/sink
    fi
    mkdir -p "ws-$name"
    cat > "ws-$name/stage.yaml" <<YAML
stage:
  identifier: bench
  name: bench
  type: CI
  spec:
    execution:
      steps:
        - step:
            identifier: sink
            name: sink
            type: Background
            spec:
              $image_line
              shell: Sh
              command: exec $sink sink 9000
              portBindings:
                "$port": "9000"
        - step:
            identifier: hold
            name: hold
            type: Run
            spec:
              $image_line
              shell: Sh
              command: while [ ! -f done ]; do sleep 0.1; done
YAML
    (cd "ws-$name" && env "$@" "$B/sandrun" run --color never stage.yaml >run.log 2>&1 &)
    i=0
    until "$B/sink" push 127.0.0.1 "$port" 1 >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -lt 200 ] || { echo "$name: the service never answered"; cat "ws-$name/run.log"; exit 1; }
        sleep 0.1
    done
}

DIRECT=$(free_port)
"$B/sink" sink "$DIRECT" &
SINK=$!
HANDOFF=$(free_port)
start_run handoff "$HANDOFF" sink:bench SANDRUN_PORT_HANDOFF=on
HOST=$(free_port)
start_run host "$HOST" - SANDRUN_PORT_HANDOFF=on
PROXY=$(free_port)
start_run proxy "$PROXY" sink:bench SANDRUN_PORT_HANDOFF=off
trap 'kill $SINK 2>/dev/null; touch ws-handoff/done ws-host/done ws-proxy/done' EXIT
echo "$(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg), $ROUNDS rounds of $MIB MiB"

r=0
while [ $r -lt "$ROUNDS" ]; do
    for line in direct handoff host proxy; do
        case $line in direct) port=$DIRECT ;; handoff) port=$HANDOFF ;; host) port=$HOST ;; proxy) port=$PROXY ;; esac
        c0=$(busy)
        mbps=$("$B/sink" push 127.0.0.1 "$port" "$MIB")
        c1=$(busy)
        echo "$line $mbps $(echo "$c0 $c1 $hz $MIB" | awk '{printf "%.2f", ($2-$1)/$3/($4/1024)}')" >> results
    done
    r=$((r + 1))
done
# First answer on a fresh connection, 200 times each (python on the host).
for line in direct handoff host proxy; do
    case $line in direct) port=$DIRECT ;; handoff) port=$HANDOFF ;; host) port=$HOST ;; proxy) port=$PROXY ;; esac
    python3 - "$port" "$line" >> latency <<'PY'
import socket, sys, time
port, line = int(sys.argv[1]), sys.argv[2]
ts = []
for _ in range(200):
    t = time.perf_counter()
    c = socket.create_connection(("127.0.0.1", port))
    c.shutdown(socket.SHUT_WR)
    c.recv(8)
    ts.append((time.perf_counter() - t) * 1e3)
    c.close()
ts.sort()
print(f"{line} {ts[len(ts)//2]:.3f} {ts[int(len(ts)*0.99)]:.3f}")
PY
done
touch ws-handoff/done ws-host/done ws-proxy/done
kill $SINK 2>/dev/null || true
sleep 1
python3 - <<'PY'
rows = [l.split() for l in open("results")]
med = lambda v: sorted(v)[len(v) // 2]
mb = {k: med([float(r[1]) for r in rows if r[0] == k]) for k in ("direct", "handoff", "host", "proxy")}
cpu = {k: med([float(r[2]) for r in rows if r[0] == k]) for k in ("direct", "handoff", "host", "proxy")}
lat = {l.split()[0]: l.split()[1:] for l in open("latency")}
for k in ("direct", "handoff", "host", "proxy"):
    all_ = " ".join(r[1] for r in rows if r[0] == k)
    print(f"{k:8} {mb[k]:6.0f} MiB/s ({mb[k] / mb['direct']:.2f}x direct)  CPU {cpu[k]:.2f} s/GiB  "
          f"fresh connection {lat[k][0]} ms (p99 {lat[k][1]})  [all: {all_}]")
PY
