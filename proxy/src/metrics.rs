//! Prometheus metrics (:10249/metrics) and the health endpoint (:10256/healthz), as kube-proxy
//! serves them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use proxy_common::ServiceStats;
use tracing::{info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrontendLabels {
    pub service: String,
    pub frontend: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub sync_duration: Histogram,
    pub syncs: Counter,
    pub sync_errors: Counter,
    pub map_writes: Counter,
    pub last_sync_writes: Gauge,
    pub services: Gauge,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub conntrack_entries: Gauge,
    pub conntrack_gc_removed: Counter,
    pub packets: Family<FrontendLabels, Counter>,
    pub bytes: Family<FrontendLabels, Counter>,
    pub socket_translations: Family<FrontendLabels, Counter>,
    pub refused: Family<FrontendLabels, Counter>,
    pub dns: Family<DnsLabels, Counter>,
    /// The DNS server's counters as last read.
    dns_seen: Mutex<HashMap<&'static str, u64>>,
    /// Unix seconds of the last successful sync; 0 before the first.
    pub last_sync: AtomicU64,
    /// Last packet/byte totals read per frontend, to turn them into counter increments.
    seen: Mutex<HashMap<FrontendLabels, ServiceStats>>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let m = Self {
            registry: Mutex::new(Registry::default()),
            sync_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            syncs: Counter::default(),
            sync_errors: Counter::default(),
            map_writes: Counter::default(),
            last_sync_writes: Gauge::default(),
            services: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            conntrack_entries: Gauge::default(),
            conntrack_gc_removed: Counter::default(),
            packets: Family::default(),
            bytes: Family::default(),
            socket_translations: Family::default(),
            refused: Family::default(),
            dns: Family::default(),
            dns_seen: Mutex::new(HashMap::new()),
            last_sync: AtomicU64::new(0),
            seen: Mutex::new(HashMap::new()),
        };
        {
            let mut r = m.registry.lock().unwrap();
            r.register(
                "ferry_sync_duration_seconds",
                "Time to bring the datapath maps to a new input",
                m.sync_duration.clone(),
            );
            r.register(
                "ferry_syncs",
                "Inputs applied to the datapath",
                m.syncs.clone(),
            );
            r.register(
                "ferry_sync_errors",
                "Inputs rejected (bad input or map errors); the maps kept their last good state",
                m.sync_errors.clone(),
            );
            r.register(
                "ferry_map_writes",
                "Map entries written or deleted by syncs",
                m.map_writes.clone(),
            );
            r.register(
                "ferry_last_sync_map_writes",
                "Map entries written or deleted by the last sync",
                m.last_sync_writes.clone(),
            );
            r.register(
                "ferry_frontends",
                "Frontends (VIP or node address, port, protocol) programmed",
                m.frontends.clone(),
            );
            r.register(
                "ferry_backends",
                "Distinct backends programmed",
                m.backends.clone(),
            );
            r.register(
                "ferry_conntrack_entries",
                "Live connections in the conntrack map",
                m.conntrack_entries.clone(),
            );
            r.register(
                "ferry_conntrack_gc_removed",
                "Conntrack entries removed by garbage collection",
                m.conntrack_gc_removed.clone(),
            );
            r.register(
                "ferry_service_packets",
                "Packets sent to a frontend's backends",
                m.packets.clone(),
            );
            r.register(
                "ferry_service_bytes",
                "Bytes sent to a frontend's backends",
                m.bytes.clone(),
            );
            r.register(
                "ferry_service_socket_translations",
                "Connects (and datagrams of unconnected UDP sockets) the socket programs sent to a frontend's backends",
                m.socket_translations.clone(),
            );
            r.register(
                "ferry_service_refused",
                "New flows and connects to a frontend refused because it had no endpoint",
                m.refused.clone(),
            );
            r.register(
                "ferry_dns_queries",
                "DNS queries by what became of them: queries (all), local (answered from the cluster's records), forwarded, cache_hits, refused, rate_limited, malformed, servfail, truncated",
                m.dns.clone(),
            );
        }
        Arc::new(m)
    }

    /// Adds the growth of a frontend's datapath counters since the last read.
    pub fn observe_stats(&self, labels: FrontendLabels, now: ServiceStats) {
        let mut seen = self.seen.lock().unwrap();
        let last = seen.entry(labels.clone()).or_default();
        let grown = now.since(*last).unwrap_or(now);
        self.packets.get_or_create(&labels).inc_by(grown.packets);
        self.bytes.get_or_create(&labels).inc_by(grown.bytes);
        self.socket_translations
            .get_or_create(&labels)
            .inc_by(grown.sockets);
        self.refused.get_or_create(&labels).inc_by(grown.refused);
        *last = now;
    }

    /// Adds the growth of the DNS server's counters since the last read.
    pub fn observe_dns(&self, now: &[(&'static str, u64)]) {
        let mut seen = self.dns_seen.lock().unwrap();
        for (name, v) in now {
            let last = seen.entry(name).or_default();
            self.dns
                .get_or_create(&DnsLabels {
                    result: name.to_string(),
                })
                .inc_by(v.saturating_sub(*last));
            *last = *v;
        }
    }

    /// Drops the series of frontends that no longer exist.
    pub fn retain_frontends(&self, keep: &dyn Fn(&FrontendLabels) -> bool) {
        let mut seen = self.seen.lock().unwrap();
        seen.retain(|l, _| {
            let k = keep(l);
            if !k {
                self.packets.remove(l);
                self.bytes.remove(l);
                self.socket_translations.remove(l);
                self.refused.remove(l);
            }
            k
        });
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry.lock().unwrap()) {
            warn!(error = %e, "encoding metrics");
        }
        out
    }
}

async fn serve(addr: SocketAddr, app: Router, what: &'static str) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the {what} endpoint on {addr} (choose another address with its flag)")
    })?;
    info!(%addr, "serving {what}");
    axum::serve(listener, app).await.context(what)
}

/// Asks the daemon to read the datapath's per-Service counters into the metrics now, and
/// answers when it has. Counters are read only when scraped: nothing is spent between scrapes.
pub type ScrapeRequest = tokio::sync::oneshot::Sender<()>;

pub fn spawn_servers(
    metrics: Arc<Metrics>,
    metrics_addr: SocketAddr,
    healthz_addr: SocketAddr,
    scrape: tokio::sync::mpsc::Sender<ScrapeRequest>,
) {
    let m = metrics.clone();
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let (m, scrape) = (m.clone(), scrape.clone());
            async move {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if scrape.send(tx).await.is_ok() {
                    // A busy daemon still gets scraped, with the counters of the last read.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), rx).await;
                }
                ([("content-type", "text/plain; version=0.0.4")], m.render())
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = serve(metrics_addr, app, "metrics").await {
            warn!("{e:#}");
        }
    });
    let m = metrics;
    let health = Router::new().route(
        "/healthz",
        get(move || {
            let m = m.clone();
            async move {
                let last = m.last_sync.load(Ordering::Relaxed);
                // `syncs` lets tools wait for a change to be applied without scraping metrics.
                let body = format!(
                    "{{\"lastUpdated\": {last}, \"currentTime\": {}, \"syncs\": {}, \"syncErrors\": {}}}",
                    unix_now(),
                    m.syncs.get(),
                    m.sync_errors.get()
                );
                let code = if last > 0 {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, [("content-type", "application/json")], body).into_response()
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = serve(healthz_addr, health, "healthz").await {
            warn!("{e:#}");
        }
    });
}
