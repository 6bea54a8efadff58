//! The node daemon's main loop: input changes become map writes, links get the program,
//! conntrack is collected and counters are exported.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::conntrack;
use crate::datapath::Datapath;
use crate::links::{self, Globs, LinkEvent};
use crate::metrics::{FrontendLabels, Metrics, ScrapeRequest};
use crate::model::NodeInfo;
use crate::reconcile::{Reconciler, SyncStats};
use crate::source::{Change, ServiceSource};
use crate::view::LiveView;

pub struct Config {
    pub interfaces: Globs,
    pub node_name: String,
    /// NodePort addresses; empty: every address of the node's non-pod interfaces.
    pub node_ips: Vec<Ipv4Addr>,
    pub pin_dir: PathBuf,
    pub hairpin_ip: Ipv4Addr,
    /// Forward translated packets from the program (FIB lookup + redirect).
    pub host_routing: bool,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    /// Conntrack garbage-collection period. Expired entries are already ignored by the datapath;
    /// collection only frees room, and walks the whole map, so it runs seldom.
    pub ct_gc_interval: Duration,
    /// Connect-time load balancing (the socket programs).
    pub socket_lb: bool,
    /// The cgroup v2 the socket programs serve (with every cgroup below it); default: the
    /// hierarchy's root, every process of the node.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Cluster DNS served on this node (`None`: off).
    pub dns: Option<crate::dns::DnsOptions>,
}

struct Daemon {
    datapath: Datapath,
    reconciler: Reconciler,
    metrics: Arc<Metrics>,
    node: NodeInfo,
    attached: BTreeSet<String>,
    /// The conntrack collector's memory between passes.
    collector: conntrack::Collector,
    /// Services and slices, recomputed per Service: the one cache of them.
    view: LiveView,
    /// The health check node ports of local-traffic LoadBalancers.
    health: crate::healthcheck::HealthChecks,
    /// The cluster DNS server, fed from the same changes.
    dns: Option<crate::dns::NodeDns>,
    /// The routes to other nodes' pod CIDRs last installed.
    node_routes: Option<std::collections::BTreeMap<ipnetwork::Ipv4Network, Ipv4Addr>>,
}

impl Daemon {
    /// Takes the changes into the view and writes what the changed Services need. A Service
    /// with invalid objects is reported and keeps what it had, without holding up the others;
    /// the sync then counts as failed.
    fn sync(&mut self, changes: Vec<Change>) -> Result<()> {
        let start = Instant::now();
        // After a complete list, frontends nobody names any more go too (also those a
        // previous daemon installed).
        let complete = changes.iter().any(Change::is_list);
        if let Some(dns) = &self.dns {
            dns.apply(&changes);
        }
        for c in changes {
            self.view.change(c);
        }
        let (stats, recomputed, invalid) = self.sync_view(complete)?;
        let took = start.elapsed();
        let stale = self.reconciler.take_stale_sockets();
        if !stale.is_empty() {
            // Off the loop: the walk enters every network namespace of the node.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = crate::sockets::destroy_udp(stale) {
                    warn!("destroying UDP sockets of removed backends: {e:#}");
                }
            });
        }
        let (services, slices) = (self.view.services(), self.view.slices());
        let m = &self.metrics;
        m.sync_duration.observe(took.as_secs_f64());
        m.map_writes.inc_by(stats.writes);
        m.last_sync_writes.set(stats.writes as i64);
        m.services.set(services as i64);
        m.frontends.set(self.reconciler.frontend_count() as i64);
        m.backends.set(self.reconciler.backend_count() as i64);
        let level_info = recomputed == services || stats.frontends_removed > 0;
        macro_rules! report {
            ($lvl:ident) => {
                $lvl!(
                    services,
                    slices,
                    recomputed,
                    frontends = self.reconciler.frontend_count(),
                    changed = stats.frontends_changed,
                    removed = stats.frontends_removed,
                    map_writes = stats.writes,
                    conntrack_flushed = stats.conntrack_flushed,
                    took_ms = took.as_secs_f64() * 1000.0,
                    "datapath in sync"
                )
            };
        }
        if level_info {
            report!(info);
        } else {
            report!(debug);
        }
        if invalid > 0 {
            bail!("{invalid} Service(s) not applied (errors above); the rest is in the datapath");
        }
        m.syncs.inc();
        m.last_sync
            .store(crate::metrics::unix_now(), Ordering::Relaxed);
        Ok(())
    }

    /// Writes what the view's changed Services need; returns the writes, the Services
    /// recomputed and those refused.
    fn sync_view(&mut self, complete: bool) -> Result<(SyncStats, usize, usize)> {
        let mut total = SyncStats::default();
        let (mut recomputed, mut invalid) = (0, 0);
        // A delta can free a frontend another Service waits for: at most a few rounds.
        for round in 0..4 {
            let d = self.view.delta(&self.node);
            recomputed += d.recomputed;
            for (key, check) in &d.health {
                self.health.update(key, check.clone());
            }
            for ((ns, name), e) in &d.errors {
                invalid += 1;
                error!("Service {ns}/{name} not applied, it keeps its last good state: {e}");
            }
            let stats = if complete && round == 0 {
                self.reconciler
                    .apply(&mut self.datapath.maps, &self.view.installed())?
            } else {
                match self
                    .reconciler
                    .apply_delta(&mut self.datapath.maps, &d.removed, &d.upserts)
                {
                    Ok(s) => s,
                    Err(e) => {
                        // The maps may hold part of the delta: bring them to the whole view.
                        warn!("incremental update failed ({e:#}); writing the whole view");
                        self.reconciler
                            .apply(&mut self.datapath.maps, &self.view.installed())?
                    }
                }
            };
            total.writes += stats.writes;
            total.frontends_changed += stats.frontends_changed;
            total.frontends_removed += stats.frontends_removed;
            total.conntrack_flushed += stats.conntrack_flushed;
            if !self.view.has_changes() {
                break;
            }
        }
        Ok((total, recomputed, invalid))
    }

    fn link_event(&mut self, ev: LinkEvent, globs: &Globs) {
        match ev {
            LinkEvent::Present(link)
                if globs.matches(&link.name) && !self.attached.contains(&link.name) =>
            {
                match self.datapath.attach(&link) {
                    Ok(()) => {
                        self.attached.insert(link.name);
                    }
                    // The link may be gone already, or not up yet in its namespace move.
                    Err(e) => warn!(ifname = %link.name, "attach failed: {e:#}"),
                }
            }
            LinkEvent::Gone(name) => {
                if self.attached.remove(&name) {
                    info!(ifname = %name, "interface gone");
                    self.datapath.forget_links_except(&self.attached);
                }
            }
            LinkEvent::Present(_) => {}
        }
    }

    fn collect_conntrack(&mut self) {
        let now = conntrack::monotonic_ns();
        match self.collector.pass(&mut self.datapath.maps, now) {
            Ok(s) => {
                self.metrics.conntrack_entries.set(s.connections as i64);
                self.metrics.conntrack_gc_removed.inc_by(s.removed as u64);
                debug!(
                    removed = s.removed,
                    connections = s.connections,
                    unmarked = s.unmarked,
                    "conntrack collected"
                );
            }
            Err(e) => warn!("conntrack gc: {e:#}"),
        }
    }

    fn export_stats(&mut self) {
        let mut live = std::collections::HashSet::new();
        for (rev, service, fe) in self.reconciler.frontends() {
            let labels = FrontendLabels {
                service: service.to_string(),
                frontend: fe.to_string(),
            };
            if let Ok(s) = self.datapath.maps.stats(rev) {
                self.metrics.observe_stats(labels.clone(), s);
            }
            live.insert(labels);
        }
        self.metrics.retain_frontends(&|l| live.contains(l));
        if let Some(dns) = &self.dns {
            self.metrics.observe_dns(&dns.server.stats.snapshot());
        }
    }
}

/// Attaches (or, when off, detaches) connect-time load balancing. Where the kernel or the
/// machine cannot have it, the tc programs serve every flow and a warning says why, unless a
/// cgroup was asked for explicitly.
fn socket_lb(datapath: &mut Datapath, cfg: &Config) -> Result<()> {
    if !cfg.socket_lb {
        datapath.detach_socket_lb();
        return Ok(());
    }
    let attached = match &cfg.socket_lb_cgroup {
        Some(cg) => datapath.attach_socket_lb(cg),
        None => crate::datapath::cgroup2_root().and_then(|cg| datapath.attach_socket_lb(&cg)),
    };
    match attached {
        Ok(()) => Ok(()),
        Err(e) if cfg.socket_lb_cgroup.is_some() => {
            Err(e.context("--socket-lb-cgroup: connect-time load balancing could not start"))
        }
        Err(e) => {
            warn!("connect-time load balancing is off, the tc programs serve every flow: {e:#}");
            Ok(())
        }
    }
}

pub async fn run(cfg: Config, mut source: impl ServiceSource) -> Result<()> {
    let node_ips = if cfg.node_ips.is_empty() {
        links::node_addresses(&cfg.interfaces).await?
    } else {
        cfg.node_ips.clone()
    };
    info!(node = %cfg.node_name, node_ips = ?node_ips, "starting ferry-proxy");
    let mut datapath = Datapath::load(&cfg.pin_dir, cfg.hairpin_ip, cfg.host_routing)?;
    let reconciler =
        Reconciler::recover(&mut datapath.maps).context("recovering state from pinned maps")?;
    socket_lb(&mut datapath, &cfg)?;
    let dns = match &cfg.dns {
        Some(opts) => Some(crate::dns::start(opts).await?),
        None => None,
    };
    let metrics = Metrics::new();
    metrics.frontends.set(reconciler.frontend_count() as i64);
    let (scrape_tx, mut scrape_rx) = mpsc::channel::<ScrapeRequest>(16);
    crate::metrics::spawn_servers(
        metrics.clone(),
        cfg.metrics_addr,
        cfg.healthz_addr,
        scrape_tx,
    );
    let mut d = Daemon {
        datapath,
        reconciler,
        metrics,
        node: NodeInfo {
            name: cfg.node_name.clone(),
            addresses: node_ips,
            local_dns: cfg.dns.as_ref().map(|o| o.local_dns()),
        },
        attached: BTreeSet::new(),
        collector: conntrack::Collector::default(),
        view: LiveView::default(),
        node_routes: None,
        dns,
        health: Default::default(),
    };

    // Attach to the links present now before the first sync, so "healthy" means "in the path".
    for link in links::list_links().await? {
        d.link_event(LinkEvent::Present(link), &cfg.interfaces);
    }
    // Pins of links that vanished while no daemon ran would keep dead links alive.
    d.datapath.forget_links_except(&d.attached);
    let (tx, mut link_rx) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        if let Err(e) = links::watch(tx).await {
            error!("link watcher: {e:#}");
        }
    });
    let mut gc = tokio::time::interval(cfg.ct_gc_interval);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            update = source.next() => {
                let nodes = match update {
                    Ok(u) => {
                        if let Err(e) = d.sync(u.changes) {
                            d.metrics.sync_errors.inc();
                            error!("{e:#}");
                        }
                        u.nodes
                    }
                    Err(e) => {
                        d.metrics.sync_errors.inc();
                        error!("input rejected, the datapath keeps its last good state: {e:#}");
                        None
                    }
                };
                if let Some(nodes) = nodes {
                    if let Some(dns) = &d.dns {
                        dns.allow_nodes(&nodes);
                    }
                    let want = crate::routes::desired(&nodes, &d.node.name);
                    if d.node_routes.as_ref() != Some(&want) {
                        match crate::routes::sync(&want).await {
                            Ok(_) => d.node_routes = Some(want),
                            Err(e) => error!("routes to other nodes' pods: {e:#}"),
                        }
                    }
                }
            }
            Some(ev) = link_rx.recv() => d.link_event(ev, &cfg.interfaces),
            _ = gc.tick() => d.collect_conntrack(),
            Some(done) = scrape_rx.recv() => {
                d.export_stats();
                let _ = done.send(());
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    watcher.abort();
    info!("stopping; programs and maps stay pinned so traffic keeps flowing (use --cleanup to remove them)");
    Ok(())
}
