//! Where registry credentials come from, in order: credentials given to sandrun for a
//! registry (its config file's connector mapping, tests), podman's `auth.json`
//! (`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`), then Docker's
//! `$DOCKER_CONFIG/config.json` or `~/.docker/config.json` (`auths`, `credsStore`,
//! `credHelpers`, through the `docker_credential` crate). Nothing found: anonymous.
//!
//! Credentials are looked up by the registry host of the image being pulled and handed
//! only to the client for that registry. The registry's token service (the realm named in
//! its `WWW-Authenticate` challenge) receives them to issue a token, as with Docker; HTTP
//! redirects to other hosts (blob CDNs) never carry them (reqwest strips `Authorization`
//! across origins). They are never printed: [`Credential`]'s `Debug` hides the secret.

use std::collections::BTreeMap;
use std::fmt;

use oci_client::secrets::RegistryAuth;

/// A credential for one registry.
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum Credential {
    Basic { username: String, password: String },
    Token { token: String },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <hidden>)"),
            Credential::Token { .. } => write!(f, "Token(<hidden>)"),
        }
    }
}

/// Where a credential was found, for messages (never the secret itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    Given,
    Podman,
    Docker,
    Anonymous,
}

/// The key Docker's config files use for a registry host.
fn docker_config_key(host: &str) -> String {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => {
            "https://index.docker.io/v1/".to_string()
        }
        h => h.to_string(),
    }
}

/// Finds the credential for `registry` (as written in the image reference).
pub fn lookup(
    registry: &str,
    given: &BTreeMap<String, Credential>,
) -> (RegistryAuth, CredentialSource) {
    if let Some(c) = given.get(registry) {
        return (to_auth(c.clone()), CredentialSource::Given);
    }
    let key = docker_config_key(registry);
    if let Ok(c) = docker_credential::get_podman_credential(&key) {
        return (from_docker(c), CredentialSource::Podman);
    }
    if let Ok(c) = docker_credential::get_credential(&key) {
        return (from_docker(c), CredentialSource::Docker);
    }
    (RegistryAuth::Anonymous, CredentialSource::Anonymous)
}

fn to_auth(c: Credential) -> RegistryAuth {
    match c {
        Credential::Basic { username, password } => RegistryAuth::Basic(username, password),
        Credential::Token { token } => RegistryAuth::Bearer(token),
    }
}

fn from_docker(c: docker_credential::DockerCredential) -> RegistryAuth {
    match c {
        docker_credential::DockerCredential::UsernamePassword(u, p) => RegistryAuth::Basic(u, p),
        docker_credential::DockerCredential::IdentityToken(t) => RegistryAuth::Bearer(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let c = Credential::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let t = Credential::Token {
            token: "tok-secret".into(),
        };
        assert!(!format!("{t:?}").contains("tok-secret"));
    }

    #[test]
    fn given_credentials_win_and_only_for_their_registry() {
        let mut given = BTreeMap::new();
        given.insert(
            "reg.example:5000".to_string(),
            Credential::Basic {
                username: "u".into(),
                password: "p".into(),
            },
        );
        let (auth, src) = lookup("reg.example:5000", &given);
        assert_eq!(src, CredentialSource::Given);
        assert!(matches!(auth, RegistryAuth::Basic(ref u, _) if u == "u"));
        assert_eq!(
            docker_config_key("docker.io"),
            "https://index.docker.io/v1/"
        );
    }
}
