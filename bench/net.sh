#!/bin/sh
# Stage network benchmark (issue 5). Not a test: prints figures.
#   - setup time of a stage network of 2, 10 and 50 steps (target: < 5 ms per step)
#   - first connection between two steps right after setup, 200 trials (no stall > 100 ms)
#   - throughput through the host port proxy vs a direct loopback connection (>= 0.8x),
#     and the CPU time per GiB it costs
#   - delay the proxy adds to a small request (new connection and kept connection)
#   - then bench/portfwd.sh: the same through `sandrun run`, end to end, where host
#     connections are handed to the service itself (and, for comparison, proxied)
# Runs as root, and rootless as the user `sandrun-test` (tests/rootless creates it) when
# it exists. All traffic stays on loopback or inside namespaces the benchmark makes.
set -eu
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --quiet --example net_bench --bin sandrun
BENCH="$CARGO_TARGET_DIR/release/examples/net_bench"
SANDRUN="$CARGO_TARGET_DIR/release/sandrun"

run_all() {
    "$@" setup 2 50
    "$@" setup 10 20
    "$@" setup 50 10
    "$@" latency 200
    "$@" proxy 1024 5
    "$@" request 1000
}

if [ "$(id -u)" -eq 0 ]; then
    echo "== root"
    run_all "$BENCH"
    if id sandrun-test >/dev/null 2>&1; then
        echo "== rootless (sandrun-test, inside sandrun __unshare)"
        run_all setpriv --reuid=sandrun-test --regid=sandrun-test --clear-groups \
            env HOME=/tmp "$SANDRUN" __unshare "$BENCH"
    else
        echo "(rootless skipped: no user sandrun-test; run the test suite once to create it)"
    fi
else
    echo "== rootless (inside sandrun __unshare)"
    run_all "$SANDRUN" __unshare "$BENCH"
fi

echo "== end to end through sandrun run (bench/portfwd.sh)"
sh bench/portfwd.sh
