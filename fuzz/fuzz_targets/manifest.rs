//! Fuzzes manifest, index and image-config parsing and the platform choice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandrun::store::registry::{parse_manifest, Fetched, Platform};

fuzz_target!(|data: &[u8]| {
    match parse_manifest("fuzz", data) {
        Ok(Fetched::Index(idx)) => {
            let _ = Platform::host().choose(&idx);
        }
        Ok(Fetched::Manifest(m)) => {
            let _ = sandrun::store::parse_config("fuzz", data, &m);
        }
        Err(_) => {}
    }
});
