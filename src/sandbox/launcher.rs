//! `ContainerLauncher`: the executor's [`Launcher`] for steps with an image. It turns
//! a `LaunchSpec` (planned step, process, env, workspace, control dir, network) and the
//! store's unpacked image into a [`ContainerSpec`], and spawns the `sandrun
//! __container` helper for it inside the step's network namespace.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use std::os::fd::BorrowedFd;
use std::sync::{Arc, OnceLock};

use super::devices::{CgroupMode, DeviceGroup};
use super::launch::{spawn_container, write_spec};
use super::spec::{BindMount, ContainerSpec, ImageConfig, ImageSpec, Limits};
use super::zygote::Zygote;
use crate::launch::StepChild;
use crate::launch::{LaunchError, LaunchSpec, Launcher};
use crate::net::StageNetwork;

/// Where the step's control directory (output variables) appears in its container.
pub const CONTROL_DIR: &str = "/run/sandrun";
/// Where the stage workspace appears, and the working directory of every step.
pub const WORKSPACE: &str = "/harness";

pub struct ContainerLauncher {
    binary: PathBuf,
    state_dir: PathBuf,
    id_prefix: String,
    images: HashMap<String, ImageSpec>,
    zygote: Option<Arc<Zygote>>,
    /// Where helpers keep what outlives a run (`ContainerSpec::cache_dir`).
    cache_dir: Option<PathBuf>,
    /// The runner is root (not in a user namespace of its own).
    root: bool,
    /// The stage's device group, made for its first confined container (as root);
    /// `None` when it could not be made (then containers get cgroups of their own).
    device_group: OnceLock<Option<DeviceGroup>>,
}

impl ContainerLauncher {
    /// `binary`: the sandrun executable (`std::env::current_exe()` in the runner);
    /// `state_dir`: the stage's private state directory; `images`: every image of the
    /// stage, already in the store, by `ImagePlan::source` (after connector mapping).
    pub fn new(
        binary: PathBuf,
        state_dir: PathBuf,
        images: impl IntoIterator<Item = (String, crate::store::Image)>,
    ) -> ContainerLauncher {
        let name = |p: Option<&std::ffi::OsStr>| {
            p.map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let id_prefix = sanitize(&format!(
            "{}-{}",
            name(state_dir.parent().and_then(Path::file_name)),
            name(state_dir.file_name())
        ));
        let images = images
            .into_iter()
            .map(|(reference, image)| {
                let config = image
                    .config
                    .config()
                    .as_ref()
                    .map(ImageConfig::from)
                    .unwrap_or_default();
                let spec = ImageSpec {
                    reference: image.reference,
                    layers: image.layers,
                    config,
                };
                (reference, spec)
            })
            .collect();
        ContainerLauncher {
            binary,
            state_dir,
            id_prefix,
            images,
            zygote: None,
            cache_dir: None,
            root: !super::userns::in_user_namespace(),
            device_group: OnceLock::new(),
        }
    }

    /// Helpers keep compiled seccomp filters in `dir` (in the store, which outlives the
    /// run and which host steps cannot write) instead of the run's directory.
    pub fn with_cache_dir(mut self, dir: Option<PathBuf>) -> ContainerLauncher {
        self.cache_dir = dir;
        self
    }

    /// Where a container's cgroups come from (`sandbox::devices`), and the cgroup
    /// directory the zygote is to start its helper in. As root, through the zygote, a
    /// step without limits gets none of its own: a privileged one needs none, the
    /// others are confined by the stage's device group.
    fn cgroups(&self, c: &ContainerSpec) -> (CgroupMode, Option<BorrowedFd<'_>>) {
        if !self.root || self.zygote.is_none() || !c.resources.is_empty() {
            return (CgroupMode::Own, None);
        }
        if c.privileged {
            return (CgroupMode::None, None);
        }
        let group = self.device_group.get_or_init(|| {
            let name = format!("{}+devices", self.id_prefix);
            DeviceGroup::create(&name)
                .inspect_err(|why| {
                    tracing::debug!("no device group, containers get cgroups of their own: {why}")
                })
                .ok()
        });
        match group {
            Some(g) => (CgroupMode::InDeviceGroup, Some(g.fd())),
            None => (CgroupMode::Own, None),
        }
    }

    /// Starts helpers through `zygote` (no new exec of the binary per step) instead of
    /// executing `binary __container`.
    pub fn with_zygote(mut self, zygote: Option<Arc<Zygote>>) -> ContainerLauncher {
        self.zygote = zygote;
        self
    }

    /// The container spec for a launch (pure; spawning is separate).
    pub fn container_spec(&self, spec: &LaunchSpec<'_>) -> Result<ContainerSpec, LaunchError> {
        let step = spec.step;
        let refused = |message: String| LaunchError::Refused {
            step: step.key.clone(),
            message,
        };
        let reference = step
            .image
            .as_ref()
            .map(|i| i.source.clone())
            .ok_or_else(|| refused("has no image; it runs on the host".into()))?;
        let image = self.images.get(&reference).cloned().ok_or_else(|| {
            refused(format!(
                "image `{reference}` was not prepared for this stage"
            ))
        })?;
        let process = spec.process.clone();
        let mut mounts = vec![
            BindMount {
                source: spec.workspace.to_path_buf(),
                destination: WORKSPACE.into(),
                readonly: false,
            },
            BindMount {
                source: spec.control_dir.to_path_buf(),
                destination: CONTROL_DIR.into(),
                readonly: false,
            },
        ];
        // Harness mounts one volume per shared path into every step of the stage.
        for (source, destination) in spec.shared_paths {
            mounts.push(BindMount {
                source: source.clone(),
                destination: destination.clone(),
                readonly: false,
            });
        }
        let files = spec.network_part(|net, key| {
            Ok([
                (net.hosts_file(key)?, "/etc/hosts"),
                (net.resolv_conf(key)?, "/etc/resolv.conf"),
            ])
        })?;
        for (source, destination) in files.into_iter().flatten() {
            mounts.push(BindMount {
                source: source.to_path_buf(),
                destination: destination.into(),
                readonly: false,
            });
        }
        Ok(ContainerSpec {
            id: format!("{}-{}", self.id_prefix, sanitize(&step.key)),
            step: step.key.clone(),
            hostname: step.identifier.clone(),
            image,
            process,
            env: spec.env.clone(),
            user: step.run_as_user.clone(),
            working_dir: Some(WORKSPACE.into()),
            mounts,
            resources: Limits {
                memory_bytes: step.resources.memory,
                cpu_millis: step.resources.cpu_millis,
            },
            privileged: step.privileged,
            cgroups: CgroupMode::Own,
            cache_dir: self.cache_dir.clone(),
            accept_listener: spec.accept_listener.map(Path::to_path_buf),
            state_dir: self.state_dir.clone(),
        })
    }
}

impl Launcher for ContainerLauncher {
    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<StepChild, LaunchError> {
        let mut container = self.container_spec(spec)?;
        let netns = spec.network_part(StageNetwork::step_netns)?;
        let failed = |e: std::io::Error| LaunchError::Spawn {
            step: spec.step.key.clone(),
            program: format!("{} __container", self.binary.display()),
            source: e,
        };
        let container_failed = |source| LaunchError::Container {
            step: spec.step.key.clone(),
            source,
        };
        match &self.zygote {
            Some(zygote) => {
                let (mode, cgroup) = self.cgroups(&container);
                container.cgroups = mode;
                let path = write_spec(&container).map_err(container_failed)?;
                let pipe = || {
                    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| failed(e.into()))
                };
                let (out_read, out_write) = pipe()?;
                let (err_read, err_write) = pipe()?;
                let (status_read, status_write) = pipe()?;
                let pid = zygote
                    .spawn(
                        &path,
                        out_write.as_fd(),
                        err_write.as_fd(),
                        status_write.as_fd(),
                        netns,
                        cgroup,
                    )
                    .map_err(failed)?;
                drop((out_write, err_write, status_write));
                StepChild::from_pid(pid.as_raw() as u32, out_read, err_read, Some(status_read))
                    .map_err(failed)
            }
            None => spawn_container(&self.binary, &container, netns)
                .map_err(container_failed)
                .and_then(|child| StepChild::from_std(child).map_err(failed)),
        }
    }

    fn control_dir_in_step(&self, _host_path: &Path) -> PathBuf {
        PathBuf::from(CONTROL_DIR)
    }

    fn workspace_in_step(&self, _host_path: &Path) -> PathBuf {
        PathBuf::from(WORKSPACE)
    }
}

/// Container ids and cgroup names: `[A-Za-z0-9_.-]` only.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
