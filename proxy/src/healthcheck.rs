//! The health check node ports of LoadBalancer Services with `externalTrafficPolicy: Local`,
//! served as kube-proxy serves them: on `spec.healthCheckNodePort` of every node, `200` with the
//! number of ready endpoints of the Service on this node, `503` when it has none, so a load
//! balancer sends traffic only to nodes that can keep it local.
//!
//! One listener per port, opened when a Service gets its port and closed when it goes; the
//! count changes without touching the listener.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::model::HealthCheck;
use crate::source::Key;

struct Listener {
    service: Key,
    state: watch::Sender<HealthCheck>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The open health check ports.
#[derive(Default)]
pub struct HealthChecks {
    by_port: HashMap<u16, Listener>,
}

impl HealthChecks {
    /// What a Service's health check is now (`None`: it has none).
    pub fn update(&mut self, service: &Key, check: Option<HealthCheck>) {
        // A port the Service had and no longer has (or moved): closed.
        self.by_port.retain(|port, l| {
            let keep = l.service != *service || check.as_ref().is_some_and(|c| c.port == *port);
            if !keep {
                info!(port, service = %format!("{}/{}", service.0, service.1), "health check port closed");
            }
            keep
        });
        let Some(check) = check else { return };
        match self.by_port.get(&check.port) {
            Some(l) if l.service == *service => {
                l.state.send_if_modified(|s| {
                    let changed = *s != check;
                    *s = check.clone();
                    changed
                });
            }
            Some(l) => warn!(
                port = check.port,
                "health check port of Service {}/{} is already served for {}/{}",
                service.0,
                service.1,
                l.service.0,
                l.service.1
            ),
            None => match self.open(service, check) {
                Ok(l) => {
                    self.by_port.insert(l.1, l.0);
                }
                Err(e) => warn!("{e:#}"),
            },
        }
    }

    fn open(&self, service: &Key, check: HealthCheck) -> anyhow::Result<(Listener, u16)> {
        use anyhow::Context as _;
        let port = check.port;
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let std = std::net::TcpListener::bind(addr).with_context(|| {
            format!(
                "health check port {port} of Service {}/{}",
                service.0, service.1
            )
        })?;
        std.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std)?;
        let (tx, rx) = watch::channel(check);
        let app = Router::new().fallback(move || {
            let rx = rx.clone();
            async move { answer(&rx.borrow()) }
        });
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(port, "health check server: {e}");
            }
        });
        info!(port, service = %format!("{}/{}", service.0, service.1), "health check port open");
        Ok((
            Listener {
                service: service.clone(),
                state: tx,
                task,
            },
            port,
        ))
    }
}

/// kube-proxy's answer: the Service, its local endpoints, 200 or 503.
fn answer(c: &HealthCheck) -> axum::response::Response {
    let body = serde_json::json!({
        "service": {"namespace": c.namespace, "name": c.name},
        "localEndpoints": c.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let code = if c.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    debug!(
        port = c.port,
        local = c.local_endpoints,
        "health check asked"
    );
    let weight = c.local_endpoints.to_string();
    (
        code,
        [
            ("content-type", "application/json"),
            ("x-content-type-options", "nosniff"),
            ("x-load-balancing-endpoint-weight", weight.as_str()),
        ],
        body.to_string(),
    )
        .into_response()
}
