//! Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it, so
//! that two controller managers (or schedulers) can run and only one acts.
//!
//! A candidate takes the lease when it is free or when its holder has not renewed it for
//! `lease_duration`, measured on the candidate's own clock from when it last saw the record
//! change (so clocks of different machines never have to agree). The leader renews every
//! `retry_period`; if it cannot renew for `renew_deadline` it stops acting: the process exits,
//! as Kubernetes' components do, and its supervisor starts it again as a candidate. Every write is a
//! compare-and-swap on the lease's resourceVersion, so two candidates never both win.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Config {
    /// Kubernetes' defaults (15 s lease, 10 s renew deadline, 2 s retry) for the lease
    /// `kube-system/<name>`, with a fresh identity for this process.
    pub fn new(name: &str) -> Config {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        Config {
            namespace: "kube-system".into(),
            name: name.into(),
            identity: format!("{host}_{}", uuid::Uuid::new_v4()),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    pub fn with_lease_duration(mut self, d: Duration) -> Config {
        self.lease_duration = d;
        self.renew_deadline = d * 2 / 3;
        self.retry_period = (d / 7).max(Duration::from_millis(200));
        self
    }
}

struct Elector {
    api: Api<Lease>,
    cfg: Config,
    /// The holder and renew time last seen, and when (on our clock) they last changed.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

impl Elector {
    /// One attempt to take or renew the lease; true when we hold it afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::chrono::Utc::now());
        let secs = self.cfg.lease_duration.as_secs().max(1) as i32;
        let current = match self.api.get_opt(&self.cfg.name).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.cfg.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1));
        if changed {
            self.observed = Some((record.0, record.1, Instant::now()));
        }
        let observed_at = self
            .observed
            .as_ref()
            .map(|o| o.2)
            .unwrap_or_else(Instant::now);
        let mine = holder.as_deref() == Some(self.cfg.identity.as_str());
        let their_duration =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(secs).max(1) as u64);
        if holder.is_some() && !mine && observed_at.elapsed() < their_duration {
            return Ok(false);
        }
        let mut lease = current;
        let s = lease.spec.get_or_insert_with(Default::default);
        if !mine {
            s.acquire_time = Some(now.clone());
            s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + holder.is_some() as i32);
        }
        s.holder_identity = Some(self.cfg.identity.clone());
        s.lease_duration_seconds = Some(secs);
        s.renew_time = Some(now);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Waits until this process leads, then runs `work` for as long as it keeps the lease.
/// Returns `work`'s result, or an error when leadership is lost.
pub async fn run_as_leader<F>(client: Client, cfg: Config, work: F) -> Result<()>
where
    F: Future<Output = Result<()>>,
{
    let mut e = Elector {
        api: Api::namespaced(client, &cfg.namespace),
        cfg: cfg.clone(),
        observed: None,
    };
    info!(lease = %format!("{}/{}", cfg.namespace, cfg.name), identity = %cfg.identity, "waiting to lead");
    loop {
        match e.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(err) => warn!(error = %err, "leader election: reading the lease"),
        }
        tokio::time::sleep(cfg.retry_period).await;
    }
    info!(lease = %format!("{}/{}", cfg.namespace, cfg.name), identity = %cfg.identity, "leading");
    let renew = async {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(cfg.retry_period).await;
            match e.try_acquire_or_renew().await {
                Ok(true) => last = Instant::now(),
                Ok(false) => bail!(
                    "lost the lease {}/{} to another candidate",
                    cfg.namespace,
                    cfg.name
                ),
                Err(err) => warn!(error = %err, "leader election: renewing the lease"),
            }
            if last.elapsed() > cfg.renew_deadline {
                bail!(
                    "could not renew the lease {}/{} within {:?}",
                    cfg.namespace,
                    cfg.name,
                    cfg.renew_deadline
                );
            }
        }
    };
    tokio::select! {
        r = work => r,
        r = renew => r,
    }
}
