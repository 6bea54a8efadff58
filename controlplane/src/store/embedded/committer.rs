//! The committer thread: takes every request waiting, checks each against the state (and the
//! writes before it in the batch), appends the batch to the log, syncs once, then applies it,
//! publishes the events and answers.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use anyhow::anyhow;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::store::{Event, KeyValue, Precondition, Revision, StoreError, StoreResult};

use super::codec::Record;
use super::snapshot::write_snapshot;
use super::state::State;
use super::{MAX_BATCH, WAL_SNAPSHOT_BYTES};

pub(super) enum Op {
    Put {
        key: String,
        value: Bytes,
        cond: Precondition,
        lease: i64,
    },
    Delete {
        key: String,
        cond: Precondition,
    },
    Grant {
        ttl: i64,
    },
    Revoke {
        id: i64,
    },
    Compact {
        revision: Revision,
    },
}

pub(super) enum Reply {
    Put(KeyValue, Option<KeyValue>),
    Delete(KeyValue, Revision),
    Lease(i64),
    Done,
}

pub(super) struct Request {
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<StoreResult<Reply>>,
}

pub(super) struct Committer {
    pub(super) state: Arc<RwLock<State>>,
    pub(super) events: broadcast::Sender<Arc<Vec<Event>>>,
    pub(super) dir: PathBuf,
    pub(super) wal: File,
    pub(super) wal_len: u64,
}

pub(super) fn check(
    key: &str,
    cond: Precondition,
    current: Option<&KeyValue>,
) -> Result<(), StoreError> {
    match (cond, current) {
        (Precondition::None, _) => Ok(()),
        (Precondition::Absent, None) => Ok(()),
        (Precondition::Absent, Some(_)) => Err(StoreError::AlreadyExists(key.into())),
        (Precondition::Exists | Precondition::ModRevision(_), None) => {
            Err(StoreError::NotFound(key.into()))
        }
        (Precondition::Exists, Some(_)) => Ok(()),
        (Precondition::ModRevision(r), Some(kv)) if kv.mod_revision == r => Ok(()),
        (Precondition::ModRevision(r), Some(kv)) => Err(StoreError::Conflict {
            key: key.into(),
            expected: r,
            actual: kv.mod_revision,
        }),
    }
}

impl Committer {
    pub(super) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
        debug!("store committer stopped");
    }

    pub(super) fn commit(&mut self, batch: Vec<Request>) {
        // Decide every request against the state plus this batch's earlier writes.
        let mut records: Vec<Record> = Vec::new();
        let mut results: Vec<(oneshot::Sender<StoreResult<Reply>>, StoreResult<Reply>)> =
            Vec::with_capacity(batch.len());
        {
            let st = self.state.read().unwrap();
            let mut overlay: HashMap<String, Option<KeyValue>> = HashMap::new();
            let mut rev = st.revision;
            let mut next_lease = st.next_lease.max(1);
            let mut leases_gone: HashSet<i64> = HashSet::new();
            let mut leases_new: HashSet<i64> = HashSet::new();
            let lookup =
                |overlay: &HashMap<String, Option<KeyValue>>, key: &str| match overlay.get(key) {
                    Some(v) => v.clone(),
                    None => st.latest(key).cloned(),
                };
            for req in batch {
                let res = match req.op {
                    Op::Put {
                        key,
                        value,
                        cond,
                        lease,
                    } => {
                        let cur = lookup(&overlay, &key);
                        let lease_ok = lease == 0
                            || leases_new.contains(&lease)
                            || (st.leases.contains_key(&lease) && !leases_gone.contains(&lease));
                        match check(&key, cond, cur.as_ref()) {
                            Err(e) => Err(e),
                            Ok(()) if !lease_ok => Err(StoreError::LeaseNotFound(lease)),
                            Ok(()) => {
                                rev += 1;
                                let kv = KeyValue {
                                    key: key.clone(),
                                    value,
                                    create_revision: cur
                                        .as_ref()
                                        .map_or(rev, |c| c.create_revision),
                                    mod_revision: rev,
                                    lease,
                                };
                                records.push(Record::Put { kv: kv.clone() });
                                overlay.insert(key, Some(kv.clone()));
                                Ok(Reply::Put(kv, cur))
                            }
                        }
                    }
                    Op::Delete { key, cond } => {
                        let cur = lookup(&overlay, &key);
                        match check(&key, cond, cur.as_ref()) {
                            Err(e) => Err(e),
                            Ok(()) => match cur {
                                None => Err(StoreError::NotFound(key)),
                                Some(kv) => {
                                    rev += 1;
                                    records.push(Record::Delete {
                                        key: key.clone(),
                                        revision: rev,
                                    });
                                    overlay.insert(key, None);
                                    Ok(Reply::Delete(kv, rev))
                                }
                            },
                        }
                    }
                    Op::Grant { ttl } => {
                        let id = next_lease;
                        next_lease += 1;
                        leases_new.insert(id);
                        records.push(Record::LeaseGrant { id, ttl });
                        Ok(Reply::Lease(id))
                    }
                    Op::Revoke { id } => {
                        if !st.leases.contains_key(&id) && !leases_new.contains(&id)
                            || leases_gone.contains(&id)
                        {
                            Err(StoreError::LeaseNotFound(id))
                        } else {
                            let mut keys: Vec<String> = st
                                .leases
                                .get(&id)
                                .map(|l| l.keys.iter().cloned().collect())
                                .unwrap_or_default();
                            // Keys attached earlier in this batch.
                            keys.extend(
                                overlay
                                    .iter()
                                    .filter(|(_, v)| v.as_ref().is_some_and(|kv| kv.lease == id))
                                    .map(|(k, _)| k.clone()),
                            );
                            keys.sort();
                            keys.dedup();
                            for key in keys {
                                let still = lookup(&overlay, &key).is_some_and(|kv| kv.lease == id);
                                if still {
                                    rev += 1;
                                    records.push(Record::Delete {
                                        key: key.clone(),
                                        revision: rev,
                                    });
                                    overlay.insert(key, None);
                                }
                            }
                            leases_gone.insert(id);
                            records.push(Record::LeaseRevoke { id });
                            Ok(Reply::Done)
                        }
                    }
                    Op::Compact { revision } => {
                        if revision > rev {
                            Err(StoreError::FutureRevision {
                                requested: revision,
                                current: rev,
                            })
                        } else {
                            if revision > st.compacted {
                                records.push(Record::Compact { revision });
                            }
                            Ok(Reply::Done)
                        }
                    }
                };
                results.push((req.reply, res));
            }
        }

        if !records.is_empty() {
            let mut buf = Vec::with_capacity(records.len() * 128);
            for r in &records {
                r.encode(&mut buf);
            }
            if let Err(e) = self.wal.write_all(&buf).and_then(|_| self.wal.sync_data()) {
                // Not durable: tell everyone, apply nothing, and cut the log back.
                warn!(error = %e, "write-ahead log write failed");
                let _ = self.wal.set_len(self.wal_len);
                for (tx, _) in results {
                    let _ = tx.send(Err(StoreError::Other(anyhow!("store write failed: {e}"))));
                }
                return;
            }
            self.wal_len += buf.len() as u64;
            let now = Instant::now();
            let mut st = self.state.write().unwrap();
            let mut events = Vec::new();
            for r in &records {
                if let Some(ev) = st.apply(r, now) {
                    events.push(ev);
                }
            }
            if !events.is_empty() {
                // Sent under the write lock so a new watcher gets each event exactly once:
                // from its backlog or from the channel.
                let _ = self.events.send(Arc::new(events));
            }
        }
        for (tx, res) in results {
            let _ = tx.send(res);
        }
        if self.wal_len >= WAL_SNAPSHOT_BYTES {
            if let Err(e) = self.snapshot() {
                warn!(error = %format!("{e:#}"), "snapshot failed; the log keeps growing");
            }
        }
    }

    pub(super) fn snapshot(&mut self) -> anyhow::Result<()> {
        let records = self.state.read().unwrap().snapshot_records();
        write_snapshot(&self.dir.join("snapshot"), &records)?;
        self.wal.set_len(0)?;
        self.wal.sync_all()?;
        self.wal_len = 0;
        info!(
            records = records.len(),
            "store snapshot written, log emptied"
        );
        Ok(())
    }
}
