#!/bin/sh
# sandrun's own memory (issue 18). Not a test: prints figures.
# A one-step stage and a 20-step stage (Run steps running `true`, one after the other,
# in the busybox image built from images/busybox.yaml), each run ROUNDS times (default
# 5, alternating) under bench/rss.c, which samples /proc every 2 ms for the processes
# executing the sandrun binary. As root: as root, then as the rootless test user
# `sandrun-test` (scripts/test.sh); otherwise as the invoking user alone.
# Per stage, the largest of the runs (and the median) of:
# - runner:   VmHWM of the `sandrun run` process itself;
# - largest:  the largest VmHWM of any sandrun process (runner, zygote, per-step
#             helpers, libcontainer's processes before they execute the step);
# - VmRSS sum: the peak of the sum of the VmRSS of all sandrun processes alive at one
#             moment: an upper bound of sandrun's whole footprint (the binary's pages
#             and what a fork shares count once per process);
# - PSS sum:  the same with PSS (shared pages divided among their sharers): the
#             footprint itself. Root only: rootless, the runner's smaps cannot be read
#             from outside its user namespace.
# Target: under 40 MB.
set -eu
ROUNDS="${ROUNDS:-5}"

if [ "${1:-}" != "--inner" ]; then
    cd "$(dirname "$0")/.."
    . bench/lib.sh
    prepare_workdir rss "$0"
    gcc -O2 -o "$W/rss" bench/rss.c
    mkdir -p "$W/ws/images"
    cp images/busybox.yaml images/busybox.lock "$W/ws/images/"
    DL=/tmp/sandrun-test-downloads
    echo "$(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    if [ "$(id -u)" -eq 0 ]; then
        SANDRUN_DOWNLOAD_CACHE="$DL" ROUNDS="$ROUNDS" sh "$W/rss.sh" --inner "$W" root || status=$?
        chown sandrun-test: "$W"
        chown -R sandrun-test: "$W/ws"
        [ -n "${status:-}" ] || as_test_user ROUNDS="$ROUNDS" SANDRUN_DOWNLOAD_CACHE="$DL" \
            sh "$W/rss.sh" --inner "$W" rootless || status=$?
    else
        SANDRUN_DOWNLOAD_CACHE="$DL" sh "$W/rss.sh" --inner "$W" rootless || status=$?
    fi
    remove_workdir
    exit "${status:-0}"
fi

W="$2"
WHO="$3"
cd "$W/ws"
export SANDRUN_HOME="$W/store-$WHO"
fail() { echo "rss.sh: $*" >&2; exit 1; }
../sandrun build --color never images/busybox.yaml >build.log 2>&1 || { cat build.log; fail "sandrun build failed"; }

stage() { # FILE STEPS
    {
        printf 'stage:\n  identifier: rss\n  name: rss\n  type: CI\n  spec:\n    execution:\n      steps:\n'
        n=1
        while [ "$n" -le "$2" ]; do
            printf '        - step:\n            type: Run\n            name: s%d\n            identifier: s%d\n            spec:\n              image: ./images/busybox.yaml\n              shell: Sh\n              command: "true"\n' "$n" "$n"
            n=$((n + 1))
        done
    } > "$1"
}
stage one.yaml 1
stage twenty.yaml 20

measure() { # NAME
    timeout 120 ../rss "rss.$WHO.$1" ../sandrun ../sandrun run --color never "$1.yaml" >run.log 2>&1 \
        || { cat run.log; fail "sandrun run $1.yaml failed (or took over 120 s)"; }
}
measure one  # warm-up: page cache
rm -f "rss.$WHO.one"
i=1
while [ "$i" -le "$ROUNDS" ]; do
    if [ $((i % 2)) -eq 1 ]; then measure one; measure twenty; else measure twenty; measure one; fi
    i=$((i + 1))
done

# col FILE N: "largest (median)" of column N, in MB ("-" when it could not be read).
col() {
    cut -d' ' -f"$2" "$1" | sort -n | awk '{ a[NR] = $1 } END {
        if (a[1] < 0) print "-"; else printf "%.1f (%.1f)", a[NR] / 1024, a[int((NR + 1) / 2)] / 1024 }'
}
echo "$WHO ($(id -un)), MB, largest of $ROUNDS runs (median):"
echo "stage    runner VmHWM  largest VmHWM  VmRSS sum    PSS sum      processes"
for s in one twenty; do
    f="rss.$WHO.$s"
    printf '%-8s %-13s %-14s %-12s %-12s %s\n' "$s" "$(col "$f" 1)" "$(col "$f" 2)" "$(col "$f" 3)" \
        "$(col "$f" 4)" "$(cut -d' ' -f5 "$f" | sort -n | tail -n 1)"
done
