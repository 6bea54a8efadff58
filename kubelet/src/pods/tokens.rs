//! Service account tokens for `serviceAccountToken` projected sources (`volumes.rs` writes them):
//! requested through TokenRequest for the pod's account, bound to the pod, for the source's
//! audience and lifetime; kept per worker and requested again once 80% of the lifetime has
//! passed or it is a day old, as the kubelet's token manager does.

use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::Api;
use kube::ResourceExt;

use super::Worker;

/// A token requested for a projected volume, and when it must be requested again.
#[derive(Clone)]
pub(super) struct CachedToken {
    token: String,
    refresh_at: Instant,
}

/// When a token valid for `expiration` seconds is requested again: after 80% of its lifetime,
/// and at least daily (the kubelet's token manager).
fn refresh_after(expiration: i64) -> Duration {
    (Duration::from_secs(expiration.max(0) as u64) * 4 / 5).min(Duration::from_secs(86_400))
}

/// Kubernetes' smallest token lifetime, and its default for projected tokens.
const MIN_SECONDS: i64 = 600;
pub(super) const DEFAULT_SECONDS: i64 = 3600;

impl Worker {
    /// A token of the pod's service account for `audience`, bound to the pod: the one
    /// requested before while it is fresh, a new one otherwise.
    pub(super) async fn token(
        &mut self,
        volume: &str,
        audience: Option<&str>,
        expiration: i64,
    ) -> Result<String, String> {
        let key = format!("{}/{expiration}", audience.unwrap_or_default());
        if let Some(c) = self.tokens.get(&key) {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let failed = |e: String| {
            format!("MountVolume.SetUp failed for volume {volume:?} : failed to fetch token: {e}")
        };
        if expiration < MIN_SECONDS {
            return Err(failed(format!(
                "expirationSeconds {expiration} is less than {MIN_SECONDS}"
            )));
        }
        let ns = self.pod.namespace().unwrap_or_default();
        let spec = self.pod.spec.as_ref();
        let account = spec
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
                expiration_seconds: Some(expiration),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.pod.name_any()),
                    uid: self.pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.k.client.clone(), &ns);
        let got = api
            .create_token_request(account, &Default::default(), &req)
            .await
            .map_err(|e| failed(format!("serviceaccounts \"{account}\": {e}")))?;
        let token = got
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| failed("the API server answered without a token".into()))?;
        let refresh = refresh_after(expiration);
        tracing::debug!(pod = %self.key, volume, account, "service account token requested");
        self.tokens.insert(
            key,
            CachedToken {
                token: token.clone(),
                refresh_at: Instant::now() + refresh,
            },
        );
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_requested_again_at_80_percent_of_their_life_or_daily() {
        assert_eq!(refresh_after(3607), Duration::from_millis(2_885_600));
        assert_eq!(refresh_after(600), Duration::from_secs(480));
        assert_eq!(refresh_after(7 * 86_400), Duration::from_secs(86_400));
    }
}
