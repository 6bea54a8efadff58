//! The API client each binary builds from its kubeconfig, naming itself in `User-Agent` as
//! Kubernetes' components do (`kubelet/v1.32.0 (linux/amd64) ...`): the API server records
//! a writer's fields under that name (`metadata.managedFields`) when a request names no
//! field manager of its own.

use std::path::Path;

use anyhow::Context as _;
use http::{header::USER_AGENT, HeaderValue};

/// The client configuration of a kubeconfig file, sending `agent` as the user agent.
pub async fn config(kubeconfig: &Path, agent: &str) -> anyhow::Result<kube::Config> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading the kubeconfig {}", kubeconfig.display()))?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .with_context(|| format!("the kubeconfig {} is not usable", kubeconfig.display()))?;
    let ua = format!(
        "{agent}/v{} ({}/{}) ferry",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    cfg.headers.push((
        USER_AGENT,
        HeaderValue::from_str(&ua).with_context(|| format!("user agent {ua:?}"))?,
    ));
    Ok(cfg)
}

/// A client from a kubeconfig file, sending `agent` as the user agent.
pub async fn client(kubeconfig: &Path, agent: &str) -> anyhow::Result<kube::Client> {
    kube::Client::try_from(config(kubeconfig, agent).await?).context("building the API client")
}
