#!/bin/sh
# Benchmark: `sandrun pull` (cold) against the peers doing the same work
# (`skopeo copy docker://... oci:DIR` + `umoci raw unpack --rootless`: fetch, verify,
# unpack), alternating, on a ~200 MB 4-layer image served by a loopback
# docker-registry; then a warm pull, and a second image sharing 3 base layers.
#
# Usage: bench/pull.sh [SANDRUN_BINARY] [RUNS]   (default: target/release/sandrun, 5)
#        BEFORE=OTHER_BINARY bench/pull.sh ...   also times OTHER_BINARY's cold pull in
#                                each round (a change measured before/after in one run)
#        bench/pull.sh --serve   builds the image, serves it and waits (for profiling a
#                                pull by hand: `perf record -g sandrun pull ...`); Ctrl-C ends it
#        BENCH_DIR=DIR bench/pull.sh ...   works in DIR instead of /dev/shm (a disk)
# Needs: docker-registry skopeo umoci busybox-static hyperfine (Debian packages).
set -eu

SERVE=
if [ "${1:-}" = --serve ]; then SERVE=1; shift; fi
BIN=${1:-${CARGO_TARGET_DIR:-target}/release/sandrun}
RUNS=${2:-5}
BIN=$(readlink -m "$BIN")
[ -n "$SERVE" ] || [ -x "$BIN" ] || { echo "no sandrun binary at $BIN (cargo build --release)"; exit 1; }
for t in docker-registry skopeo umoci hyperfine; do
  command -v $t >/dev/null || { echo "missing $t"; exit 1; }
done

# BENCH_DIR=/var/tmp puts the registry, the store and the peers' output on a disk
# instead of tmpfs (then the store's syncs cost what they cost on a real machine).
BASE=${BENCH_DIR:-/dev/shm}
[ -d "$BASE" ] && [ -w "$BASE" ] || BASE=/tmp
W=$(mktemp -d "$BASE/sandrun-bench.XXXXXX")
REG_PID=
cleanup() {
  if [ -n "$REG_PID" ]; then
    kill "$REG_PID" 2>/dev/null || true
    wait "$REG_PID" 2>/dev/null || true
  fi
  rm -rf "$W"
}
trap cleanup EXIT INT TERM

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$W/registry.yml" <<CFG
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $W/registry
http:
  addr: 127.0.0.1:$PORT
CFG
docker-registry serve "$W/registry.yml" >/dev/null 2>&1 &
REG_PID=$!
for _ in $(seq 100); do
  curl -s "http://127.0.0.1:$PORT/v2/" >/dev/null 2>&1 && break
  python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT))" 2>/dev/null && break
  sleep 0.05
done

echo "building the test image (4 layers, ~200 MB) ..."
ROOTLESS=
[ "$(id -u)" = 0 ] || ROOTLESS=--rootless
umoci init --layout "$W/oci" >/dev/null
umoci new --image "$W/oci:img" >/dev/null
umoci config --image "$W/oci:img" --architecture amd64 --os linux --config.cmd /bin/sh >/dev/null
layer() { # TAG FROM N: add a layer of ~50 MB (12 MB random + 38 MB text) to FROM as TAG
  rm -rf "$W/b"
  umoci unpack $ROOTLESS --image "$W/oci:$2" "$W/b" >/dev/null
  mkdir -p "$W/b/rootfs/data$3" "$W/b/rootfs/bin"
  [ -e "$W/b/rootfs/bin/busybox" ] || cp /bin/busybox "$W/b/rootfs/bin/busybox"
  head -c $((12 << 20)) /dev/urandom > "$W/b/rootfs/data$3/random"
  for i in $(seq 8); do seq $((i * 1000000 + $3)) 7 $((i * 1000000 + 5500000)); done | head -c $((38 << 20)) > "$W/b/rootfs/data$3/text"
  for i in $(seq 200); do echo "file $i of layer $3" > "$W/b/rootfs/data$3/small$i"; done
  [ "$1" = "$2" ] || umoci tag --image "$W/oci:$2" "$1" >/dev/null
  umoci repack --image "$W/oci:$1" "$W/b" >/dev/null
}
layer img img 1
layer img img 2
layer img img 3
layer shared img 5   # the second image: same 3 base layers, another 4th
layer img img 4
IMG=127.0.0.1:$PORT/bench/img:1
SHARED=127.0.0.1:$PORT/bench/shared:1
skopeo copy --quiet --dest-tls-verify=false "oci:$W/oci:img" "docker://$IMG"
skopeo copy --quiet --dest-tls-verify=false "oci:$W/oci:shared" "docker://$SHARED"
SIZE=$(du -sb "$W/registry" | cut -f1)
echo "image: $IMG ($(($SIZE / 1000000)) MB compressed in the registry, both images)"
if [ -n "$SERVE" ]; then
  echo "serving until interrupted; a cold pull: rm -rf DIR; SANDRUN_HOME=DIR sandrun pull $IMG"
  wait "$REG_PID"
  exit 0
fi

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

: > "$W/t.sandrun"; : > "$W/t.peers"; : > "$W/t.before"
BEFORE=${BEFORE:+$(readlink -f "$BEFORE")}
for i in $(seq "$RUNS"); do
  if [ -n "$BEFORE" ]; then
    rm -rf "$W/home"; sync
    t0=$(now); SANDRUN_HOME="$W/home" "$BEFORE" pull "$IMG" 2>/dev/null; t1=$(now)
    echo "$t1 - $t0" | bc >> "$W/t.before"
    echo "run $i: before $(tail -1 "$W/t.before") s"
  fi
  rm -rf "$W/home"; sync
  t0=$(now); SANDRUN_HOME="$W/home" "$BIN" pull "$IMG" 2>/dev/null; t1=$(now)
  echo "$t1 - $t0" | bc >> "$W/t.sandrun"
  rm -rf "$W/peer-oci" "$W/peer-bundle"; sync
  t0=$(now)
  skopeo copy --quiet --src-tls-verify=false "docker://$IMG" "oci:$W/peer-oci:x"
  umoci raw unpack --rootless --image "$W/peer-oci:x" "$W/peer-bundle" 2>/dev/null
  t1=$(now)
  echo "$t1 - $t0" | bc >> "$W/t.peers"
  echo "run $i: sandrun $(tail -1 "$W/t.sandrun") s, skopeo+umoci $(tail -1 "$W/t.peers") s"
done
S=$(median < "$W/t.sandrun"); P=$(median < "$W/t.peers")
echo "cold pull median: sandrun ${S} s, skopeo copy + umoci raw unpack ${P} s, ratio $(echo "scale=2; $S / $P" | bc)"
if [ -n "$BEFORE" ]; then
  B=$(median < "$W/t.before")
  echo "before (${BEFORE}) median: ${B} s, ratio $(echo "scale=2; $B / $P" | bc)"
fi

echo "warm pull (image present):"
SANDRUN_HOME="$W/home" hyperfine --warmup 3 --runs 30 -N "$BIN pull $IMG" 2>/dev/null | grep -E "Time|Range"

echo "second image sharing 3 base layers:"
SANDRUN_HOME="$W/home" "$BIN" pull "$SHARED" 2>&1 | tail -1
