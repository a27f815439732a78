# Sourced by the benchmarks. load_image SANDRUN NAME:TAG: the directory ./rootfs as a
# one-layer OCI image NAME:TAG (umoci, skopeo), loaded with `SANDRUN load` into the
# store at $SANDRUN_HOME. Leaves ./oci, ./unpacked, ./image.tar and ./load.log.
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
