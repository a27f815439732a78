#!/bin/sh
# Container start benchmark (issue 4). Not a test: prints figures.
# Time from process start to exit of a container running `true` from a cached busybox
# image, rootless: sandrun vs `crun run` and `runc run` on a bundle of the same root
# filesystem vs `podman run --rm` of the same image. Alternating order, 20 rounds,
# medians, ratios. Targets: sandrun <= 1.2x crun, <= 0.15x podman.
#
# sandrun is measured as `sandrun __container SPEC` (the per-step helper the runner
# spawns: user namespace entry, overlay of the cached layer, OCI spec, libcontainer
# create/start/wait/delete, cleanup); with SANDRUN_BENCH_STAGE=1 it is measured as
# `sandrun run` of a one-step stage instead (needs image steps wired into `run`).
#
# As root it re-runs itself as the rootless test user `sandrun-test` (created by the
# test suite). `unshare` is the cost of entering sandrun's user namespace alone
# (`sandrun __unshare true`), paid by sandrun and crun here. No network namespace for anyone (sandrun's step
# network is made by the net layer, benchmarked in bench/net.sh).
set -eu
ROUNDS="${ROUNDS:-20}"

if [ "${1:-}" != "--inner" ]; then
    cd "$(dirname "$0")/.."
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
    cargo build --release --quiet --bin sandrun
    SANDRUN="$CARGO_TARGET_DIR/release/sandrun"
    W=$(mktemp -d /tmp/sandrun-bench-start.XXXXXX)
    cp "$SANDRUN" "$W/sandrun"
    cp "$0" "$W/start.sh"
    chmod 755 "$W" "$W/sandrun" "$W/start.sh"
    if [ "$(id -u)" -eq 0 ]; then
        id sandrun-test >/dev/null 2>&1 || { echo "no user sandrun-test: run the test suite once to create it"; exit 1; }
        chown sandrun-test: "$W"
        home=$(getent passwd sandrun-test | cut -d: -f6)
        setpriv --reuid=sandrun-test --regid=sandrun-test --clear-groups \
            env -i PATH="$PATH" HOME="$home" USER=sandrun-test ROUNDS="$ROUNDS" \
            SANDRUN_BENCH_STAGE="${SANDRUN_BENCH_STAGE:-}" \
            sh "$W/start.sh" --inner "$W" || status=$?
    else
        sh "$W/start.sh" --inner "$W" || status=$?
    fi
    rm -rf "$W" 2>/dev/null || "$SANDRUN" __unshare rm -rf "$W"
    exit "${status:-0}"
fi

W="$2"
cd "$W"
echo "user: $(id -un) (uid $(id -u)), $ROUNDS rounds"

# The image: busybox-static with its applets and a passwd, as one layer dir.
mkdir -p rootfs/bin rootfs/etc rootfs/proc rootfs/dev rootfs/sys rootfs/tmp
cp /bin/busybox rootfs/bin/
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "rootfs/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' > rootfs/etc/passwd
printf 'root:x:0:\n' > rootfs/etc/group

# sandrun: the helper's spec for a Run step `true` (sh -c 'set -e; true').
mkdir -p ws state
cat > spec.json <<EOF
{"id":"bench","step":"bench","hostname":"bench",
 "image":{"reference":"busybox:bench","layers":["$W/rootfs"],
          "config":{"entrypoint":[],"cmd":["sh"],"env":[],"working_dir":null,"user":null}},
 "process":{"Shell":{"shell":"Sh","script":"true"}},
 "env":[],"user":null,"working_dir":"/harness",
 "mounts":[{"source":"$W/ws","destination":"/harness","readonly":false}],
 "resources":{"memory_bytes":null,"cpu_millis":null},"privileged":false,
 "state_dir":"$W/state/run"}
EOF
cat > stage.yaml <<EOF
stage:
  identifier: bench
  name: bench
  type: CI
  spec:
    execution:
      steps:
        - step:
            identifier: t
            name: t
            type: Run
            spec:
              image: busybox:bench
              shell: Sh
              command: "true"
EOF

# crun / runc: bundles on the same root filesystem, no network namespace. crun refuses
# this hybrid cgroup host rootless; it runs inside `sandrun __unshare` (the same user
# namespace entry sandrun's helper makes, with cgroup2 bound over /sys/fs/cgroup), so
# its bundle has no user namespace of its own. runc runs its own rootless bundle.
mkdir -p bundle-crun bundle-runc crun-state runc-state
(cd bundle-crun && crun spec --rootless)
(cd bundle-runc && runc spec --rootless)
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
for tool in ("crun", "runc"):
    p = f"{w}/bundle-{tool}/config.json"
    c = json.load(open(p))
    c["root"] = {"path": f"{w}/rootfs", "readonly": True}
    c["process"]["args"] = ["true"]
    c["process"]["terminal"] = False
    drop = {"network", "user"} if tool == "crun" else {"network"}
    c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] not in drop]
    if tool == "crun":
        c["linux"].pop("uidMappings", None)
        c["linux"].pop("gidMappings", None)
        c["mounts"] = [m for m in c["mounts"] if m["destination"] != "/sys/fs/cgroup"]
    json.dump(c, open(p, "w"))
PY

# podman: the same root filesystem imported as an image.
PODMAN=yes
tar -C rootfs -cf rootfs.tar .
if ! podman import -q rootfs.tar localhost/sandrun-bench-busybox:latest >/dev/null 2>podman.err; then
    echo "podman import failed (podman skipped): $(tail -1 podman.err)"
    PODMAN=
fi

run_sandrun() {
    if [ -n "${SANDRUN_BENCH_STAGE:-}" ]; then
        ./sandrun run stage.yaml >/dev/null
    else
        ./sandrun __container spec.json
    fi
}
run_unshare() { ./sandrun __unshare true; }
run_crun() { ./sandrun __unshare crun --root crun-state --cgroup-manager=disabled run -b bundle-crun "c$1" >/dev/null; }
run_runc() { runc --root runc-state run -b bundle-runc "r$1" >/dev/null; }
run_podman() { podman run --rm --network=none --runtime runc localhost/sandrun-bench-busybox:latest true >/dev/null; }

now() { date +%s%N; }
measure() { # name round
    t0=$(now)
    "run_$1" "$2" || { echo "$1 failed" >&2; exit 1; }
    t1=$(now)
    echo $(( (t1 - t0) / 1000 )) >> "times.$1"
}

TOOLS="sandrun crun runc unshare"
[ -n "$PODMAN" ] && TOOLS="$TOOLS podman"
# One warm-up each (page cache, podman's storage).
for t in $TOOLS; do "run_$t" 0 >/dev/null 2>&1 || { echo "$t does not work here:"; "run_$t" 0; exit 1; }; done
i=1
while [ "$i" -le "$ROUNDS" ]; do
    # Rotate the order every round.
    order=$(echo "$TOOLS" | awk -v r="$i" '{for (k = 0; k < NF; k++) printf "%s ", $((k + r) % NF + 1)}')
    for t in $order; do measure "$t" "$i"; done
    i=$((i + 1))
done

median() { sort -n "times.$1" | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }
S=$(median sandrun)
awk -v s="$S" 'BEGIN {printf "%-8s median %7.1f ms\n", "sandrun", s / 1000}'
for t in $TOOLS; do
    [ "$t" = sandrun ] && continue
    M=$(median "$t")
    awk -v s="$S" -v m="$M" -v t="$t" 'BEGIN {printf "%-8s median %7.1f ms   sandrun/%s = %.2f\n", t, m / 1000, t, s / m}'
done
[ -n "$PODMAN" ] && podman rmi -f localhost/sandrun-bench-busybox:latest >/dev/null 2>&1 || true
