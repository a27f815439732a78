#!/bin/sh
# Container start benchmark (issue 4). Not a test: prints figures.
# Time from process start to exit of a step running `true` in a cached busybox image,
# rootless: sandrun (`sandrun run` of a one-step stage) vs `crun run` and `runc run` on
# a bundle of the same root filesystem vs `podman run --rm` of the same image.
# Alternating order (shuffled every round), ROUNDS rounds (default 20), medians, ratios.
# Targets: sandrun <= 1.0x crun, <= 0.15x podman.
#
# What each line pays:
# - sandrun:  the whole `sandrun run stage.yaml`: user-namespace entry (newuidmap and
#             newgidmap), YAML, plan, store lookup of the present image (its warm pull
#             path), the stage network (a namespace and address for the step), the
#             per-step helper (overlay of the cached layer, OCI spec, libcontainer
#             create/start/wait/delete), output, summary and cleanup. The image is in a
#             private store (SANDRUN_HOME), imported with `sandrun load` from an OCI
#             archive built here with umoci and skopeo.
# - pod:      the same with `--network pod` (the step's namespace has only loopback:
#             no bridge, veth or address), to show what the bridge network costs.
# - helper:   the per-step helper alone (`sandrun __container SPEC`, entering its own
#             user namespace since nobody else did), for where the time goes.
# - crun:     crun refuses this hybrid cgroup host rootless, so it runs inside
#             `sandrun __unshare` (the same user-namespace entry sandrun makes, with
#             cgroup2 bound over /sys/fs/cgroup); its bundle has no user namespace of its
#             own, and the network namespace of `crun spec` (loopback only), as every
#             sandrun step has its own network namespace. It loads no seccomp filter.
# - crunsec:  the same crun bundle with the seccomp filter every non-privileged sandrun
#             step gets (`sandrun __seccomp-profile`), as podman would give crun its
#             default profile: crun has libseccomp compile it on every start.
# - runc:     its own rootless bundle (`runc spec --rootless`), plus a network
#             namespace (loopback only) like crun's.
# - unshare:  `sandrun __unshare true`, the cost of that user-namespace entry alone.
# - podman:   `podman run --rm --network=none --runtime runc` of the same root
#             filesystem imported as an image (crun as podman's runtime fails here the
#             same way); `--network=none` is a network namespace with loopback only.
#
# As root it re-runs itself as the rootless test user `sandrun-test` (created by
# scripts/test.sh) for the figures above, then measures the root path (issue 18) on the
# same image and stage, alternating in one loop:
# - root:     `sandrun run` as root (its own store, loaded from the same archive).
# - rootless: the same `sandrun run` as `sandrun-test` on the rootless store.
#             Both are started through `setpriv` (root keeps uid 0), so that each pays
#             the same exec; root must be no slower than rootless.
# - runc:     `runc run` as root of `runc spec`'s bundle (its network namespace has
#             loopback only, as a one-step sandrun stage's): target sandrun <= 0.6x.
# - crun:     `crun run` as root of the same bundle, when crun accepts this host.
set -eu
ROUNDS="${ROUNDS:-20}"

if [ "${1:-}" != "--inner" ] && [ "${1:-}" != "--root" ]; then
    cd "$(dirname "$0")/.."
    . bench/lib.sh
    prepare_workdir start "$0"
    if [ "$(id -u)" -eq 0 ]; then
        chown sandrun-test: "$W" 2>/dev/null
        as_test_user ROUNDS="$ROUNDS" sh "$W/start.sh" --inner "$W" || status=$?
        [ -n "${status:-}" ] || ROUNDS="$ROUNDS" sh "$W/start.sh" --root "$W" || status=$?
    else
        sh "$W/start.sh" --inner "$W" || status=$?
    fi
    remove_workdir
    exit "${status:-0}"
fi

now() { date +%s%N; }
# measure TOOL ROUND: times `run_TOOL ROUND` into times.TOOL (microseconds).
measure() {
    t0=$(now)
    "run_$1" "$2" || { echo "$1 failed" >&2; exit 1; }
    t1=$(now)
    echo $(( (t1 - t0) / 1000 )) >> "times.$1"
}
# rounds TOOLS...: ROUNDS rounds, each running every tool once in a new order (seeded
# by the round, so runs repeat). Rotating one fixed order would put the same tool after
# the slowest every time, while the kernel still tears down its namespaces.
rounds() {
    i=1
    while [ "$i" -le "$ROUNDS" ]; do
        order=$(echo "$*" | awk -v r="$i" 'BEGIN { srand(r) } {
            n = split($0, t, " ")
            for (k = n; k > 1; k--) { j = int(rand() * k) + 1; x = t[k]; t[k] = t[j]; t[j] = x }
            for (k = 1; k <= n; k++) printf "%s ", t[k]
        }')
        for t in $order; do measure "$t" "$i"; done
        i=$((i + 1))
    done
}
median() { sort -n "times.$1" | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }
# report BASE TOOLS...: each tool's median and BASE's ratio to it.
report() {
    B=$(median "$1")
    awk -v s="$B" -v b="$1" 'BEGIN {printf "%-8s median %7.1f ms\n", b, s / 1000}'
    for t in "$@"; do
        [ "$t" = "$1" ] && continue
        M=$(median "$t")
        awk -v s="$B" -v m="$M" -v t="$t" -v b="$1" 'BEGIN {printf "%-8s median %7.1f ms   %s/%s = %.2f\n", t, m / 1000, b, t, s / m}'
    done
}

if [ "$1" = "--root" ]; then
    W="$2"
    cd "$W"
    T=$(mktemp -d /dev/shm/sandrun-bench-root.XXXXXX)
    trap 'rm -rf "$T"' EXIT
    echo
    echo "== root path: user root, $ROUNDS rounds, $(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    rm -f times.*
    # The rootless part left rootfs/, image.tar, stage.yaml and its store behind.
    SANDRUN_HOME="$W/store-root" ./sandrun load --color never image.tar >load-root.log 2>&1 ||
        { cat load-root.log; exit 1; }
    mkdir -p ws-root bundle-root
    (cd bundle-root && runc spec)
    python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
p = f"{w}/bundle-root/config.json"
c = json.load(open(p))
c["root"] = {"path": f"{w}/rootfs", "readonly": True}
c["process"]["args"] = ["true"]
c["process"]["terminal"] = False
json.dump(c, open(p, "w"))
PY
    run_root() {
        setpriv --reuid=root --regid=root --clear-groups env -i PATH="$PATH" HOME=/root \
            SANDRUN_HOME="$W/store-root" \
            ./sandrun run --color never --workspace ws-root stage.yaml >/dev/null 2>&1
    }
    run_rootless() {
        setpriv --reuid=sandrun-test --regid=sandrun-test --clear-groups env -i PATH="$PATH" \
            HOME="$(getent passwd sandrun-test | cut -d: -f6)" SANDRUN_HOME="$W/store" \
            ./sandrun run --color never --workspace ws stage.yaml >/dev/null 2>&1
    }
    run_runc() { runc --root "$T/runc" run -b bundle-root "r$1" >/dev/null; }
    run_crun() { crun --root "$T/crun" run -b bundle-root "c$1" >/dev/null; }
    TOOLS="root rootless runc crun"
    for t in $TOOLS; do
        "run_$t" 0 >/dev/null 2>&1 && continue
        case "$t" in
            crun) echo "crun does not run here as root (skipped): $(run_crun 0 2>&1 | tail -1)"
                  TOOLS="root rootless runc" ;;
            *) echo "$t does not work here:"; "run_$t" 0; exit 1 ;;
        esac
    done
    rounds $TOOLS
    report root $TOOLS
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
    exit 0
fi

W="$2"
cd "$W"
# Runtime state on a tmpfs for everyone, as sandrun's own runs (and crun's and runc's
# defaults under $XDG_RUNTIME_DIR) keep it: /tmp is a disk filesystem here.
T=$(mktemp -d /dev/shm/sandrun-bench.XXXXXX)
trap 'rm -rf "$T" 2>/dev/null || ./sandrun __unshare rm -rf "$T"' EXIT
echo "user: $(id -un) (uid $(id -u)), $ROUNDS rounds, $(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# The image: busybox-static with its applets and a passwd, as one layer dir.
mkdir -p rootfs/bin rootfs/etc rootfs/proc rootfs/dev rootfs/sys rootfs/tmp
cp /bin/busybox rootfs/bin/
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "rootfs/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' > rootfs/etc/passwd
printf 'root:x:0:\n' > rootfs/etc/group

# sandrun: the same root filesystem as an OCI image `busybox:bench` in a private store.
export SANDRUN_HOME="$W/store"
. "$W/lib.sh"
load_image ./sandrun busybox:bench
mkdir -p ws
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
# The helper's spec for the same step (what the runner writes for it).
cat > spec.json <<EOF
{"id":"bench","step":"bench","hostname":"bench",
 "image":{"reference":"busybox:bench","layers":["$W/rootfs"],
          "config":{"entrypoint":[],"cmd":["sh"],"env":[],"working_dir":null,"user":null}},
 "process":{"Shell":{"shell":"Sh","script":"true"}},
 "env":[],"user":null,"working_dir":"/harness",
 "mounts":[{"source":"$W/ws","destination":"/harness","readonly":false}],
 "resources":{"memory_bytes":null,"cpu_millis":null},"privileged":false,
 "state_dir":"$T/helper/run"}
EOF

# crun / runc bundles on the same root filesystem (see the top of this file).
mkdir -p bundle-crun bundle-runc bundle-crunsec
(cd bundle-crun && crun spec --rootless)
(cd bundle-runc && runc spec --rootless)
./sandrun __seccomp-profile > seccomp.json
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
for tool in ("crun", "runc"):
    p = f"{w}/bundle-{tool}/config.json"
    c = json.load(open(p))
    c["root"] = {"path": f"{w}/rootfs", "readonly": True}
    c["process"]["args"] = ["true"]
    c["process"]["terminal"] = False
    drop = {"user", "network"} if tool == "crun" else {"network"}
    c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] not in drop]
    c["linux"]["namespaces"].append({"type": "network"})
    if tool == "crun":
        c["linux"].pop("uidMappings", None)
        c["linux"].pop("gidMappings", None)
        c["mounts"] = [m for m in c["mounts"] if m["destination"] != "/sys/fs/cgroup"]
    json.dump(c, open(p, "w"))
    if tool == "crun":
        c["linux"]["seccomp"] = json.load(open(f"{w}/seccomp.json"))
        c["process"]["noNewPrivileges"] = True
        json.dump(c, open(f"{w}/bundle-crunsec/config.json", "w"))
PY

# podman: the same root filesystem imported as an image.
PODMAN=yes
tar -C rootfs -cf rootfs.tar .
if ! podman import -q rootfs.tar localhost/sandrun-bench-busybox:latest >/dev/null 2>podman.err; then
    echo "podman import failed (podman skipped): $(tail -1 podman.err)"
    PODMAN=
fi

run_sandrun() { ./sandrun run --color never --workspace ws stage.yaml >/dev/null 2>&1; }
run_pod() { ./sandrun run --color never --network pod --workspace ws stage.yaml >/dev/null 2>&1; }
run_helper() { ./sandrun __container spec.json; }
run_unshare() { ./sandrun __unshare true; }
run_crun() { ./sandrun __unshare crun --root $T/crun --cgroup-manager=disabled run -b bundle-crun "c$1" >/dev/null; }
run_crunsec() { ./sandrun __unshare crun --root $T/crun --cgroup-manager=disabled run -b bundle-crunsec "s$1" >/dev/null; }
run_runc() { runc --root $T/runc run -b bundle-runc "r$1" >/dev/null; }
run_podman() { podman run --rm --network=none --runtime runc localhost/sandrun-bench-busybox:latest true >/dev/null; }

TOOLS="sandrun pod helper crun crunsec runc unshare"
[ -n "$PODMAN" ] && TOOLS="$TOOLS podman"
# One warm-up each (page cache, podman's storage); show why a tool does not work.
for t in $TOOLS; do
    "run_$t" 0 >/dev/null 2>&1 || {
        echo "$t does not work here:"
        case "$t" in sandrun|pod) ./sandrun run --color never --workspace ws stage.yaml ;; esac
        "run_$t" 0
        exit 1
    }
done
rounds $TOOLS
report sandrun $TOOLS
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "$PODMAN" ] && podman rmi -f localhost/sandrun-bench-busybox:latest >/dev/null 2>&1 || true
