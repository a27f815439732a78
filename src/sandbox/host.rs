//! What the host allows a container, found out at the moment it starts: the id range
//! of sandrun's user namespace, whether sysfs can be mounted, which cgroup limits can
//! be enforced (and, when not, one plain sentence saying why), which devices a
//! privileged step may get. Also signalling a container's processes.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use nix::unistd::{access, AccessFlags, Pid};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceBuilder, LinuxDeviceType};

use super::oci::HostFacts;
use super::spec::{ContainerSpec, Limits};
use super::userns;

/// How many ids (from 0 up, uids and gids alike) are mapped in the current user
/// namespace; `None` outside user namespaces (all ids usable).
pub fn mapped_ids() -> Option<u64> {
    if !userns::in_user_namespace() {
        return None;
    }
    let contiguous = |file: &str| {
        let text = fs::read_to_string(file).unwrap_or_default();
        let mut ranges: Vec<(u64, u64)> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<u64> = l
                    .split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect();
                (f.len() == 3).then(|| (f[0], f[2]))
            })
            .collect();
        ranges.sort();
        let mut end = 0;
        for (start, count) in ranges {
            if start != end {
                break;
            }
            end += count;
        }
        end
    };
    Some(contiguous("/proc/self/uid_map").min(contiguous("/proc/self/gid_map")))
}

/// Everything `oci::runtime_spec` needs about the host, plus warnings to print.
pub fn facts(spec: &ContainerSpec) -> (HostFacts, Vec<String>) {
    let mut warnings = Vec::new();
    let rootless = userns::in_user_namespace();
    let unified_cgroups = is_cgroup2("/sys/fs/cgroup");
    let mut cgroups_path = PathBuf::from("/sandrun").join(&spec.id);
    let mut limits = spec.resources;
    if !limits.is_empty() {
        match limits_blocker(rootless, unified_cgroups, &limits) {
            Ok(Some(delegated)) => cgroups_path = delegated.join(format!("sandrun-{}", spec.id)),
            Ok(None) => {}
            Err(why) => {
                warnings.push(format!(
                    "resources.limits of step `{}` ({}) are not enforced: {why}",
                    spec.step,
                    describe(&limits)
                ));
                limits = Limits::default();
            }
        }
    }
    let mut devices = Vec::new();
    if spec.privileged {
        let (usable, total) = host_devices(rootless);
        if rootless {
            warnings.push(format!(
                "step `{}` is privileged, but sandrun runs rootless: its capabilities hold only inside sandrun's user namespace (no kernel modules, no host mounts, network or clock), and it gets {} of the host's {} devices (those the invoking user can open)",
                spec.step,
                usable.len(),
                total
            ));
        }
        devices = usable;
    }
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    let facts = HostFacts {
        rootless,
        own_cgroups: spec.cgroups == super::devices::CgroupMode::Own,
        unified_cgroups,
        sysfs_mountable: !rootless || netns_owned_by_own_userns(),
        tty_gid_mapped: mapped_ids().is_none_or(|n| n > 5),
        setgroups: !rootless
            || fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "allow"),
        limits,
        cgroups_path,
        cap_bounding: fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapBnd:"))
                    .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            })
            .unwrap_or(0),
        devices,
        nofile,
    };
    (facts, warnings)
}

fn describe(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(m) = l.memory_bytes {
        parts.push(format!("memory {} MiB", m / (1024 * 1024)));
    }
    if let Some(c) = l.cpu_millis {
        parts.push(format!("cpu {c}m"));
    }
    parts.join(", ")
}

fn is_cgroup2(path: &str) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

/// `Ok(None)`: enforceable at sandrun's default cgroups path; `Ok(Some(dir))`:
/// enforceable below the delegated cgroup `dir`; `Err(why)`: not enforceable.
fn limits_blocker(
    rootless: bool,
    unified: bool,
    limits: &Limits,
) -> Result<Option<PathBuf>, String> {
    let needed: Vec<&str> = [
        limits.memory_bytes.map(|_| "memory"),
        limits.cpu_millis.map(|_| "cpu"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !rootless {
        if unified {
            let available =
                fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
            let missing: Vec<&str> = needed
                .iter()
                .copied()
                .filter(|c| !available.split_whitespace().any(|a| a == *c))
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "the cgroup v2 controllers {} are not available on this host",
                    missing.join(", ")
                ));
            }
        }
        return Ok(None);
    }
    let hybrid = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with("cgroup "))
        });
    if !unified || hybrid {
        return Err("rootless, sandrun can only use a delegated cgroup v2 subtree, and this host has a hybrid cgroup v1/v2 hierarchy whose controllers are all in v1 (run as root to enforce them)".into());
    }
    let own = fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_else(|| "/".into());
    let dir = Path::new("/sys/fs/cgroup").join(own.trim_start_matches('/'));
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let writable = access(&dir, AccessFlags::W_OK).is_ok();
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|c| !enabled.split_whitespace().any(|a| a == *c))
        .collect();
    if !writable || !missing.is_empty() {
        return Err(format!(
            "rootless, sandrun needs a delegated cgroup v2 subtree with the {} controllers, and its cgroup {own} is not one (run as root, or under a systemd user service with Delegate=yes)",
            needed.join(" and ")
        ));
    }
    Ok(Some(PathBuf::from(own)))
}

/// True when the current network namespace belongs to the current user namespace
/// (so sysfs may be mounted): NS_GET_USERNS on our netns vs our own userns.
fn netns_owned_by_own_userns() -> bool {
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    let Ok(net) = fs::File::open("/proc/self/ns/net") else {
        return false;
    };
    // SAFETY: ioctl on an fd we own; returns a new fd or -1.
    let owner = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&net), NS_GET_USERNS as _) };
    if owner < 0 {
        return false;
    }
    // SAFETY: a fresh fd from the kernel.
    let owner = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(owner) };
    let owner = fs::File::from(owner).metadata();
    let ours = fs::metadata("/proc/self/ns/user");
    matches!((owner, ours), (Ok(a), Ok(b)) if a.ino() == b.ino() && a.dev() == b.dev())
}

/// Host char/block devices for a privileged step (`usable`) and how many there are;
/// rootless, only those the invoking user can read and write.
fn host_devices(rootless: bool) -> (Vec<LinuxDevice>, usize) {
    const DEFAULTS: [&str; 8] = [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "console",
    ];
    let mut usable = Vec::new();
    let mut total = 0;
    for dir in ["/dev", "/dev/net", "/dev/dri", "/dev/snd"] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let ft = meta.file_type();
            let typ = if ft.is_char_device() {
                LinuxDeviceType::C
            } else if ft.is_block_device() {
                LinuxDeviceType::B
            } else {
                continue;
            };
            if dir == "/dev" && DEFAULTS.iter().any(|d| entry.file_name() == *d) {
                continue;
            }
            total += 1;
            if rootless && access(&path, AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
                continue;
            }
            let rdev = meta.rdev();
            let device = LinuxDeviceBuilder::default()
                .path(path)
                .typ(typ)
                .major(libc::major(rdev) as i64)
                .minor(libc::minor(rdev) as i64)
                .file_mode(meta.permissions().mode() & 0o7777)
                .uid(meta.uid())
                .gid(meta.gid())
                .build();
            if let Ok(device) = device {
                usable.push(device);
            }
        }
    }
    (usable, total)
}

/// True when the memory cgroup of `cgroups_path` recorded an OOM kill.
pub fn oom_killed(cgroups_path: &Path) -> bool {
    let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    let candidates = [
        (
            Path::new("/sys/fs/cgroup").join(rel).join("memory.events"),
            "oom_kill ",
        ),
        (
            Path::new("/sys/fs/cgroup/memory")
                .join(rel)
                .join("memory.oom_control"),
            "oom_kill ",
        ),
    ];
    candidates.iter().any(|(file, key)| {
        fs::read_to_string(file).is_ok_and(|text| {
            text.lines()
                .filter_map(|l| l.strip_prefix(key))
                .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
        })
    })
}

/// Sends `sig` to the container's init. A PID 1 ignores signals it has no handler for,
/// so then the signal goes to every other process of its PID namespace (`sh -c 'make;
/// sleep 1'`: make and sleep die, sh exits as it would in a terminal); when PID 1 is
/// alone (the workload itself, no handler) it is killed, and `Some(sig)` says that the
/// step must be reported as terminated by `sig`, as the same process outside a
/// container would have been.
pub fn signal_container(init: Pid, sig: Signal) -> Option<Signal> {
    let _ = kill(init, sig);
    if has_handler(init, sig) {
        return None;
    }
    let Ok(ns) = fs::read_link(format!("/proc/{init}/ns/pid")) else {
        return None;
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return None;
    };
    let mut others = 0;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != init.as_raw()
            && fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|other| other == ns)
        {
            others += 1;
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }
    if others == 0 && terminates_by_default(sig) {
        let _ = kill(init, Signal::SIGKILL);
        return Some(sig);
    }
    None
}

fn terminates_by_default(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGTERM
            | Signal::SIGINT
            | Signal::SIGHUP
            | Signal::SIGQUIT
            | Signal::SIGUSR1
            | Signal::SIGUSR2
    )
}

fn has_handler(pid: Pid, sig: Signal) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1u64 << (sig as i32 - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_described_for_humans() {
        let l = Limits {
            memory_bytes: Some(500 * 1024 * 1024),
            cpu_millis: Some(400),
        };
        assert_eq!(describe(&l), "memory 500 MiB, cpu 400m");
    }

    #[test]
    fn own_process_handles_no_sigterm_by_default() {
        // The test harness installs no SIGTERM handler.
        assert!(!has_handler(Pid::this(), Signal::SIGTERM));
    }
}
