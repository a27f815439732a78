//! `ContainerSpec`: everything the `sandrun __container` helper needs to start one
//! container, as plain data. The runner writes it as JSON; the helper reads it, so the
//! two processes share no state but this file. Deciding *what* runs (image config vs
//! Harness `entrypoint`/`command`/`shell`, env order, user) is pure logic here and is
//! tested without containers.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One container: a step of a stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Unique among live containers on the machine (`<run-id>-<step-id>` style);
    /// only `[A-Za-z0-9_.-]`.
    pub id: String,
    /// The step identifier, for messages and as the hostname.
    pub step: String,
    pub hostname: String,
    pub image: ImageSpec,
    pub process: ContainerProcess,
    /// Stage variables, then step `envVariables`: applied over the image `Env` in order.
    pub env: Vec<(String, String)>,
    /// `runAsUser`: a uid, a name from the image's /etc/passwd, optionally `:group`.
    pub user: Option<String>,
    /// Absolute path inside the container (Harness: `/harness`); `None` = image's
    /// WorkingDir or `/`.
    pub working_dir: Option<String>,
    /// Bind mounts besides the standard ones (workspace, /etc/hosts, resolv.conf,
    /// control directory).
    pub mounts: Vec<BindMount>,
    pub resources: Limits,
    pub privileged: bool,
    /// Where the container's cgroups come from, as root (`sandbox::devices`).
    #[serde(default)]
    pub cgroups: super::devices::CgroupMode,
    /// Where helpers keep compiled seccomp filters across runs (`<store>/seccomp`);
    /// `None`: the run's state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// A unix socket of the runner's that takes the seccomp listener of the step's
    /// `accept` calls, so that host connections to a bound port are handed to the
    /// service itself (`net::handoff`); `None` for steps without `portBindings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_listener: Option<PathBuf>,
    /// The run's state directory (`$XDG_RUNTIME_DIR/sandrun/<run-id>`): bundles, upper
    /// dirs and libcontainer state go below it.
    pub state_dir: PathBuf,
}

/// The image as the store unpacked it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// The reference as the user wrote it, for messages.
    pub reference: String,
    /// Unpacked layer directories, lowest first.
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
}

/// The parts of an OCI image config a runtime honours.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl From<&oci_spec::image::Config> for ImageConfig {
    fn from(c: &oci_spec::image::Config) -> Self {
        ImageConfig {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().filter(|w| !w.is_empty()),
            user: c.user().clone().filter(|u| !u.is_empty()),
        }
    }
}

/// What the container runs: the executor's process, with Harness's rules for turning
/// it into an argv over the image config ([`argv`]).
pub type ContainerProcess = crate::launch::Process;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub readonly: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_millis: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.memory_bytes.is_none() && self.cpu_millis.is_none()
    }
}

/// The argv to run: Harness rules over the image config.
pub fn argv(process: &ContainerProcess, image: &ImageConfig) -> Vec<String> {
    match process {
        ContainerProcess::Shell { shell, script } => shell.argv(script),
        ContainerProcess::Exec { argv } => argv.clone(),
        ContainerProcess::ImageDefault => {
            image.entrypoint.iter().chain(&image.cmd).cloned().collect()
        }
    }
}

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `KEY=value` list: image Env, then `overrides` in order (later wins), with a PATH
/// and HOSTNAME/HOME when nobody set them.
pub fn environment(
    image: &ImageConfig,
    overrides: &[(String, String)],
    hostname: &str,
    home: &str,
) -> Vec<String> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match vars.iter_mut().find(|(key, _)| key == k) {
        Some(entry) => entry.1 = v.to_string(),
        None => vars.push((k.to_string(), v.to_string())),
    };
    set("PATH", DEFAULT_PATH);
    set("HOSTNAME", hostname);
    set("HOME", home);
    for entry in &image.env {
        let (k, v) = entry.split_once('=').unwrap_or((entry, ""));
        set(k, v);
    }
    for (k, v) in overrides {
        set(k, v);
    }
    vars.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Shell;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["postgres".into()],
            env: vec![
                "PATH=/opt/bin:/bin".into(),
                "LANG=C.UTF-8".into(),
                "EMPTY".into(),
            ],
            working_dir: Some("/var/lib".into()),
            user: Some("postgres".into()),
        }
    }

    #[test]
    fn command_runs_in_shell_with_set_e_for_sh_and_bash() {
        let p = ContainerProcess::Shell {
            shell: Shell::Bash,
            script: "echo hi".into(),
        };
        assert_eq!(argv(&p, &image()), ["bash", "-c", "set -e\necho hi"]);
        let p = ContainerProcess::Shell {
            shell: Shell::Python,
            script: "print(1)".into(),
        };
        assert_eq!(argv(&p, &image()), ["python3", "-c", "print(1)"]);
        let p = ContainerProcess::Shell {
            shell: Shell::Pwsh,
            script: "Write-Host 1".into(),
        };
        assert_eq!(argv(&p, &image()), ["pwsh", "-Command", "Write-Host 1"]);
    }

    #[test]
    fn entrypoint_replaces_image_entrypoint_and_cmd() {
        let p = ContainerProcess::Exec {
            argv: vec!["redis-server".into(), "--port".into(), "1".into()],
        };
        assert_eq!(argv(&p, &image()), ["redis-server", "--port", "1"]);
        assert_eq!(
            argv(&ContainerProcess::ImageDefault, &image()),
            ["/docker-entrypoint.sh", "postgres"]
        );
    }

    #[test]
    fn env_is_image_then_stage_then_step() {
        let env = environment(
            &image(),
            &[
                ("LANG".into(), "stage".into()),
                ("X".into(), "1".into()),
                ("LANG".into(), "step".into()),
            ],
            "db",
            "/root",
        );
        assert_eq!(
            env,
            [
                "PATH=/opt/bin:/bin",
                "HOSTNAME=db",
                "HOME=/root",
                "LANG=step",
                "EMPTY=",
                "X=1"
            ]
        );
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = ContainerSpec {
            id: "r1-build".into(),
            step: "build".into(),
            hostname: "build".into(),
            image: ImageSpec {
                reference: "busybox".into(),
                layers: vec!["/l/1".into()],
                config: image(),
            },
            process: ContainerProcess::Shell {
                shell: Shell::Sh,
                script: "true".into(),
            },
            env: vec![("A".into(), "b".into())],
            user: Some("999".into()),
            working_dir: Some("/harness".into()),
            mounts: vec![BindMount {
                source: "/w".into(),
                destination: "/harness".into(),
                readonly: false,
            }],
            resources: Limits {
                memory_bytes: Some(1 << 20),
                cpu_millis: None,
            },
            privileged: false,
            cgroups: crate::sandbox::devices::CgroupMode::InDeviceGroup,
            cache_dir: Some("/run/user/1/sandrun".into()),
            accept_listener: None,
            state_dir: "/run/user/1/sandrun/r1".into(),
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ContainerSpec>(&json).unwrap(), spec);
    }
}
