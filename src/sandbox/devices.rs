//! Device access for root containers that get no cgroups of their own.
//!
//! As root, a container's device rules used to live in a v1 `devices` cgroup that
//! libcontainer made for every container, which meant moving the container's first
//! process into eight new cgroups. That move takes the kernel's global cgroup lock for
//! writing, and the first writer after a quiet spell waits for an RCU grace period:
//! ~10 ms of a 30 ms step start (docs/performance.md). A step with no
//! `resources.limits` needs no cgroup for anything but those device rules, so for it
//! the runner makes one cgroup (v2) per stage with a `BPF_PROG_TYPE_CGROUP_DEVICE`
//! program attached, the same allow-list as the OCI defaults, and the zygote clones
//! each helper straight into it (`CLONE_INTO_CGROUP`, which migrates nothing); the
//! container's processes inherit it. Both device checks apply on a hybrid host (the
//! program on the v2 group and the v1 `devices` hierarchy the process stays in), so
//! the program can only take access away.
//!
//! A privileged step gets all devices either way, so it needs no such group; a step
//! with limits keeps cgroups of its own made by libcontainer. What the helper does in
//! each case is [`CgroupMode`].

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use serde::{Deserialize, Serialize};

use crate::sys::BpfInsn;

/// Where a root container's cgroups come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupMode {
    /// libcontainer makes the container's cgroups (limits, device rules). Rootless,
    /// only what the user's delegated cgroup allows.
    #[default]
    Own,
    /// The zygote cloned the helper into the stage's [`DeviceGroup`]: libcontainer
    /// must make no cgroups and write no device rules.
    InDeviceGroup,
    /// A privileged step without limits: no cgroups and every device.
    None,
}

/// (major, minor; `None` = every minor) of the character devices a container may
/// read and write: the OCI defaults, as libcgroups allows them in a v1 `devices`
/// cgroup. Making a node of any kind is allowed; opening one that is not listed is not.
const ALLOWED: [(u32, Option<u32>); 10] = [
    (1, Some(3)),    // null
    (1, Some(5)),    // zero
    (1, Some(7)),    // full
    (1, Some(8)),    // random
    (1, Some(9)),    // urandom
    (5, Some(0)),    // tty
    (5, Some(1)),    // console
    (5, Some(2)),    // ptmx
    (136, None),     // pts
    (10, Some(200)), // tun
];

// The kernel's `struct bpf_cgroup_dev_ctx`: `access_type` (device type in the low 16
// bits, access in the high 16), `major`, `minor`.
const DEV_CHAR: i32 = 2; // BPF_DEVCG_DEV_CHAR
const ACC_MKNOD: i32 = 1; // BPF_DEVCG_ACC_MKNOD

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const AND64_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH64_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// The device program: 1 (allow) for making any node, and for reading and writing
/// the [`ALLOWED`] character devices; 0 for everything else.
pub fn program() -> Vec<BpfInsn> {
    enum To {
        Allow,
        Deny,
        Skip(usize),
    }
    // r2 = access, r3 = type, r4 = major, r5 = minor (r1 is the context).
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(MOV64_X, 3, 2, 0, 0),
        insn(AND64_K, 3, 0, 0, 0xffff),
        insn(RSH64_K, 2, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    let mut jumps: Vec<(usize, To)> = Vec::new();
    let mut jump = |p: &mut Vec<BpfInsn>, code: u8, reg: u8, imm: i32, to: To| {
        jumps.push((p.len(), to));
        p.push(insn(code, reg, 0, 0, imm));
    };
    jump(&mut p, JEQ_K, 2, ACC_MKNOD, To::Allow);
    jump(&mut p, JNE_K, 3, DEV_CHAR, To::Deny);
    for (major, minor) in ALLOWED {
        match minor {
            Some(minor) => {
                jump(&mut p, JNE_K, 4, major as i32, To::Skip(1));
                jump(&mut p, JEQ_K, 5, minor as i32, To::Allow);
            }
            None => jump(&mut p, JEQ_K, 4, major as i32, To::Allow),
        }
    }
    let deny = p.len();
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    let allow = p.len();
    p.push(insn(MOV64_K, 0, 0, 0, 1));
    p.push(insn(EXIT, 0, 0, 0, 0));
    for (at, to) in jumps {
        let target = match to {
            To::Allow => allow,
            To::Deny => deny,
            To::Skip(n) => at + 1 + n,
        };
        p[at].off = (target - at - 1) as i16;
    }
    p
}

/// The stage's device group: a cgroup (v2) directory with the device program
/// attached, which helpers are cloned into. Removed with the run's other cgroups
/// (`state::remove_run_cgroups`) once its processes are gone.
#[derive(Debug)]
pub struct DeviceGroup {
    dir: OwnedFd,
}

impl DeviceGroup {
    /// Makes `/sandrun/<name>` in the cgroup v2 hierarchy (`/sys/fs/cgroup`, or
    /// `/sys/fs/cgroup/unified` on a hybrid host) and attaches the program. `name`
    /// must start with the run's directory name and a dash, and must not be a
    /// container id (`+` never is one). The error says why not (a kernel older than
    /// 5.7, no cgroup v2 hierarchy, no BPF), for the caller to fall back to cgroups of
    /// the container's own.
    pub fn create(name: &str) -> Result<DeviceGroup, String> {
        if !crate::sys::kernel_at_least(5, 7) {
            return Err("cloning into a cgroup (CLONE_INTO_CGROUP) needs Linux 5.7".into());
        }
        let root = unified_root().ok_or("no cgroup v2 hierarchy is mounted")?;
        let dir = root.join("sandrun").join(name);
        match fs::create_dir_all(&dir) {
            Ok(()) => {}
            Err(e) => return Err(format!("create {}: {e}", dir.display())),
        }
        let made = || -> io::Result<DeviceGroup> {
            let dir = OwnedFd::from(
                fs::File::options()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                    .open(&dir)?,
            );
            let program = crate::sys::bpf_load_device_program(&program(), "sandrun_devices")?;
            crate::sys::bpf_attach_device_program(dir.as_fd(), program.as_fd())?;
            Ok(DeviceGroup { dir })
        };
        made().map_err(|e| {
            let _ = fs::remove_dir(&dir);
            format!("attach a device program to {}: {e}", dir.display())
        })
    }

    /// The directory, for `CLONE_INTO_CGROUP`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

/// The mount point of the cgroup v2 hierarchy, when there is one.
fn unified_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(Path::new)
        .find(|p| statfs(*p).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC))
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on one access, as the kernel would (only the instructions
    /// [`program`] uses).
    fn verdict(typ: u32, access: u32, major: u32, minor: u32) -> u64 {
        let p = program();
        let ctx = [(access << 16) | typ, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            let imm = i.imm as u32 as u64;
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    r[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                MOV64_X => r[dst] = r[src],
                MOV64_K => r[dst] = imm,
                AND64_K => r[dst] &= imm,
                RSH64_K => r[dst] >>= imm,
                JEQ_K if r[dst] == imm => pc += i.off as usize,
                JNE_K if r[dst] != imm => pc += i.off as usize,
                JEQ_K | JNE_K => {}
                EXIT => return r[0],
                other => panic!("opcode {other:#x}"),
            }
        }
    }

    const BLOCK: u32 = 1;
    const CHAR: u32 = 2;
    const MKNOD: u32 = 1;
    const READ: u32 = 2;
    const WRITE: u32 = 4;

    #[test]
    fn the_default_devices_open_and_no_others() {
        for (major, minor) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 1),
            (5, 2),
        ] {
            for access in [READ, WRITE, READ | WRITE] {
                assert_eq!(verdict(CHAR, access, major, minor), 1, "{major}:{minor}");
            }
        }
        for minor in [0, 1, 255, 4096] {
            assert_eq!(verdict(CHAR, READ | WRITE, 136, minor), 1, "pts {minor}");
        }
        assert_eq!(verdict(CHAR, READ | WRITE, 10, 200), 1, "tun");
        for (major, minor) in [
            (1, 1),
            (1, 2),
            (1, 4),
            (5, 3),
            (10, 229),
            (10, 237),
            (4, 0),
            (135, 0),
        ] {
            assert_eq!(verdict(CHAR, READ, major, minor), 0, "{major}:{minor}");
        }
        // Block devices never open, whatever their numbers.
        for (major, minor) in [(8, 0), (7, 0), (1, 3), (136, 0), (253, 0)] {
            assert_eq!(
                verdict(BLOCK, READ, major, minor),
                0,
                "block {major}:{minor}"
            );
            assert_eq!(
                verdict(BLOCK, WRITE, major, minor),
                0,
                "block {major}:{minor}"
            );
        }
    }

    #[test]
    fn any_node_may_be_made() {
        for (typ, major, minor) in [(BLOCK, 8, 0), (CHAR, 1, 1), (CHAR, 10, 229)] {
            assert_eq!(verdict(typ, MKNOD, major, minor), 1);
        }
    }
}
