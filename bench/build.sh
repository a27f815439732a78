#!/bin/sh
# Image build benchmark (issue 13). Not a test: prints figures.
#
# cold:    `sandrun build images/postgres.yaml` into a fresh store that already holds
#          the recipe's .deb files (hard links into debian/by-hash/, as a store has
#          them after a first build or a `lock`), so no network: unpacking 96
#          packages, writing and compressing the layers, hashing, unpacking the layers
#          into the store, SBOM, manifest.
# podman:  `podman build` of a `FROM scratch` Containerfile that copies the same files
#          (the built image's layers extracted into one directory) into a fresh
#          storage root.
# The two alternate, ROUNDS rounds (default 5); medians and the ratio are printed.
# Target: cold <= 0.5x podman.
# rebuild: `sandrun build` of the unchanged recipe in a warm store, REBUILDS times
#          (default 20), median. Target: < 50 ms.
#
# Runs as root (podman's rootful storage); needs podman (apt-get install podman).
set -eu
ROUNDS="${ROUNDS:-5}"
REBUILDS="${REBUILDS:-20}"
cd "$(dirname "$0")/.."
command -v podman >/dev/null || { echo "bench/build.sh needs podman (apt-get install -y podman)"; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --quiet --bin sandrun
S="$CARGO_TARGET_DIR/release/sandrun"
W=$(mktemp -d /tmp/sandrun-bench-build.XXXXXX)
trap 'rm -rf "$W"' EXIT
cp images/postgres.yaml images/postgres.lock "$W/"

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# Once: download the .deb files (or take them from SANDRUN_DOWNLOAD_CACHE).
SANDRUN_HOME="$W/warm" "$S" build --color never "$W/postgres.yaml" >/dev/null 2>&1

# The same files for podman: the built image's layers, extracted in order.
mkdir -p "$W/ctx/rootfs"
python3 - "$W/warm" >"$W/layers" <<'EOF'
import json, sys
root = sys.argv[1]
index = json.load(open(f"{root}/index.json"))
d = index["manifests"][0]["digest"].split(":")[1]
m = json.load(open(f"{root}/blobs/sha256/{d}"))
for l in m["layers"]:
    print(f"{root}/blobs/sha256/{l['digest'].split(':')[1]}")
EOF
while read -r blob; do tar -xzf "$blob" --numeric-owner -C "$W/ctx/rootfs"; done <"$W/layers"
printf 'FROM scratch\nCOPY rootfs/ /\nENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]\nCMD ["postgres"]\n' >"$W/ctx/Containerfile"
echo "files: $(du -sh "$W/ctx/rootfs" | cut -f1) in $(find "$W/ctx/rootfs" | wc -l) entries, $(wc -l <"$W/layers") layers"

cold() {
    rm -rf "$W/cold"
    mkdir -p "$W/cold/debian/by-hash"
    cp -l "$W/warm/debian/by-hash/"* "$W/cold/debian/by-hash/"
    sync
    t0=$(now)
    SANDRUN_HOME="$W/cold" "$S" build --color never "$W/postgres.yaml" >/dev/null 2>&1
    t1=$(now)
    echo $(((t1 - t0) / 1000000)) >>"$W/cold.ms"
}

podman_build() {
    rm -rf "$W/podman"
    sync
    t0=$(now)
    podman --root "$W/podman/root" --runroot "$W/podman/run" build -q -t bench-pg "$W/ctx" >/dev/null 2>&1
    t1=$(now)
    podman --root "$W/podman/root" --runroot "$W/podman/run" rmi -af >/dev/null 2>&1 || true
    echo $(((t1 - t0) / 1000000)) >>"$W/podman.ms"
}

i=0
while [ "$i" -lt "$ROUNDS" ]; do
    if [ $((i % 2)) -eq 0 ]; then cold; podman_build; else podman_build; cold; fi
    i=$((i + 1))
done

j=0
while [ "$j" -lt "$REBUILDS" ]; do
    t0=$(now)
    SANDRUN_HOME="$W/warm" "$S" build --color never "$W/postgres.yaml" >/dev/null 2>&1
    t1=$(now)
    echo $(((t1 - t0) / 1000)) >>"$W/rebuild.us"
    j=$((j + 1))
done

c=$(median <"$W/cold.ms")
p=$(median <"$W/podman.ms")
r=$(median <"$W/rebuild.us")
echo "cold sandrun build (postgres, .debs present): median ${c} ms  [$(tr '\n' ' ' <"$W/cold.ms")]"
echo "podman build FROM scratch, same files:        median ${p} ms  [$(tr '\n' ' ' <"$W/podman.ms")]"
echo "ratio sandrun/podman: $(awk -v c="$c" -v p="$p" 'BEGIN {printf "%.2f", c / p}') (target <= 0.5)"
echo "rebuild of the unchanged recipe: median $(awk -v r="$r" 'BEGIN {printf "%.1f", r / 1000}') ms (target < 50 ms)"
