//! The embedded store: every key's versions in memory, a write-ahead log on disk.
//!
//! Writers hand their requests to one committer thread. It takes every request waiting,
//! checks each against the current state (plus the writes earlier in the same batch), appends
//! the batch to the log, syncs it once (group commit), and only then applies it to memory,
//! publishes the events and answers: nobody sees or is told of a write that is not on disk.
//!
//! On disk, `DIR/snapshot` holds the state at some point and `DIR/wal` every record after it.
//! Both are sequences of framed records (length, CRC-32, payload). Start-up reads the snapshot,
//! replays the log and cuts off a torn tail (a record the crash interrupted was never
//! acknowledged). When the log grows past a limit the committer writes a new snapshot and
//! empties the log.
//!
//! Files: `codec` (records and their framing), `state` (the versioned state in memory),
//! `snapshot` (recovery, snapshots, the directory lock), `committer` (the writer thread); this
//! file is the store itself: reads, watches and the requests it hands the committer.

mod codec;
mod committer;
mod snapshot;
mod state;

use std::fs::File;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info};

use super::watch_buffer::spawn_fed;
use super::{
    Event, KeyValue, ListOptions, ListResult, Precondition, Revision, Store, StoreError,
    StoreResult, WatchStream,
};

pub use snapshot::{snapshot_restore, snapshot_save};

use committer::{Committer, Op, Reply, Request};
use snapshot::{lock_dir, recover};
use state::State;

/// A snapshot is written and the log emptied when the log reaches this size.
const WAL_SNAPSHOT_BYTES: u64 = 64 << 20;
/// Largest number of requests committed with one sync.
const MAX_BATCH: usize = 4096;
/// Batches of events a watcher may fall behind before its watch ends (it then re-watches).
const WATCH_BACKLOG: usize = 8192;

pub struct EmbeddedStore {
    state: Arc<RwLock<State>>,
    tx: mpsc::UnboundedSender<Request>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    _lock: File,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, recovering what the last process left.
    pub fn open(dir: &Path) -> anyhow::Result<Arc<Self>> {
        crate::files::private_dir(dir)
            .with_context(|| format!("preparing the data directory {}", dir.display()))?;
        let lock = lock_dir(dir)?;
        let (st, good) = recover(dir)?;
        info!(
            dir = %dir.display(),
            revision = st.revision,
            keys = st.keys.len(),
            "embedded store recovered"
        );
        let wal_path = dir.join("wal");
        let mut o = crate::files::private_options();
        o.create(true).append(true);
        let wal = crate::files::open_private(&wal_path, &o)?;
        if let Ok(snap) = File::open(dir.join("snapshot")) {
            use std::os::unix::fs::PermissionsExt;
            snap.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        // Cut off a torn tail so new records follow the last good one.
        wal.set_len(good)?;
        wal.sync_all()?;
        let state = Arc::new(RwLock::new(st));
        let (events, _) = broadcast::channel(WATCH_BACKLOG);
        let (tx, rx) = mpsc::unbounded_channel();
        let committer = Committer {
            state: state.clone(),
            events: events.clone(),
            dir: dir.to_path_buf(),
            wal,
            wal_len: good,
        };
        std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || committer.run(rx))?;
        let store = Arc::new(EmbeddedStore {
            state,
            tx,
            events,
            _lock: lock,
        });
        // Leases expire here: each expiry is a revoke through the committer.
        let weak = Arc::downgrade(&store);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(store) = weak.upgrade() else { break };
                let expired: Vec<i64> = {
                    let st = store.state.read().unwrap();
                    let now = Instant::now();
                    st.leases
                        .iter()
                        .filter(|(_, l)| l.expires <= now)
                        .map(|(id, _)| *id)
                        .collect()
                };
                for id in expired {
                    debug!(lease = id, "lease expired");
                    let _ = store.submit(Op::Revoke { id }).await;
                }
            }
        });
        Ok(store)
    }

    async fn submit(&self, op: Op) -> StoreResult<Reply> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { op, reply })
            .map_err(|_| StoreError::Other(anyhow!("store is closed")))?;
        rx.await
            .map_err(|_| StoreError::Other(anyhow!("store committer stopped")))?
    }
}

fn in_prefix(key: &str, prefix: &str) -> bool {
    key.starts_with(prefix)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn current_revision(&self) -> StoreResult<Revision> {
        Ok(self.state.read().unwrap().revision)
    }

    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        Ok(self.state.read().unwrap().latest(key).cloned())
    }

    async fn list(&self, opts: ListOptions<'_>) -> StoreResult<ListResult> {
        let st = self.state.read().unwrap();
        let revision = if opts.revision == 0 {
            st.revision
        } else {
            opts.revision
        };
        if revision < st.compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted: st.compacted,
            });
        }
        if revision > st.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: st.revision,
            });
        }
        let start = match opts.start_after {
            Some(s) if s >= opts.prefix => Bound::Excluded(s.to_string()),
            _ => Bound::Included(opts.prefix.to_string()),
        };
        let mut kvs = Vec::new();
        let mut more = false;
        for (key, _) in st.keys.range((start, Bound::Unbounded)) {
            if !in_prefix(key, opts.prefix) {
                break;
            }
            if let Some(kv) = st.at(key, revision) {
                if opts.limit > 0 && kvs.len() == opts.limit {
                    more = true;
                    break;
                }
                kvs.push(kv.clone());
            }
        }
        Ok(ListResult {
            kvs,
            more,
            revision,
        })
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        cond: Precondition,
        lease: i64,
    ) -> StoreResult<(KeyValue, Option<KeyValue>)> {
        match self
            .submit(Op::Put {
                key: key.into(),
                value,
                cond,
                lease,
            })
            .await?
        {
            Reply::Put(kv, prev) => Ok((kv, prev)),
            _ => unreachable!("put answered with another reply"),
        }
    }

    async fn delete(&self, key: &str, cond: Precondition) -> StoreResult<(KeyValue, Revision)> {
        match self
            .submit(Op::Delete {
                key: key.into(),
                cond,
            })
            .await?
        {
            Reply::Delete(kv, rev) => Ok((kv, rev)),
            _ => unreachable!("delete answered with another reply"),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> StoreResult<WatchStream> {
        let (backlog, mut rx) = {
            let st = self.state.read().unwrap();
            if after < st.compacted {
                return Err(StoreError::Compacted {
                    requested: after,
                    compacted: st.compacted,
                });
            }
            let from = st.events.partition_point(|e| e.kv.mod_revision <= after);
            let backlog: Vec<Event> = st
                .events
                .range(from..)
                .filter(|e| in_prefix(&e.kv.key, prefix))
                .cloned()
                .collect();
            (backlog, self.events.subscribe())
        };
        let prefix = prefix.to_string();
        let stream = spawn_fed(move |tx| async move {
            let mut last = after;
            if !backlog.is_empty() {
                last = backlog.last().unwrap().kv.mod_revision;
                if tx.send(Ok(backlog)).is_err() {
                    return;
                }
            }
            loop {
                match rx.recv().await {
                    Ok(batch) => {
                        let evs: Vec<Event> = batch
                            .iter()
                            .filter(|e| e.kv.mod_revision > last && in_prefix(&e.kv.key, &prefix))
                            .cloned()
                            .collect();
                        if let Some(e) = evs.last() {
                            last = e.kv.mod_revision;
                            if tx.send(Ok(evs)).is_err() {
                                return;
                            }
                        } else if tx.is_gone() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx.send(Err(StoreError::Other(anyhow!(
                            "watcher fell {n} batches behind; watch again from revision {last}"
                        ))));
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(stream)
    }

    async fn grant_lease(&self, ttl_secs: i64) -> StoreResult<i64> {
        match self
            .submit(Op::Grant {
                ttl: ttl_secs.max(1),
            })
            .await?
        {
            Reply::Lease(id) => Ok(id),
            _ => unreachable!("grant answered with another reply"),
        }
    }

    async fn keep_alive(&self, lease: i64) -> StoreResult<()> {
        let mut st = self.state.write().unwrap();
        let l = st
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        l.expires = Instant::now() + Duration::from_secs(l.ttl as u64);
        Ok(())
    }

    async fn revoke_lease(&self, lease: i64) -> StoreResult<()> {
        self.submit(Op::Revoke { id: lease }).await.map(|_| ())
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        self.submit(Op::Compact { revision }).await.map(|_| ())
    }

    async fn compacted_revision(&self) -> StoreResult<Revision> {
        Ok(self.state.read().unwrap().compacted)
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        crate::store::conformance::run(s, "/conf").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopened_store_has_every_acknowledged_write_and_snapshots_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let last;
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            for i in 0..100 {
                s.put(
                    &format!("/k/{i:03}"),
                    Bytes::from(vec![i as u8; 10]),
                    Precondition::None,
                    0,
                )
                .await
                .unwrap();
            }
            s.delete("/k/050", Precondition::None).await.unwrap();
            last = s.current_revision().await.unwrap();
            // A second open of a directory in use is refused.
            assert!(EmbeddedStore::open(dir.path()).is_err());
        }
        // The committer thread holds the lock until it notices the store is gone.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let saved = dir.path().join("backup.snap");
        assert_eq!(snapshot_save(dir.path(), &saved).unwrap(), last);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.current_revision().await.unwrap(), last);
        let l = s
            .list(ListOptions {
                prefix: "/k/",
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(l.kvs.len(), 99);
        drop(s);
        let restored = dir.path().join("restored");
        assert_eq!(snapshot_restore(&saved, &restored, false).unwrap(), last);
        assert!(
            snapshot_restore(&saved, &restored, false).is_err(),
            "refuses a used dir"
        );
        let r = EmbeddedStore::open(&restored).unwrap();
        assert_eq!(r.current_revision().await.unwrap(), last);
        assert!(r.get("/k/050").await.unwrap().is_none());
        assert_eq!(
            r.get("/k/007").await.unwrap().unwrap().value,
            Bytes::from(vec![7u8; 10])
        );
        // Writes after a restore continue the revisions.
        let (kv, _) = r
            .put("/k/new", Bytes::new(), Precondition::None, 0)
            .await
            .unwrap();
        assert_eq!(kv.mod_revision, last + 1);
    }
}
