//! Command-line options, parsed in one place and handed down as plain structs.

use clap::{Parser, Subcommand};

use crate::store::cmd as store_cmd;

/// Run a Harness CI stage on this machine: rootless containers, no daemon.
#[derive(Parser, Debug)]
#[command(name = "sandrun", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub registry: store_cmd::RegistryArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fetch images into the store (by reference, or every image a pipeline names).
    Pull(store_cmd::PullArgs),
    /// List the images in the store.
    Images(store_cmd::ImagesArgs),
    /// Remove blobs and layers that no image or lock file references.
    Gc(store_cmd::GcArgs),
    /// Verify every blob and layer in the store.
    Fsck(store_cmd::FsckArgs),
    /// Pin every image a pipeline names in a lock file beside it.
    Lock(store_cmd::LockArgs),
    /// Write images (of a pipeline, or by reference) to an OCI archive.
    Save(store_cmd::SaveArgs),
    /// Import images from an OCI archive.
    Load(store_cmd::LoadArgs),
}

pub fn main() -> i32 {
    // Hidden helper subcommands run first: they must stay single-threaded.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = crate::sandbox::helper::dispatch(&args) {
        return code;
    }
    let cli = Cli::parse_from(args);
    let result = match &cli.command {
        Command::Pull(a) => store_cmd::pull(a, &cli.registry),
        Command::Images(a) => store_cmd::images(a),
        Command::Gc(a) => store_cmd::gc(a),
        Command::Fsck(a) => store_cmd::fsck(a),
        Command::Lock(a) => store_cmd::lock(a, &cli.registry),
        Command::Save(a) => store_cmd::save(a, &cli.registry),
        Command::Load(a) => store_cmd::load(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
