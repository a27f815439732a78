//! Hidden subcommands of the `sandrun` binary that must run before anything else
//! (single-threaded, no tokio): `sandrun __container <spec.json>` (one container, see
//! `container`), and `sandrun __unshare [CMD...]` enters the rootless
//! namespace and runs CMD there (like `podman unshare`; used by tests and for looking
//! at the store with its real owners). `__unshare --as-invoking-user CMD...` runs CMD
//! as the invoking user again through [`InvokingUser`]. `__sweep [BASE]` removes what
//! killed runs left under BASE (default: the state base), as the next run does.
//! `__host-init HOSTNAME -- CMD...` runs a host step in its own PID, UTS and IPC
//! namespaces (see `host_init`). `__seccomp-profile` prints the seccomp filter of a
//! non-privileged step as OCI JSON (`bench/start.sh` gives crun the same one).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;

use super::userns::{self, InvokingUser};

/// Runs a hidden subcommand when `args` name one; `None` otherwise.
pub fn dispatch(args: &[OsString]) -> Option<i32> {
    match args.get(1)?.to_str()? {
        "__unshare" => Some(unshare_main(&args[2..])),
        "__sweep" => Some(sweep_main(&args[2..])),
        "__host-init" => Some(super::host_init::main(&args[2..])),
        "__seccomp-profile" => Some(match super::seccomp::filter(false, None) {
            Ok(Some(filter)) => match serde_json::to_string_pretty(&filter) {
                Ok(json) => {
                    println!("{json}");
                    0
                }
                Err(e) => {
                    eprintln!("sandrun: {e}");
                    1
                }
            },
            Ok(None) => 1,
            Err(e) => {
                eprintln!("sandrun: {e}");
                1
            }
        }),
        "__container" => Some(match args.get(2) {
            Some(spec) if args.len() == 3 => {
                debug_logging();
                super::container::main(std::path::Path::new(spec))
            }
            _ => {
                eprintln!("usage: sandrun __container <spec.json>");
                125
            }
        }),
        _ => None,
    }
}

fn unshare_main(mut cmd: &[OsString]) -> i32 {
    let as_invoking_user = cmd.first().is_some_and(|a| a == "--as-invoking-user");
    if as_invoking_user {
        cmd = &cmd[1..];
    }
    let mut invoking_user = None;
    if nix::unistd::geteuid().is_root() {
        eprintln!("sandrun: already root, not entering a user namespace");
    } else {
        match userns::enter_rootless() {
            Ok(info) => {
                if let Some(limit) = info.limitation() {
                    eprintln!("sandrun: warning: {limit}");
                }
                invoking_user = Some(InvokingUser::new(&info));
            }
            Err(e) => {
                eprintln!("sandrun: {e}");
                return 125;
            }
        }
    }
    let (program, rest) = match cmd.split_first() {
        Some((p, rest)) => (p.clone(), rest),
        None => (
            std::env::var_os("SHELL").unwrap_or_else(|| "/bin/sh".into()),
            &[][..],
        ),
    };
    let mut command = Command::new(&program);
    command.args(rest);
    if let (true, Some(user)) = (as_invoking_user, invoking_user) {
        // SAFETY: `enter` only makes async-signal-safe calls.
        unsafe { command.pre_exec(move || user.enter()) };
    }
    let err = command.exec();
    eprintln!("sandrun: cannot run {}: {err}", program.to_string_lossy());
    127
}

/// `SANDRUN_LOG=debug` (an env-filter) shows libcontainer's own log on stderr.
pub(crate) fn debug_logging() {
    if let Ok(filter) = std::env::var("SANDRUN_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

fn sweep_main(args: &[OsString]) -> i32 {
    if !nix::unistd::geteuid().is_root() {
        // Leftovers belong to ids of the user namespace: sweep from inside it.
        if let Err(e) = userns::enter_rootless() {
            eprintln!("sandrun: {e}");
            return 125;
        }
    }
    let base = args
        .first()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(super::state::default_base);
    for removed in super::state::sweep_stale(&base) {
        println!("removed {}", removed.display());
    }
    0
}
