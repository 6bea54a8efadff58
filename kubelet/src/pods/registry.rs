//! Credentials for image pulls: the pod's `imagePullSecrets` (`kubernetes.io/dockerconfigjson`
//! and the older `kubernetes.io/dockercfg`), matched to the registry of the image as the
//! kubelet's credential keyring does, and handed to the runtime with CRI PullImage.
//!
//! A registry key matches an image when its host (and port) are the image's registry and its
//! path, if any, is a prefix of the repository; more specific keys are tried first. With no
//! matching credential the pull is anonymous.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::ResourceExt;
use serde::Deserialize;

use super::Worker;
use crate::cri::AuthConfig;

/// One registry's entry in a docker config.
#[derive(Debug, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    /// base64 of `username:password`.
    #[serde(default)]
    auth: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
}

#[derive(Debug, Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

/// The registry host (with port) of an image reference and its repository path, Docker's
/// rules: the first component is a registry when it has a `.` or `:`, or is `localhost`;
/// otherwise the image is on Docker Hub.
pub(super) fn registry_of(image: &str) -> (String, String) {
    let name = image.split('@').next().unwrap_or(image);
    let (first, rest) = match name.split_once('/') {
        Some((f, r)) if f.contains('.') || f.contains(':') || f == "localhost" => (f, r),
        _ => ("docker.io", name),
    };
    // Drop the tag (a `:` after the last `/`).
    let repo = match rest.rsplit_once('/') {
        Some((dir, last)) => format!("{dir}/{}", last.split(':').next().unwrap_or(last)),
        None => rest.split(':').next().unwrap_or(rest).to_string(),
    };
    (first.to_string(), repo)
}

/// A docker config key as (host, path): scheme and trailing `/v1/`/`/v2/` dropped, Docker
/// Hub's old names folded into `docker.io`.
fn key_of(key: &str) -> (String, String) {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let (host, path) = k.split_once('/').unwrap_or((k, ""));
    let path = path
        .trim_end_matches('/')
        .trim_end_matches("v1")
        .trim_end_matches("v2")
        .trim_end_matches('/');
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        h => h,
    };
    (host.to_string(), path.to_string())
}

/// The credentials of one Secret's docker config that match `image`, most specific first.
/// An error names the Secret and what is wrong with it.
fn matching(secret: &Secret, image: &str) -> Result<Vec<(usize, AuthConfig)>, String> {
    let name = secret.name_any();
    let data = secret.data.clone().unwrap_or_default();
    let auths: BTreeMap<String, Entry> = match secret.type_.as_deref() {
        Some("kubernetes.io/dockerconfigjson") => {
            let raw = data.get(".dockerconfigjson").ok_or_else(|| {
                format!("secret {name:?} of type kubernetes.io/dockerconfigjson has no .dockerconfigjson key")
            })?;
            serde_json::from_slice::<DockerConfigJson>(&raw.0)
                .map_err(|e| format!("secret {name:?}: .dockerconfigjson: {e}"))?
                .auths
        }
        Some("kubernetes.io/dockercfg") => {
            let raw = data.get(".dockercfg").ok_or_else(|| {
                format!("secret {name:?} of type kubernetes.io/dockercfg has no .dockercfg key")
            })?;
            serde_json::from_slice(&raw.0).map_err(|e| format!("secret {name:?}: .dockercfg: {e}"))?
        }
        other => {
            return Err(format!(
                "secret {name:?} is of type {:?}; imagePullSecrets must be kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg",
                other.unwrap_or_default()
            ))
        }
    };
    let (host, repo) = registry_of(image);
    let mut out = Vec::new();
    for (key, e) in auths {
        let (khost, kpath) = key_of(&key);
        if khost != host
            || !(kpath.is_empty() || repo == kpath || repo.starts_with(&format!("{kpath}/")))
        {
            continue;
        }
        let (mut username, mut password) = (e.username, e.password);
        if username.is_empty() && !e.auth.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(e.auth.trim())
                .map_err(|_| format!("secret {name:?}: auth of {key:?} is not base64"))?;
            let decoded = String::from_utf8_lossy(&decoded).into_owned();
            let (u, p) = decoded
                .split_once(':')
                .ok_or_else(|| format!("secret {name:?}: auth of {key:?} is not user:password"))?;
            (username, password) = (u.to_string(), p.to_string());
        }
        // No server address: the entry was matched to the image's registry here, and
        // containerd would only compare it again (as a URL, which `host:port` is not).
        out.push((
            kpath.len(),
            AuthConfig {
                username,
                password,
                identity_token: e.identity_token,
                ..Default::default()
            },
        ));
    }
    Ok(out)
}

impl Worker {
    /// The credentials to try for `image`, from the pod's imagePullSecrets: the most specific
    /// first; empty when none matches (an anonymous pull). A Secret that is missing is skipped
    /// with a warning (as the kubelet does); one that is malformed is an error.
    pub(super) async fn pull_credentials(&self, image: &str) -> Result<Vec<AuthConfig>, String> {
        let refs: Vec<String> = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.image_pull_secrets.iter().flatten())
            .map(|r| r.name.clone())
            .filter(|n| !n.is_empty())
            .collect();
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let ns = self.pod.namespace().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.k.client.clone(), &ns);
        let mut found = Vec::new();
        for name in refs {
            match api.get_opt(&name).await {
                Ok(Some(s)) => found.extend(matching(&s, image)?),
                Ok(None) => tracing::warn!(
                    pod = %self.key,
                    "imagePullSecrets: secret {name:?} not found; pulling without it"
                ),
                Err(e) => return Err(format!("reading imagePullSecrets secret {name:?}: {e}")),
            }
        }
        found.sort_by_key(|(specific, _)| std::cmp::Reverse(*specific));
        Ok(found.into_iter().map(|(_, a)| a).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn registries_of_image_references() {
        assert_eq!(
            registry_of("busybox"),
            ("docker.io".into(), "busybox".into())
        );
        assert_eq!(
            registry_of("library/busybox:1.36"),
            ("docker.io".into(), "library/busybox".into())
        );
        assert_eq!(
            registry_of("10.0.0.1:5000/team/app:v2"),
            ("10.0.0.1:5000".into(), "team/app".into())
        );
        assert_eq!(
            registry_of("registry.example/app@sha256:abc"),
            ("registry.example".into(), "app".into())
        );
        assert_eq!(
            registry_of("localhost/app"),
            ("localhost".into(), "app".into())
        );
    }

    fn secret(ty: &str, key: &str, json: &str) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("regcred".into()),
                ..Default::default()
            },
            type_: Some(ty.into()),
            data: Some([(key.to_string(), ByteString(json.as_bytes().to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn credentials_match_host_and_path_most_specific_first() {
        let s = secret(
            "kubernetes.io/dockerconfigjson",
            ".dockerconfigjson",
            r#"{"auths": {
                "https://10.0.0.1:5000/v2/": {"auth": "dXNlcjpwYXNz"},
                "10.0.0.1:5000/team": {"username": "teamuser", "password": "tp"},
                "10.0.0.1:5000/other": {"username": "no", "password": "no"},
                "10.0.0.2:5000": {"username": "no", "password": "no"}}}"#,
        );
        let got = matching(&s, "10.0.0.1:5000/team/app:1").unwrap();
        let mut got: Vec<_> = got.into_iter().collect();
        got.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        let users: Vec<&str> = got.iter().map(|(_, a)| a.username.as_str()).collect();
        assert_eq!(users, ["teamuser", "user"]);
        assert_eq!(got[1].1.password, "pass");
        assert!(matching(&s, "docker.io/library/busybox")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn malformed_secrets_are_named() {
        let e = matching(&secret("Opaque", "x", "{}"), "a").unwrap_err();
        assert!(
            e.contains("regcred") && e.contains("kubernetes.io/dockerconfigjson"),
            "{e}"
        );
        let e = matching(
            &secret("kubernetes.io/dockerconfigjson", ".dockerconfigjson", "{"),
            "a",
        )
        .unwrap_err();
        assert!(e.contains(".dockerconfigjson"), "{e}");
    }
}
