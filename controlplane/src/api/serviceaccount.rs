//! Service accounts in the API server: the TokenRequest API (`serviceaccounts/token`) issuing
//! signed, audience-bound, expiring JWTs; their authentication as
//! `system:serviceaccount:<ns>:<name>`; and the ServiceAccount admission of pods (the account
//! defaulted to `default`, the `kube-api-access-*` projected volume mounted in every container
//! unless `automountServiceAccountToken` says not to).
//!
//! Tokens carry Kubernetes' claims (`iss`, `sub`, `aud`, `exp`, `iat`, `nbf`, `jti` and the
//! `kubernetes.io` object naming the namespace, the account and the pod they are bound to) and
//! are signed with ES256 by the key in `pki/sa.key`. A token is accepted while it has not
//! expired, names one of the API's audiences, and the account (and the pod it is bound to) still
//! exist with the uid it was issued for: deleting either revokes it at once.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::debug;

use super::auth::User;
use super::resources;
use super::status::{ApiError, ApiResult, FieldError};
use super::{decode, now_rfc3339, Api};

/// The issuer and default audience of the tokens (kube-apiserver's `--service-account-issuer`
/// as clusters set it).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Where pods find their token, CA and namespace.
pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The token lifetime of the automounted volume (Kubernetes' 3607 s: one hour, and a few
/// seconds that tell it apart).
pub const AUTOMOUNT_EXPIRATION: i64 = 3607;
/// TokenRequest bounds: at least ten minutes (as Kubernetes), at most a day (Kubernetes leaves
/// the upper bound to `--service-account-max-token-expiration`; a stolen token should not live
/// for a year).
pub const MIN_EXPIRATION: i64 = 600;
pub const MAX_EXPIRATION: i64 = 86_400;
const DEFAULT_EXPIRATION: i64 = 3600;

/// Signs and verifies the tokens.
pub struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Signer {
    /// From the PKCS#8 private key and the SPKI public key, PEM (P-256).
    pub fn new(private_pem: &str, public_pem: &str) -> anyhow::Result<Signer> {
        Ok(Signer {
            encoding: EncodingKey::from_ec_pem(private_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("the service account signing key: {e}"))?,
            decoding: DecodingKey::from_ec_pem(public_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("the service account public key: {e}"))?,
        })
    }

    fn sign(&self, claims: &Claims) -> ApiResult<String> {
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &self.encoding)
            .map_err(|e| ApiError::internal(format!("signing the token: {e}")))
    }

    /// The claims of a token this signer issued that has not expired and is meant for the API.
    fn verify(&self, token: &str) -> Option<Claims> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[ISSUER]);
        v.set_issuer(&[ISSUER]);
        v.leeway = 0;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iat", "nbf", "aud", "iss", "sub"]);
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &v) {
            Ok(d) => Some(d.claims),
            Err(e) => {
                debug!(error = %e, "service account token refused");
                None
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Claims {
    aud: Vec<String>,
    exp: i64,
    iat: i64,
    nbf: i64,
    iss: String,
    jti: String,
    sub: String,
    #[serde(rename = "kubernetes.io")]
    k8s: K8sClaims,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct K8sClaims {
    namespace: String,
    serviceaccount: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<Ref>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Ref {
    name: String,
    uid: String,
}

/// The user a service account acts as.
pub fn user(ns: &str, name: &str) -> User {
    User::new(
        &format!("system:serviceaccount:{ns}:{name}"),
        &[
            "system:serviceaccounts",
            &format!("system:serviceaccounts:{ns}"),
        ],
    )
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// Whether a bearer token has a JWT's shape (three base64url parts), so it is worth verifying.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

impl Api {
    async fn get_uid(&self, plural: &str, ns: &str, name: &str) -> ApiResult<Option<Value>> {
        let info = resources::find("", "v1", plural).expect("served");
        Ok(self
            .store
            .get(&info.key(ns, name))
            .await?
            .map(|kv| decode(&kv)))
    }

    /// The user of a service account token, if the token is valid and what it names still
    /// exists (the account, and the pod it is bound to, with the uids it was issued for).
    pub async fn authenticate_token(&self, token: &str) -> Option<User> {
        let claims = self.cfg.signer.as_ref()?.verify(token)?;
        let k = &claims.k8s;
        let sa = self
            .get_uid("serviceaccounts", &k.namespace, &k.serviceaccount.name)
            .await
            .ok()??;
        if sa["metadata"]["uid"].as_str() != Some(k.serviceaccount.uid.as_str()) {
            debug!(
                sub = claims.sub,
                "token of a service account that was deleted"
            );
            return None;
        }
        if let Some(p) = &k.pod {
            let pod = self.get_uid("pods", &k.namespace, &p.name).await.ok()??;
            let gone = pod["metadata"]["uid"].as_str() != Some(p.uid.as_str())
                || !pod["metadata"]["deletionTimestamp"].is_null();
            if gone {
                debug!(
                    sub = claims.sub,
                    pod = p.name,
                    "token bound to a pod that is gone"
                );
                return None;
            }
        }
        Some(user(&k.namespace, &k.serviceaccount.name))
    }

    /// `POST .../serviceaccounts/<name>/token`: a TokenRequest answered with its token.
    pub async fn request_token(&self, ns: &str, name: &str, body: &Value) -> ApiResult<Value> {
        let Some(signer) = self.cfg.signer.as_ref() else {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource (token issuing is not configured)",
            ));
        };
        let kind = body["kind"].as_str().unwrap_or("TokenRequest");
        if kind != "TokenRequest" {
            return Err(ApiError::bad_request(format!(
                "expected a TokenRequest, got {kind}"
            )));
        }
        let spec = &body["spec"];
        let mut errs = Vec::new();
        let expiration = match &spec["expirationSeconds"] {
            Value::Null => DEFAULT_EXPIRATION,
            v => match v.as_i64() {
                Some(s) if s < MIN_EXPIRATION => {
                    errs.push(FieldError::invalid(
                        "spec.expirationSeconds",
                        s.to_string(),
                        "may not specify a duration less than 10 minutes",
                    ));
                    s
                }
                Some(s) => s.min(MAX_EXPIRATION),
                None => {
                    errs.push(FieldError::invalid(
                        "spec.expirationSeconds",
                        v.to_string(),
                        "must be an integer number of seconds",
                    ));
                    0
                }
            },
        };
        let audiences: Vec<String> = match spec["audiences"].as_array() {
            Some(a) if !a.is_empty() => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => vec![ISSUER.to_string()],
        };
        let bound = &spec["boundObjectRef"];
        let mut pod = None;
        if !bound.is_null() {
            match bound["kind"].as_str() {
                Some("Pod") => {}
                other => errs.push(FieldError::unsupported(
                    "spec.boundObjectRef.kind",
                    other.unwrap_or_default(),
                    &["Pod"],
                )),
            }
            let pname = bound["name"].as_str().unwrap_or_default();
            if pname.is_empty() {
                errs.push(FieldError::required("spec.boundObjectRef.name"));
            } else if errs.is_empty() {
                let Some(p) = self.get_uid("pods", ns, pname).await? else {
                    return Err(ApiError::not_found("pods", "", pname));
                };
                let uid = p["metadata"]["uid"].as_str().unwrap_or_default();
                if let Some(want) = bound["uid"].as_str().filter(|u| !u.is_empty()) {
                    if want != uid {
                        return Err(ApiError::new(
                            409,
                            "Conflict",
                            format!("the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"),
                        ));
                    }
                }
                let pod_sa = p["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default");
                if pod_sa != name {
                    return Err(ApiError::bad_request(format!(
                        "cannot bind a token of service account {ns}/{name} to pod {ns}/{pname}, which runs as {pod_sa}"
                    )));
                }
                pod = Some(Ref {
                    name: pname.into(),
                    uid: uid.into(),
                });
            }
        }
        if !errs.is_empty() {
            return Err(ApiError::invalid(
                "TokenRequest",
                "authentication.k8s.io",
                name,
                errs,
            ));
        }
        let Some(sa) = self.get_uid("serviceaccounts", ns, name).await? else {
            return Err(ApiError::not_found("serviceaccounts", "", name));
        };
        let iat = now();
        let claims = Claims {
            aud: audiences.clone(),
            exp: iat + expiration,
            iat,
            nbf: iat,
            iss: ISSUER.into(),
            jti: uuid::Uuid::new_v4().to_string(),
            sub: format!("system:serviceaccount:{ns}:{name}"),
            k8s: K8sClaims {
                namespace: ns.into(),
                serviceaccount: Ref {
                    name: name.into(),
                    uid: sa["metadata"]["uid"].as_str().unwrap_or_default().into(),
                },
                pod,
            },
        };
        let token = signer.sign(&claims)?;
        let mut out_spec = json!({"audiences": audiences, "expirationSeconds": expiration});
        if !bound.is_null() {
            out_spec["boundObjectRef"] = bound.clone();
        }
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": now_rfc3339()},
            "spec": out_spec,
            "status": {"token": token, "expirationTimestamp": rfc3339(claims.exp)},
        }))
    }

    /// ServiceAccount admission of a new pod: the account defaulted, checked, and its token
    /// mounted. Mirror pods are left alone (they may not use service accounts at all).
    pub async fn admit_pod_service_account(&self, pod: &mut Value) -> ApiResult<()> {
        if !pod["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_null() {
            return Ok(());
        }
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let spec = &mut pod["spec"];
        if !spec.is_object() {
            return Ok(()); // validation reports it
        }
        let name = match spec["serviceAccountName"]
            .as_str()
            .filter(|s| !s.is_empty())
        {
            Some(n) => n.to_string(),
            None => match spec["serviceAccount"].as_str().filter(|s| !s.is_empty()) {
                Some(n) => n.to_string(),
                None => "default".to_string(),
            },
        };
        spec["serviceAccountName"] = json!(name);
        spec["serviceAccount"] = json!(name);
        let sa = self.get_uid("serviceaccounts", &ns, &name).await?;
        // Kubernetes refuses a pod while its namespace's `default` account does not exist yet
        // (a moment after the namespace is made); Ferry admits it and its kubelet waits for the
        // token instead. Any other missing account is refused.
        if sa.is_none() && name != "default" {
            let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
            return Err(ApiError::forbidden(format!(
                "pods \"{pod_name}\" is forbidden: error looking up service account {ns}/{name}: serviceaccount \"{name}\" not found"
            )));
        }
        let automount = spec["automountServiceAccountToken"]
            .as_bool()
            .or_else(|| sa.as_ref()?["automountServiceAccountToken"].as_bool())
            .unwrap_or(true);
        if automount {
            mount_token(spec);
        }
        Ok(())
    }
}

/// Adds the `kube-api-access-*` projected volume (token, the cluster CA, the namespace) and
/// mounts it read-only at [`MOUNT_PATH`] in each container that has nothing there already.
fn mount_token(spec: &mut Value) {
    let containers = ["initContainers", "containers"];
    let wanting: Vec<(&str, usize)> = containers
        .iter()
        .flat_map(|field| {
            let list = spec[*field].as_array().cloned().unwrap_or_default();
            list.into_iter().enumerate().filter_map(move |(i, c)| {
                let taken = c["volumeMounts"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|m| m["mountPath"].as_str() == Some(MOUNT_PATH))
                });
                (!taken).then_some((*field, i))
            })
        })
        .collect();
    if wanting.is_empty() {
        return;
    }
    let volume = format!("kube-api-access-{}", super::verbs::random_suffix());
    if !spec["volumes"].is_array() {
        spec["volumes"] = json!([]);
    }
    if let Some(v) = spec["volumes"].as_array_mut() {
        v.push(json!({
            "name": volume,
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": AUTOMOUNT_EXPIRATION, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ]
            }
        }));
    }
    for (field, i) in wanting {
        let c = &mut spec[field][i];
        if !c["volumeMounts"].is_array() {
            c["volumeMounts"] = json!([]);
        }
        if let Some(m) = c["volumeMounts"].as_array_mut() {
            m.push(json!({"name": volume, "readOnly": true, "mountPath": MOUNT_PATH}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automount_adds_one_volume_and_skips_containers_that_mount_the_path() {
        let mut spec = json!({
            "containers": [
                {"name": "a"},
                {"name": "b", "volumeMounts": [{"name": "mine", "mountPath": MOUNT_PATH}]}
            ],
            "initContainers": [{"name": "i"}]
        });
        mount_token(&mut spec);
        let vols = spec["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 1);
        let name = vols[0]["name"].as_str().unwrap();
        assert!(name.starts_with("kube-api-access-"));
        let sources = vols[0]["projected"]["sources"].as_array().unwrap();
        assert_eq!(sources[0]["serviceAccountToken"]["path"], "token");
        assert_eq!(spec["containers"][0]["volumeMounts"][0]["name"], name);
        assert_eq!(spec["containers"][0]["volumeMounts"][0]["readOnly"], true);
        assert_eq!(spec["initContainers"][0]["volumeMounts"][0]["name"], name);
        assert_eq!(
            spec["containers"][1]["volumeMounts"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    fn signer() -> Signer {
        let key = rcgen::KeyPair::generate().unwrap();
        Signer::new(&key.serialize_pem(), &key.public_key_pem()).unwrap()
    }

    fn claims(exp_in: i64, aud: &str) -> Claims {
        let iat = now();
        Claims {
            aud: vec![aud.into()],
            exp: iat + exp_in,
            iat,
            nbf: iat,
            iss: ISSUER.into(),
            jti: "j".into(),
            sub: "system:serviceaccount:ns:sa".into(),
            k8s: K8sClaims {
                namespace: "ns".into(),
                serviceaccount: Ref {
                    name: "sa".into(),
                    uid: "u".into(),
                },
                pod: None,
            },
        }
    }

    #[test]
    fn tokens_verify_only_with_their_key_audience_and_before_expiry() {
        let s = signer();
        let good = s.sign(&claims(600, ISSUER)).unwrap();
        assert!(looks_like_jwt(&good));
        assert_eq!(s.verify(&good), Some(claims_of(&s, &good)));
        assert!(s.verify(&s.sign(&claims(-5, ISSUER)).unwrap()).is_none());
        assert!(s.verify(&s.sign(&claims(600, "vault")).unwrap()).is_none());
        assert!(signer().verify(&good).is_none());
        // A payload changed after signing.
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = s.sign(&Claims {
            sub: "system:serviceaccount:kube-system:admin".into(),
            ..claims(600, ISSUER)
        });
        let forged = forged.unwrap();
        let body = forged.split('.').nth(1).unwrap();
        parts[1] = body;
        assert!(s.verify(&parts.join(".")).is_none());
    }

    fn claims_of(s: &Signer, t: &str) -> Claims {
        s.verify(t).unwrap()
    }
}
