//! sandrun's own configuration file: what a machine knows that a pipeline cannot.
//!
//! Harness pipelines name registries through connectors (`connectorRef:
//! account.harnessImage`), which mean nothing on a laptop. The config file maps them
//! to registries (and optionally credentials), and lists plain-HTTP registries such
//! as a local mirror:
//!
//! ```yaml
//! insecure_registries: ["mirror.internal:5000"]
//! connectors:
//!   account.harnessImage:
//!     registry: mirror.internal:5000
//!     credentials: { username: ci, password: s3cret }
//! credentials:
//!   ghcr.io: { token: ghp_example }
//! kubernetes:
//!   pull_secrets:                        # connector -> imagePullSecrets entry
//!     account.harnessImage: regcred      # (for `sandrun export kubernetes`)
//!   recipe_repositories:                 # image recipe name -> where it was pushed
//!     postgres: registry.example.com/ci/postgres
//! layer_size_limit: 8Gi   # bytes one image layer may write (default: proportional)
//! ```
//!
//! It lives at `$SANDRUN_CONFIG`, else `$XDG_CONFIG_HOME/sandrun/config.yaml`, else
//! `~/.config/sandrun/config.yaml`; a missing file is an empty configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::store::{ConnectorMapping, Credential, PullOptions};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Registries (`host:port`) spoken to over plain HTTP.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Harness connector identifier -> registry.
    #[serde(default)]
    pub connectors: BTreeMap<String, ConnectorMapping>,
    /// Credentials by registry host; they win over Docker's and podman's files.
    #[serde(default)]
    pub credentials: BTreeMap<String, Credential>,
    /// Bytes one image layer may write when unpacked (`--layer-size-limit` wins).
    #[serde(default, deserialize_with = "byte_size")]
    pub layer_size_limit: Option<u64>,
    /// What `sandrun export kubernetes` needs to know about the cluster.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Harness connector identifier -> name of the cluster's image pull Secret.
    #[serde(default)]
    pub pull_secrets: BTreeMap<String, String>,
    /// Image recipe name (its `name:`) -> the registry repository its images are pushed
    /// to, where the cluster pulls them by digest.
    #[serde(default)]
    pub recipe_repositories: BTreeMap<String, String>,
}

fn byte_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let text = String::deserialize(d)?;
    crate::pipeline::values::parse_memory(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Read(#[from] crate::input::InputError),
    #[error("{}{}: {message}", path.display(), location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        location: Option<(usize, usize)>,
        message: String,
    },
}

/// Where the config file is looked for.
pub fn path() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("SANDRUN_CONFIG")
        .or_else(|| var("XDG_CONFIG_HOME").map(|d| d.join("sandrun/config.yaml")))
        .or_else(|| var("HOME").map(|h| h.join(".config/sandrun/config.yaml")))
}

impl Config {
    /// The config at [`path`], or an empty one when there is no file.
    pub fn load() -> Result<Config, ConfigError> {
        match path() {
            Some(p) if p.exists() => Config::read(&p),
            _ => Ok(Config::default()),
        }
    }

    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let text =
            crate::input::read_text(path, "config file", crate::input::MAX_SMALL_FILE_BYTES)?;
        Config::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            location: e.location().map(|l| (l.line(), l.column())),
            message: e
                .to_string()
                .split(" at line ")
                .next()
                .unwrap_or_default()
                .to_string(),
        })
    }

    /// Add what this file says to `opts` (command-line options come first).
    pub fn apply(self, opts: &mut PullOptions) {
        let Config {
            insecure_registries,
            connectors,
            credentials,
            layer_size_limit,
            kubernetes: _,
        } = self;
        for r in insecure_registries {
            if !opts.insecure_registries.contains(&r) {
                opts.insecure_registries.push(r);
            }
        }
        for (host, cred) in credentials {
            opts.credentials.entry(host).or_insert(cred);
        }
        for (id, mapping) in connectors {
            opts.connectors.entry(id).or_insert(mapping);
        }
        if opts.layer_size_limit.is_none() {
            opts.layer_size_limit = layer_size_limit;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connectors_credentials_and_mirrors() {
        let c = Config::parse(
            Path::new("c.yaml"),
            "insecure_registries: [m:5000]\nconnectors:\n  account.img:\n    registry: m:5000\n    credentials: {username: u, password: p}\ncredentials:\n  ghcr.io: {token: t}\n",
        )
        .unwrap();
        let mut opts = PullOptions::default();
        c.apply(&mut opts);
        assert_eq!(opts.insecure_registries, ["m:5000"]);
        assert_eq!(opts.connectors["account.img"].registry, "m:5000");
        assert_eq!(
            opts.credentials["ghcr.io"],
            Credential::Token { token: "t".into() }
        );
    }

    #[test]
    fn maps_connectors_to_pull_secrets() {
        let c = Config::parse(
            Path::new("c.yaml"),
            "kubernetes:\n  pull_secrets:\n    account.img: regcred\n  recipe_repositories:\n    pg: registry.example.com/ci/pg\n",
        )
        .unwrap();
        assert_eq!(c.kubernetes.pull_secrets["account.img"], "regcred");
        assert_eq!(
            c.kubernetes.recipe_repositories["pg"],
            "registry.example.com/ci/pg"
        );
        let e = Config::parse(Path::new("c.yaml"), "kubernetes: {pullSecrets: {}}\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `pullSecrets`"), "{e}");
    }

    #[test]
    fn layer_size_limit_is_a_size_and_the_command_line_wins() {
        let c = Config::parse(Path::new("c.yaml"), "layer_size_limit: 2Gi\n").unwrap();
        let mut opts = PullOptions::default();
        c.apply(&mut opts);
        assert_eq!(opts.layer_size_limit, Some(2 << 30));
        let c = Config::parse(Path::new("c.yaml"), "layer_size_limit: 2Gi\n").unwrap();
        let mut opts = PullOptions {
            layer_size_limit: Some(1),
            ..Default::default()
        };
        c.apply(&mut opts);
        assert_eq!(opts.layer_size_limit, Some(1));
        let e = Config::parse(Path::new("c.yaml"), "layer_size_limit: lots\n").unwrap_err();
        assert!(e.to_string().starts_with("c.yaml:1:"), "{e}");
    }

    #[test]
    fn errors_name_the_file_and_position() {
        let e = Config::parse(Path::new("c.yaml"), "conectors: {}\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("c.yaml:1:1: unknown field `conectors`"),
            "{msg}"
        );
    }
}
