//! Links the `sandrun` binary at a fixed address (not as a position-independent
//! executable).
//!
//! A run execs this binary once, then forks it for the id-mapping child, the zygote,
//! each step's helper and libcontainer's two container processes. As a PIE it carries
//! about 40,000 relative relocations: the dynamic loader applies them at every start,
//! which writes ~700 KiB of otherwise read-only data into private pages that every fork
//! then shares copy-on-write and tears down again. Linked at a fixed address there are
//! none to apply. Measured on a one-step stage (bench/start.sh's workload, 150
//! interleaved runs): 12.15 ms against 12.69 ms. runc and podman ship as fixed-address
//! executables too; the cost is that the binary's own code is not randomised by ASLR
//! (libraries, heap and stacks still are).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
