//! The key-value store under the API server: revisions, compare-and-swap, watch, leases.
//!
//! One [`Store`] trait, two backends that pass the same conformance suite
//! ([`conformance`]): [`embedded::EmbeddedStore`] (the default: a write-ahead log with group
//! commit, durable once acknowledged) and [`etcd::EtcdStore`] (etcd v3).

pub mod embedded;
pub mod encryption;
pub mod etcd;
pub mod watch_buffer;

#[cfg(test)]
pub mod conformance;

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

/// A store revision: increases by one with every write, never goes backwards.
pub type Revision = i64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the write that created the key (its current incarnation).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Lease the key is attached to; 0 for none.
    pub lease: i64,
}

/// What must hold for a write to go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Write whatever is there.
    None,
    /// The key must not exist (create).
    Absent,
    /// The key must exist with exactly this mod revision (update, delete).
    ModRevision(Revision),
    /// The key must exist.
    Exists,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as a watcher sees it. For a delete, `kv` carries the last value and
/// `kv.mod_revision` is the revision of the delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The value before this change (puts that replaced something, deletes).
    pub prev: Option<KeyValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    /// The key exists but was changed since the revision the caller saw.
    #[error("key {key} was modified (at revision {actual}, expected {expected})")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    /// The revision asked for is older than the compacted one: relist.
    #[error("revision {requested} is compacted (oldest kept: {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    /// The revision asked for is newer than the store's.
    #[error("revision {requested} is in the future (current: {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("lease {0} not found")]
    LeaseNotFound(i64),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Clone, Debug, Default)]
pub struct ListResult {
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one returned (the limit was hit).
    pub more: bool,
    /// The revision the list was read at.
    pub revision: Revision,
}

/// A list request: keys under `prefix`, after `start_after`, at most `limit` (0: all),
/// at `revision` (0: the latest).
#[derive(Clone, Debug, Default)]
pub struct ListOptions<'a> {
    pub prefix: &'a str,
    pub start_after: Option<&'a str>,
    pub limit: usize,
    pub revision: Revision,
}

/// Watch events in revision order; an error item ends the stream (a compacted start, a
/// watcher too slow for the backlog, the backend going away).
pub type WatchStream = Pin<Box<dyn Stream<Item = StoreResult<Vec<Event>>> + Send>>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The latest revision.
    async fn current_revision(&self) -> StoreResult<Revision>;
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>>;
    async fn list(&self, opts: ListOptions<'_>) -> StoreResult<ListResult>;
    /// Writes `value` under `key` if `cond` holds; returns the new key-value and the previous.
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        cond: Precondition,
        lease: i64,
    ) -> StoreResult<(KeyValue, Option<KeyValue>)>;
    /// Deletes `key` if `cond` holds; returns the deleted key-value and the delete's revision.
    async fn delete(&self, key: &str, cond: Precondition) -> StoreResult<(KeyValue, Revision)>;
    /// Events for keys under `prefix` with revisions greater than `after`.
    async fn watch(&self, prefix: &str, after: Revision) -> StoreResult<WatchStream>;
    /// A lease that expires `ttl_secs` after its grant or last keep-alive; its keys go with it.
    async fn grant_lease(&self, ttl_secs: i64) -> StoreResult<i64>;
    async fn keep_alive(&self, lease: i64) -> StoreResult<()>;
    async fn revoke_lease(&self, lease: i64) -> StoreResult<()>;
    /// Forgets history up to `revision`: watches and lists from older revisions fail with
    /// [`StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> StoreResult<()>;
    /// The oldest revision that can still be watched from or listed at.
    async fn compacted_revision(&self) -> StoreResult<Revision>;
}

/// The end of a key range that holds every key starting with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
