//! Opt-in outbound connections (`--network egress`) through slirp4netns.
//!
//! The stage network has no route out by default. With egress on, each step namespace
//! (or the pod's one) gets a `tap0` device served by a slirp4netns process, which
//! relays connections through ordinary sockets of the runner's network namespace. The
//! host's own loopback stays unreachable (`--disable-host-loopback`), as without egress.
//!
//! slirp4netns needs /dev/net/tun; where the runner cannot open it (rootless on a host
//! where it is mode 0600) egress is refused with that reason rather than half working.

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::error::NetError;

/// slirp4netns's built-in DNS forwarder.
pub(crate) const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const READY_TIMEOUT: Duration = Duration::from_secs(10);

struct Relay {
    child: Child,
    /// slirp4netns exits when this (the write end of its `--exit-fd` pipe) closes.
    exit_pipe: Option<OwnedFd>,
}

pub(crate) struct Egress {
    relays: Vec<Relay>,
}

fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), NetError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| NetError::os("create a pipe for slirp4netns")(e.into()))
}

impl Egress {
    /// Starts one relay per namespace in `targets` and waits until each is configured.
    pub async fn start(targets: &[BorrowedFd<'_>]) -> Result<Egress, NetError> {
        let slirp = find_program("slirp4netns").ok_or_else(|| {
            NetError::EgressUnavailable(
                "slirp4netns is not installed (Debian package `slirp4netns`)".into(),
            )
        })?;
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
        {
            return Err(NetError::EgressUnavailable(format!(
                "slirp4netns needs /dev/net/tun, which this process cannot open ({e}); \
                 on this host it is only usable by root"
            )));
        }
        let mut egress = Egress { relays: Vec::new() };
        for target in targets {
            let relay = start_relay(&slirp, *target).await?;
            egress.relays.push(relay);
        }
        Ok(egress)
    }

    pub async fn stop(mut self) {
        let relays = std::mem::take(&mut self.relays);
        let _ = tokio::task::spawn_blocking(move || {
            for mut relay in relays {
                relay.exit_pipe.take();
                wait_or_kill(&mut relay.child);
            }
        })
        .await;
    }

    pub fn kill_now(mut self) {
        for relay in &mut self.relays {
            let _ = relay.child.kill();
            let _ = relay.child.wait();
        }
        self.relays.clear();
    }
}

fn wait_or_kill(child: &mut Child) {
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn start_relay(slirp: &PathBuf, target: BorrowedFd<'_>) -> Result<Relay, NetError> {
    let netns = target
        .try_clone_to_owned()
        .map_err(NetError::os("duplicate a namespace descriptor"))?;
    let (ready_read, ready_write) = pipe()?;
    let (exit_read, exit_write) = pipe()?;
    let inherited = [
        netns.as_raw_fd(),
        ready_write.as_raw_fd(),
        exit_read.as_raw_fd(),
    ];
    let mut command = Command::new(slirp);
    command
        .arg("--configure")
        .arg("--mtu=65520")
        .arg("--disable-host-loopback")
        .arg(format!("--ready-fd={}", ready_write.as_raw_fd()))
        .arg(format!("--exit-fd={}", exit_read.as_raw_fd()))
        .arg("--netns-type=path")
        .arg(format!("/proc/self/fd/{}", netns.as_raw_fd()))
        .arg("tap0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only fcntl(2) on descriptor numbers copied before the fork.
    unsafe {
        command.pre_exec(move || {
            for fd in inherited {
                crate::sys::keep_across_exec(fd)?;
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| NetError::EgressUnavailable(format!("cannot run {}: {e}", slirp.display())))?;
    drop((netns, ready_write, exit_read));

    let waited = tokio::task::spawn_blocking(move || {
        let mut ready = std::fs::File::from(ready_read);
        let mut byte = [0u8; 1];
        ready.read(&mut byte)
    });
    let outcome = tokio::time::timeout(READY_TIMEOUT, waited).await;
    match outcome {
        Ok(Ok(Ok(1))) => Ok(Relay {
            child,
            exit_pipe: Some(exit_write),
        }),
        _ => {
            let _ = child.kill();
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            let _ = child.wait();
            Err(NetError::EgressUnavailable(format!(
                "slirp4netns did not start: {}",
                stderr.trim()
            )))
        }
    }
}
