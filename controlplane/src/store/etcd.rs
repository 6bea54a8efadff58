//! The etcd v3 backend (`--etcd-servers`): the same [`Store`] contract over etcd's KV, watch
//! and lease APIs. Compare-and-swap is an etcd transaction on the key's mod revision.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use futures::StreamExt;

use super::watch_buffer::spawn_fed;
use super::{
    prefix_end, Event, EventKind, KeyValue, ListOptions, ListResult, Precondition, Revision, Store,
    StoreError, StoreResult, WatchStream,
};

pub struct EtcdStore {
    client: Client,
    /// The newest compaction this process made or was told of.
    compacted: AtomicI64,
}

impl EtcdStore {
    pub async fn connect(endpoints: &[String]) -> anyhow::Result<Arc<Self>> {
        let client = Client::connect(endpoints, None)
            .await
            .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
        let store = EtcdStore {
            client,
            compacted: AtomicI64::new(0),
        };
        // Fail now, not at the first request, when nothing answers.
        store
            .current_revision()
            .await
            .with_context(|| format!("etcd at {} does not answer", endpoints.join(",")))?;
        Ok(Arc::new(store))
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        revision: Revision,
    ) -> StoreResult<ListResult> {
        let start = match start_after {
            Some(s) if s >= prefix => {
                let mut k = s.as_bytes().to_vec();
                k.push(0);
                k
            }
            _ => prefix.as_bytes().to_vec(),
        };
        let mut o = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_limit(limit as i64);
        if revision > 0 {
            o = o.with_revision(revision);
        }
        let resp = self
            .client
            .kv_client()
            .get(start, Some(o))
            .await
            .map_err(|e| match self.map_err(e) {
                StoreError::Compacted { compacted, .. } => StoreError::Compacted {
                    requested: revision,
                    compacted,
                },
                StoreError::FutureRevision { .. } => StoreError::FutureRevision {
                    requested: revision,
                    current: 0,
                },
                e => e,
            })?;
        let kvs = resp.kvs().iter().map(kv_of).collect::<StoreResult<_>>()?;
        Ok(ListResult {
            kvs,
            more: resp.more(),
            revision: if revision > 0 {
                revision
            } else {
                resp.header().map_or(0, |h| h.revision())
            },
        })
    }

    fn map_err(&self, e: etcd_client::Error) -> StoreError {
        let msg = e.to_string();
        if msg.contains("required revision has been compacted") {
            StoreError::Compacted {
                requested: 0,
                compacted: self.compacted.load(Ordering::Relaxed),
            }
        } else if msg.contains("required revision is a future revision") {
            StoreError::FutureRevision {
                requested: 0,
                current: 0,
            }
        } else if msg.contains("requested lease not found") {
            StoreError::LeaseNotFound(0)
        } else {
            StoreError::Other(anyhow!("etcd: {msg}"))
        }
    }
}

fn kv_of(kv: &etcd_client::KeyValue) -> StoreResult<KeyValue> {
    Ok(KeyValue {
        key: kv
            .key_str()
            .map_err(|e| StoreError::Other(anyhow!("etcd key is not UTF-8: {e}")))?
            .to_string(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    })
}

fn compare(key: &str, cond: Precondition) -> Vec<Compare> {
    match cond {
        Precondition::None => vec![],
        Precondition::Absent => vec![Compare::create_revision(key, CompareOp::Equal, 0)],
        Precondition::Exists => vec![Compare::create_revision(key, CompareOp::Greater, 0)],
        Precondition::ModRevision(r) => vec![Compare::mod_revision(key, CompareOp::Equal, r)],
    }
}

/// Why a transaction's compare failed, from the key's current value.
fn failed(key: &str, cond: Precondition, current: Option<KeyValue>) -> StoreError {
    match (cond, current) {
        (Precondition::Absent, _) => StoreError::AlreadyExists(key.into()),
        (Precondition::ModRevision(r), Some(kv)) => StoreError::Conflict {
            key: key.into(),
            expected: r,
            actual: kv.mod_revision,
        },
        _ => StoreError::NotFound(key.into()),
    }
}

fn current_of(resp: &etcd_client::TxnResponse) -> StoreResult<Option<KeyValue>> {
    for r in resp.op_responses() {
        if let TxnOpResponse::Get(g) = r {
            return g.kvs().first().map(kv_of).transpose();
        }
    }
    Ok(None)
}

#[async_trait]
impl Store for EtcdStore {
    async fn current_revision(&self) -> StoreResult<Revision> {
        let resp = self
            .client
            .kv_client()
            .get("/", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| self.map_err(e))?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(|e| self.map_err(e))?;
        resp.kvs().first().map(kv_of).transpose()
    }

    async fn list(&self, opts: ListOptions<'_>) -> StoreResult<ListResult> {
        // Large ranges are read in pages at one revision (as Kubernetes reads etcd), so no
        // response outgrows the gRPC message limit.
        const PAGE: usize = 500;
        let mut out = ListResult {
            revision: opts.revision,
            ..Default::default()
        };
        let mut after: Option<String> = opts.start_after.map(String::from);
        loop {
            let want = if opts.limit > 0 {
                (opts.limit - out.kvs.len()).min(PAGE)
            } else {
                PAGE
            };
            let page = self
                .list_page(opts.prefix, after.as_deref(), want, out.revision)
                .await?;
            out.revision = page.revision;
            out.more = page.more;
            after = page.kvs.last().map(|kv| kv.key.clone());
            out.kvs.extend(page.kvs);
            let full = opts.limit > 0 && out.kvs.len() >= opts.limit;
            if !page.more || full || after.is_none() {
                return Ok(out);
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        cond: Precondition,
        lease: i64,
    ) -> StoreResult<(KeyValue, Option<KeyValue>)> {
        let mut po = PutOptions::new().with_prev_key();
        if lease != 0 {
            po = po.with_lease(lease);
        }
        let txn = Txn::new()
            .when(compare(key, cond))
            .and_then(vec![
                TxnOp::put(key, value.to_vec(), Some(po)),
                TxnOp::get(key, None),
            ])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| match self.map_err(e) {
                StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease),
                e => e,
            })?;
        if !resp.succeeded() {
            return Err(failed(key, cond, current_of(&resp)?));
        }
        let mut prev = None;
        for r in resp.op_responses() {
            if let TxnOpResponse::Put(p) = r {
                prev = p.prev_key().map(kv_of).transpose()?;
            }
        }
        let kv = current_of(&resp)?
            .ok_or_else(|| StoreError::Other(anyhow!("etcd: {key} missing right after put")))?;
        Ok((kv, prev))
    }

    async fn delete(&self, key: &str, cond: Precondition) -> StoreResult<(KeyValue, Revision)> {
        let txn = Txn::new()
            .when(compare(key, cond))
            .and_then(vec![TxnOp::delete(
                key,
                Some(etcd_client::DeleteOptions::new().with_prev_key()),
            )])
            .or_else(vec![TxnOp::get(key, None)]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| self.map_err(e))?;
        if !resp.succeeded() {
            return Err(failed(key, cond, current_of(&resp)?));
        }
        let rev = resp.header().map_or(0, |h| h.revision());
        for r in resp.op_responses() {
            if let TxnOpResponse::Delete(d) = r {
                if let Some(kv) = d.prev_kvs().first() {
                    return Ok((kv_of(kv)?, rev));
                }
            }
        }
        Err(StoreError::NotFound(key.into()))
    }

    async fn grant_lease(&self, ttl_secs: i64) -> StoreResult<i64> {
        let resp = self
            .client
            .lease_client()
            .grant(ttl_secs.max(1), None)
            .await
            .map_err(|e| self.map_err(e))?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: i64) -> StoreResult<()> {
        let (mut keeper, mut stream) = self
            .client
            .lease_client()
            .keep_alive(lease)
            .await
            .map_err(|e| self.map_err(e))?;
        keeper.keep_alive().await.map_err(|e| self.map_err(e))?;
        match stream.message().await.map_err(|e| self.map_err(e))? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: i64) -> StoreResult<()> {
        self.client
            .lease_client()
            .revoke(lease)
            .await
            .map_err(|e| match self.map_err(e) {
                StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease),
                e => e,
            })?;
        Ok(())
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        if revision <= self.compacted.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.client.kv_client().compact(revision, None).await {
            Ok(_) => {}
            Err(e) => match self.map_err(e) {
                // Someone compacted further already: that is fine.
                StoreError::Compacted { .. } => {}
                e => return Err(e),
            },
        }
        self.compacted.fetch_max(revision, Ordering::Relaxed);
        Ok(())
    }

    async fn compacted_revision(&self) -> StoreResult<Revision> {
        Ok(self.compacted.load(Ordering::Relaxed))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> StoreResult<WatchStream> {
        // etcd reports a compacted start as a canceled watch; ask first, so callers get the
        // same error as from the embedded store (a compaction racing this check ends the
        // stream with the same error instead). Watching from a future revision is allowed.
        if after > 0 {
            if let Err(e) = self
                .client
                .kv_client()
                .get(
                    prefix,
                    Some(GetOptions::new().with_count_only().with_revision(after)),
                )
                .await
            {
                match self.map_err(e) {
                    StoreError::Compacted { compacted, .. } => {
                        return Err(StoreError::Compacted {
                            requested: after,
                            compacted,
                        })
                    }
                    StoreError::FutureRevision { .. } => {}
                    e => return Err(e),
                }
            }
        }
        let opts = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(after + 1)
            .with_prev_key();
        let (watcher, stream) = self
            .client
            .watch_client()
            .watch(prefix, Some(opts))
            .await
            .map_err(|e| self.map_err(e))?;
        Ok(watch_stream(after, watcher, stream))
    }
}

fn watch_stream(
    after: Revision,
    watcher: etcd_client::Watcher,
    mut stream: etcd_client::WatchStream,
) -> WatchStream {
    let convert = |resp: &etcd_client::WatchResponse| -> StoreResult<Vec<Event>> {
        resp.events()
            .iter()
            .filter_map(|e| {
                let kv = e.kv()?;
                Some((
                    e.event_type(),
                    kv_of(kv),
                    e.prev_kv().map(kv_of).transpose(),
                ))
            })
            .map(|(t, kv, prev)| {
                let kv = kv?;
                let prev = prev?;
                Ok(match t {
                    EventType::Put => Event {
                        kind: EventKind::Put,
                        kv,
                        prev,
                    },
                    EventType::Delete => {
                        let mut last = prev.clone().unwrap_or(kv.clone());
                        last.mod_revision = kv.mod_revision;
                        Event {
                            kind: EventKind::Delete,
                            kv: last,
                            prev,
                        }
                    }
                })
            })
            .collect()
    };
    spawn_fed(move |tx| async move {
        let _watcher = watcher;
        while let Some(item) = stream.next().await {
            let out = match item {
                Ok(resp) if resp.canceled() || resp.compact_revision() > 0 => {
                    Err(StoreError::Compacted {
                        requested: after,
                        compacted: resp.compact_revision(),
                    })
                }
                Ok(resp) => convert(&resp),
                Err(e) => Err(StoreError::Other(anyhow!("etcd watch: {e}"))),
            };
            let end = out.is_err();
            if matches!(&out, Ok(v) if v.is_empty()) {
                continue;
            }
            if tx.send(out).is_err() || end {
                return;
            }
        }
    })
}

/// An etcd server of this machine's `etcd` binary, run for tests and benchmarks in its own
/// data directory on loopback ports; killed (and its directory removed) when dropped.
pub struct LocalEtcd {
    child: std::process::Child,
    dir: std::path::PathBuf,
    pub endpoint: String,
}

impl LocalEtcd {
    /// Starts etcd with its data under `dir`, serving clients on `client_port` (the peer
    /// port is the next one), and waits until it reports healthy.
    pub fn start(dir: &std::path::Path, client_port: u16) -> anyhow::Result<Self> {
        let bin = which_etcd()?;
        if std::net::TcpStream::connect(("127.0.0.1", client_port)).is_ok() {
            anyhow::bail!(
                "port {client_port} is in use (an etcd left running?); stop it or pick another port"
            );
        }
        std::fs::create_dir_all(dir)?;
        let endpoint = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{}", client_port + 1);
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let mut cmd = std::process::Command::new(bin);
        // The server goes when the process that started it goes, even when it is killed.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .args(["--data-dir", &dir.join("data").to_string_lossy()])
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(["--quota-backend-bytes", "4294967296"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        let me = LocalEtcd {
            child,
            dir: dir.to_path_buf(),
            endpoint,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !healthy(client_port) {
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "etcd did not become healthy on {} within 20 s; see {}",
                    me.endpoint,
                    me.dir.join("etcd.log").display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(me)
    }
}

/// etcd's /health answers `"health":"true"` once it has a leader.
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which_etcd() -> anyhow::Result<std::path::PathBuf> {
    for d in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(d).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    anyhow::bail!("no etcd binary on PATH: install Debian's etcd-server (`cargo xtask setup` does)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = LocalEtcd::start(&dir.path().join("etcd"), 23790).unwrap();
        let s = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint))
            .await
            .unwrap();
        crate::store::conformance::run(s, "/conf").await;
    }
}
