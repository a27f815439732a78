//! Fuzzes the layer applier with arbitrary tar streams: it may refuse them, but it must
//! never panic and never write outside the layer directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandrun::store::unpack::{apply_layer, Limits, UnpackOptions};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let opts = UnpackOptions {
        limits: Limits {
            max_bytes: 16 << 20,
            max_entries: 10_000,
            max_path: 4096,
        },
    };
    let _ = apply_layer(data, &root, &opts);
    let outside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside, vec![std::ffi::OsString::from("root")], "wrote outside the layer root");
    let _ = sandrun::store::unpack::remove_tree(&root);
});
