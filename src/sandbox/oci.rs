//! The OCI runtime spec (config.json) of one step, built from a [`ContainerSpec`] plus
//! what the helper found out about the host and the image ([`HostFacts`],
//! [`ImageUser`]). Pure: no syscalls, so every rule is unit-tested. Defaults follow
//! runc's (capabilities, masked and read-only paths, standard mounts); the container
//! keeps the network namespace it was started in (the step's, joined by the runner).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDevice,
    LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use super::rootfs::ImageUser;
use super::spec::{ContainerSpec, Limits};

/// What the helper learned about the host before writing the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    /// Running in a user namespace (rootless).
    pub rootless: bool,
    /// libcontainer makes the container's cgroups (always rootless, where it can; as
    /// root unless the step is in the stage's device group or needs none:
    /// `sandbox::devices`). As root the device rules go there, and the container sees
    /// its cgroups at /sys/fs/cgroup.
    pub own_cgroups: bool,
    /// /sys/fs/cgroup (as this process sees it) is cgroup2 only: a cgroup namespace
    /// is safe to create.
    pub unified_cgroups: bool,
    /// sysfs can be mounted (the network namespace belongs to our user namespace);
    /// otherwise /sys is a read-only recursive bind of the host's.
    pub sysfs_mountable: bool,
    /// gid 5 (tty) is mapped: devpts may use `gid=5`.
    pub tty_gid_mapped: bool,
    /// setgroups(2) works: as root, or in a user namespace whose gid map newgidmap
    /// wrote (a single-id map written by ourselves needs `setgroups` = `deny`).
    pub setgroups: bool,
    /// Limits that will be enforced (already reduced to what the host allows).
    pub limits: Limits,
    /// Absolute cgroups path for this container.
    pub cgroups_path: PathBuf,
    /// The helper's bounding set (bit N = capability N): what `privileged` can give.
    pub cap_bounding: u64,
    /// Host devices for `privileged` (already filtered to usable ones when rootless).
    pub devices: Vec<LinuxDevice>,
    /// The helper's own open-files limit, inherited by the container.
    pub nofile: (u64, u64),
}

/// runc's default capability set.
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Capabilities by number, as in linux/capability.h.
const ALL_CAPS: [Capability; 41] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::LinuxImmutable,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetAdmin,
    Capability::NetRaw,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::SysModule,
    Capability::SysRawio,
    Capability::SysChroot,
    Capability::SysPtrace,
    Capability::SysPacct,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysNice,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Mknod,
    Capability::Lease,
    Capability::AuditWrite,
    Capability::AuditControl,
    Capability::Setfcap,
    Capability::MacOverride,
    Capability::MacAdmin,
    Capability::Syslog,
    Capability::WakeAlarm,
    Capability::BlockSuspend,
    Capability::AuditRead,
    Capability::Perfmon,
    Capability::Bpf,
    Capability::CheckpointRestore,
];

pub struct Process<'a> {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: &'a str,
    pub user: &'a ImageUser,
}

type SpecResult = Result<Spec, oci_spec::OciSpecError>;

pub fn runtime_spec(c: &ContainerSpec, rootfs: &Path, p: &Process, host: &HostFacts) -> SpecResult {
    let caps: HashSet<Capability> = if c.privileged {
        ALL_CAPS
            .iter()
            .enumerate()
            .filter(|(bit, _)| host.cap_bounding & (1u64 << bit) != 0)
            .map(|(_, cap)| *cap)
            .collect()
    } else {
        DEFAULT_CAPS.iter().copied().collect()
    };
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps.clone())
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()?;
    let mut user = UserBuilder::default().uid(p.user.uid).gid(p.user.gid);
    // Supplementary groups (the image's /etc/group memberships) need setgroups(2).
    if host.setgroups && !p.user.additional_gids.is_empty() {
        user = user.additional_gids(p.user.additional_gids.clone());
    }
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user.build()?)
        .args(p.argv.clone())
        .env(p.env.clone())
        .cwd(p.cwd)
        .capabilities(capabilities)
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(host.nofile.0)
            .hard(host.nofile.1)
            .build()?])
        .build()?;
    // A non-privileged step runs with no_new_privs (setuid binaries of the image do
    // not raise privileges), and libcontainer then loads its seccomp filter last,
    // after dropping capabilities, which no_new_privs permits. A privileged step keeps
    // it unset rather than false (which it means too): libcontainer then loads a filter
    // (only the accept hand-off's) before it drops capabilities, as it must without
    // no_new_privs; Some(false) would load it after, and fail.
    let mut process = process;
    process.set_no_new_privileges((!c.privileged).then_some(true));

    let mut namespaces = vec![
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
    ];
    if host.unified_cgroups {
        namespaces.push(LinuxNamespaceType::Cgroup);
    }
    let namespaces = namespaces
        .into_iter()
        .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
        .collect::<Result<Vec<_>, _>>()?;

    let mut resources = LinuxResourcesBuilder::default();
    if let Some(bytes) = host.limits.memory_bytes {
        resources = resources.memory(LinuxMemoryBuilder::default().limit(bytes as i64).build()?);
    }
    if let Some(millis) = host.limits.cpu_millis {
        let period: u64 = 100_000;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .period(period)
                .quota((millis * period / 1000) as i64)
                .build()?,
        );
    }
    // In cgroups of the container's own, the device cgroup: everything for a
    // privileged step; for the others nothing but what libcgroups adds after these
    // rules (the OCI defaults: null, zero, full, random, urandom, tty, console, ptmx,
    // pts, tun, and mknod of any node, which then cannot be opened). Otherwise the
    // stage's device group has the same rules (`sandbox::devices`), or the step is
    // privileged. Rootless, the kernel already refuses device nodes in a user
    // namespace (mknod fails, its mounts are nodev).
    if host.own_cgroups && !host.rootless {
        resources = resources.devices(vec![LinuxDeviceCgroupBuilder::default()
            .allow(c.privileged)
            .typ(LinuxDeviceType::A)
            .access("rwm")
            .build()?]);
    }

    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(host.cgroups_path.clone())
        .resources(resources.build()?)
        .rootfs_propagation("private");
    if c.privileged {
        linux = linux
            .masked_paths(Vec::<String>::new())
            .readonly_paths(Vec::<String>::new())
            .devices(host.devices.clone());
    } else {
        linux = linux
            .masked_paths(oci_spec::runtime::get_default_maskedpaths())
            .readonly_paths(oci_spec::runtime::get_default_readonly_paths());
    }

    if let Some(filter) = super::seccomp::filter(c.privileged, c.accept_listener.as_deref())? {
        linux = linux.seccomp(filter);
    }
    let mut linux = linux.build()?;
    // Without cgroups of its own, no resources at all (not even oci-spec's default
    // deny-all device rule): libcontainer would ask for a devices cgroup it cannot find.
    if !host.own_cgroups {
        linux.set_resources(None);
    }

    SpecBuilder::default()
        .version("1.0.2")
        .hostname(c.hostname.clone())
        .root(
            RootBuilder::default()
                .path(rootfs)
                .readonly(false)
                .build()?,
        )
        .process(process)
        .mounts(split_mounts(mounts(c, host)?).1)
        .linux(linux)
        .build()
}

/// Filesystems whose instance belongs to the namespaces of the process that mounts
/// them (PID, IPC, cgroup): only libcontainer, inside the container, can mount them.
const RUNTIME_FILESYSTEMS: [&str; 4] = ["proc", "mqueue", "cgroup", "cgroup2"];

/// The mounts the helper makes itself, in the root filesystem, before libcontainer
/// runs (see `sandbox::mounts`); the spec lists the others.
pub fn helper_mounts(
    c: &ContainerSpec,
    host: &HostFacts,
) -> Result<Vec<Mount>, oci_spec::OciSpecError> {
    Ok(split_mounts(mounts(c, host)?).0)
}

/// Splits the step's mounts into the helper's and libcontainer's. The helper's are all
/// made first, so one goes to libcontainer too when it lies under a mount of
/// libcontainer's (which would hide it).
fn split_mounts(all: Vec<Mount>) -> (Vec<Mount>, Vec<Mount>) {
    let runtime_dirs: Vec<PathBuf> = all
        .iter()
        .filter(|m| RUNTIME_FILESYSTEMS.contains(&m.typ().as_deref().unwrap_or("")))
        .map(|m| m.destination().clone())
        .collect();
    all.into_iter().partition(|m| {
        !RUNTIME_FILESYSTEMS.contains(&m.typ().as_deref().unwrap_or(""))
            && !runtime_dirs.iter().any(|d| m.destination().starts_with(d))
    })
}

/// Every mount of the step, in order.
fn mounts(c: &ContainerSpec, host: &HostFacts) -> Result<Vec<Mount>, oci_spec::OciSpecError> {
    let m = |dest: &str, typ: &str, source: &str, options: &[&str]| {
        MountBuilder::default()
            .destination(dest)
            .typ(typ)
            .source(source)
            .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
            .build()
    };
    let sys_ro = if c.privileged { "rw" } else { "ro" };
    let mut pts = vec![
        "nosuid",
        "noexec",
        "newinstance",
        "ptmxmode=0666",
        "mode=0620",
    ];
    if host.tty_gid_mapped {
        pts.push("gid=5");
    }
    let mut out = vec![
        m("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        m(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        m("/dev/pts", "devpts", "devpts", &pts)?,
        m(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        m(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
    ];
    if host.sysfs_mountable {
        out.push(m(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_ro],
        )?);
        if host.own_cgroups && !host.rootless {
            out.push(m(
                "/sys/fs/cgroup",
                "cgroup",
                "cgroup",
                &["nosuid", "noexec", "nodev", "relatime", sys_ro],
            )?);
        }
    } else {
        out.push(m(
            "/sys",
            "none",
            "/sys",
            &["rbind", "nosuid", "noexec", "nodev", "ro"],
        )?);
    }
    for b in &c.mounts {
        let mode = if b.readonly { "ro" } else { "rw" };
        out.push(
            MountBuilder::default()
                .destination(b.destination.as_str())
                .typ("bind")
                .source(b.source.clone())
                .options(vec!["rbind".to_string(), mode.to_string()])
                .build()?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::spec::{BindMount, ContainerProcess, ImageConfig, ImageSpec};

    fn container(privileged: bool) -> ContainerSpec {
        ContainerSpec {
            id: "r-s".into(),
            step: "s".into(),
            hostname: "s".into(),
            image: ImageSpec {
                reference: "busybox".into(),
                layers: vec![],
                config: ImageConfig::default(),
            },
            process: ContainerProcess::ImageDefault,
            env: vec![],
            user: None,
            working_dir: None,
            mounts: vec![BindMount {
                source: "/ws".into(),
                destination: "/harness".into(),
                readonly: false,
            }],
            resources: Limits::default(),
            privileged,
            cgroups: Default::default(),
            cache_dir: None,
            accept_listener: None,
            state_dir: "/tmp/x".into(),
        }
    }

    #[test]
    fn non_privileged_steps_are_confined_and_privileged_ones_are_not() {
        use oci_spec::runtime::{LinuxDeviceType, LinuxSeccompAction};
        let linux = |s: &Spec| s.linux().clone().unwrap();
        let nnp = |s: &Spec| s.process().as_ref().unwrap().no_new_privileges();
        let devices = |s: &Spec| linux(s).resources().clone().unwrap().devices().clone();

        let plain = build(false, false);
        assert_eq!(nnp(&plain), Some(true));
        let seccomp = linux(&plain).seccomp().clone().unwrap();
        assert_eq!(seccomp.default_action(), LinuxSeccompAction::ScmpActErrno);
        let rules = devices(&plain).unwrap();
        assert_eq!(rules.len(), 1);
        assert!(!rules[0].allow() && rules[0].typ() == Some(LinuxDeviceType::A));
        // Rootless, the kernel refuses device nodes; the filter and no_new_privs stay.
        let rootless = build(false, true);
        assert!(devices(&rootless).is_none());
        assert_eq!(nnp(&rootless), Some(true));
        assert!(linux(&rootless).seccomp().is_some());

        let privileged = build(true, false);
        // Unset, so that libcontainer would load a filter while it still may.
        assert_eq!(nnp(&privileged), None);
        assert!(linux(&privileged).seccomp().is_none());
        assert!(devices(&privileged).unwrap()[0].allow());

        // As root without cgroups of its own (the stage's device group filters
        // devices, or the step is privileged): no rules for libcontainer to write and
        // no cgroup mount; the filter and no_new_privs stay.
        let in_group = HostFacts {
            own_cgroups: false,
            ..host(false)
        };
        let grouped = build_on(false, &in_group);
        assert!(linux(&grouped).resources().is_none());
        assert_eq!(nnp(&grouped), Some(true));
        assert!(linux(&grouped).seccomp().is_some());
        let mounts = grouped.mounts().clone().unwrap();
        assert!(!mounts
            .iter()
            .any(|m| m.destination() == Path::new("/sys/fs/cgroup")));

        // The accept hand-off joins the default filter, or is the only one.
        for privileged in [false, true] {
            let mut c = container(privileged);
            c.accept_listener = Some("/run/x/accept-web.sock".into());
            let spec = runtime_spec(&c, Path::new("/r"), &process(), &host(false)).unwrap();
            let seccomp = linux(&spec).seccomp().clone().unwrap();
            assert_eq!(
                seccomp.listener_path().as_deref(),
                Some(Path::new("/run/x/accept-web.sock"))
            );
            let allow_all = seccomp.default_action() == LinuxSeccompAction::ScmpActAllow;
            assert_eq!(allow_all, privileged);
        }
    }

    fn host(rootless: bool) -> HostFacts {
        HostFacts {
            rootless,
            own_cgroups: true,
            unified_cgroups: false,
            sysfs_mountable: !rootless,
            tty_gid_mapped: true,
            setgroups: !rootless,
            limits: Limits {
                memory_bytes: Some(1 << 29),
                cpu_millis: Some(400),
            },
            cgroups_path: "/sandrun/r-s".into(),
            cap_bounding: (1 << 41) - 1 - (1 << 24),
            devices: vec![],
            nofile: (1024, 4096),
        }
    }

    fn build(privileged: bool, rootless: bool) -> Spec {
        build_on(privileged, &host(rootless))
    }

    fn process() -> Process<'static> {
        static USER: std::sync::LazyLock<ImageUser> = std::sync::LazyLock::new(|| ImageUser {
            uid: 999,
            gid: 999,
            home: "/".into(),
            additional_gids: vec![5],
        });
        Process {
            argv: vec!["true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/harness",
            user: &USER,
        }
    }

    fn build_on(privileged: bool, host: &HostFacts) -> Spec {
        runtime_spec(&container(privileged), Path::new("/r"), &process(), host).unwrap()
    }

    #[test]
    fn no_network_namespace_and_no_cgroup_namespace_on_hybrid_hosts() {
        let spec = build(false, true);
        let ns: Vec<_> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert_eq!(
            ns,
            [
                LinuxNamespaceType::Mount,
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Uts,
                LinuxNamespaceType::Ipc
            ]
        );
        assert_eq!(spec.hostname().as_deref(), Some("s"));
        assert!(spec
            .linux()
            .as_ref()
            .unwrap()
            .cgroups_path()
            .as_ref()
            .unwrap()
            .is_absolute());
    }

    #[test]
    fn default_caps_are_runcs_and_privileged_gets_all() {
        let caps = |s: &Spec| {
            s.process()
                .as_ref()
                .unwrap()
                .capabilities()
                .as_ref()
                .unwrap()
                .bounding()
                .clone()
                .unwrap()
        };
        let normal = caps(&build(false, false));
        assert_eq!(normal.len(), 14);
        assert!(!normal.contains(&Capability::SysAdmin));
        let all = caps(&build(true, false));
        assert_eq!(all.len(), 40);
        assert!(!all.contains(&Capability::SysResource));
        let linux = build(true, false).linux().clone().unwrap();
        assert_eq!(linux.masked_paths().as_ref().unwrap().len(), 0);
        assert!(build(false, false)
            .linux()
            .as_ref()
            .unwrap()
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_string()));
    }

    fn supplementary_gids(spec: &Spec) -> Option<Vec<u32>> {
        spec.process().as_ref()?.user().additional_gids().clone()
    }

    #[test]
    fn rootless_keeps_supplementary_groups_where_setgroups_works() {
        let mut h = host(true);
        h.setgroups = true;
        assert_eq!(supplementary_gids(&build_on(false, &h)), Some(vec![5]));
    }

    #[test]
    fn rootless_binds_sys_and_drops_supplementary_groups() {
        let spec = build(false, true);
        let all = mounts(&container(false), &host(true)).unwrap();
        let sys = all
            .iter()
            .find(|m| m.destination() == Path::new("/sys"))
            .unwrap();
        assert_eq!(sys.typ().as_deref(), Some("none"));
        // A host without setgroups(2) (a single-id map) drops them.
        assert_eq!(supplementary_gids(&spec), None);
        assert_eq!(supplementary_gids(&build(false, false)), Some(vec![5]));
    }

    #[test]
    fn limits_become_cgroup_resources() {
        let spec = build(false, false);
        let r = spec.linux().as_ref().unwrap().resources().clone().unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(1 << 29));
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(40_000));
        assert_eq!(r.cpu().as_ref().unwrap().period(), Some(100_000));
    }

    #[test]
    fn workspace_is_a_rw_bind() {
        let own = helper_mounts(&container(false), &host(false)).unwrap();
        let ws = own
            .iter()
            .find(|m| m.destination() == Path::new("/harness"))
            .unwrap();
        assert_eq!(
            ws.options().as_deref(),
            Some(&["rbind".to_string(), "rw".to_string()][..])
        );
    }

    fn destinations(mounts: &[Mount]) -> Vec<&str> {
        mounts
            .iter()
            .map(|m| m.destination().to_str().unwrap())
            .collect()
    }

    #[test]
    fn namespace_bound_filesystems_are_left_to_libcontainer() {
        for rootless in [false, true] {
            let c = container(false);
            let own = helper_mounts(&c, &host(rootless)).unwrap();
            assert_eq!(
                destinations(&own),
                ["/dev", "/dev/pts", "/dev/shm", "/sys", "/harness"]
            );
            let spec = build(false, rootless);
            let runtime = destinations(spec.mounts().as_ref().unwrap()).join(" ");
            let expected = if rootless {
                "/proc /dev/mqueue"
            } else {
                "/proc /dev/mqueue /sys/fs/cgroup"
            };
            assert_eq!(runtime, expected);
        }
        // A bind under /proc would be hidden by libcontainer's /proc: it stays in the
        // spec, after it.
        let mut c = container(false);
        c.mounts.push(BindMount {
            source: "/tmp".into(),
            destination: "/proc/driver/x".into(),
            readonly: true,
        });
        let (own, runtime) = split_mounts(mounts(&c, &host(false)).unwrap());
        assert!(!destinations(&own).contains(&"/proc/driver/x"));
        assert_eq!(destinations(&runtime).last(), Some(&"/proc/driver/x"));
    }
}
