# Sourced by the benchmarks: their outer part from the checkout's root, their inner
# part (as the test user) from the work directory prepare_workdir copies this file to.

# prepare_workdir NAME SCRIPT: builds sandrun (release) and makes W, a directory
# /tmp/sandrun-bench-NAME.XXXXXX that every user may read, holding sandrun, SCRIPT and
# this file. With SANDRUN=PATH set, that binary is used instead of a build (to compare
# two builds).
prepare_workdir() {
    bin="${SANDRUN:-}"
    if [ -z "$bin" ]; then
        export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
        cargo build --release --quiet --bin sandrun
        bin="$CARGO_TARGET_DIR/release/sandrun"
    fi
    W=$(mktemp -d "/tmp/sandrun-bench-$1.XXXXXX")
    cp "$bin" "$W/sandrun"
    cp "$2" "$W/$(basename "$2")"
    cp bench/lib.sh "$W/lib.sh"
    chmod 755 "$W" "$W/sandrun" "$W/$(basename "$2")"
}

# remove_workdir: removes W (through sandrun's user namespace when it holds files of
# mapped ids).
remove_workdir() {
    rm -rf "$W" 2>/dev/null || "$W/sandrun" __unshare rm -rf "$W"
}

# as_test_user [NAME=VALUE]... COMMAND...: COMMAND as the rootless test user
# `sandrun-test` (scripts/test.sh creates it), with only PATH, HOME, USER and the given
# variables in its environment.
as_test_user() {
    id sandrun-test >/dev/null 2>&1 || {
        echo "no user sandrun-test: run scripts/test.sh once to create it"
        return 1
    }
    setpriv --reuid=sandrun-test --regid=sandrun-test --clear-groups \
        env -i PATH="$PATH" HOME="$(getent passwd sandrun-test | cut -d: -f6)" USER=sandrun-test "$@"
}

# load_image SANDRUN NAME:TAG: the directory ./rootfs as a one-layer OCI image NAME:TAG
# (umoci, skopeo), loaded with `SANDRUN load` into the store at $SANDRUN_HOME. Leaves
# ./oci, ./unpacked, ./image.tar and ./load.log.
load_image() {
    umoci init --layout oci >/dev/null
    umoci new --image oci:bench >/dev/null
    umoci unpack --rootless --image oci:bench unpacked >/dev/null
    cp -a rootfs/. unpacked/rootfs/
    umoci repack --image oci:bench unpacked >/dev/null
    umoci config --image oci:bench --config.cmd sh >/dev/null
    skopeo copy -q oci:oci:bench "oci-archive:image.tar:$2"
    "$1" load --color never image.tar >load.log 2>&1 || { cat load.log; exit 1; }
}
