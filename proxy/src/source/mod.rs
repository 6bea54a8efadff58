//! Where Services and EndpointSlices come from. The daemon sees them only through
//! `ServiceSource`: a YAML file (`file::FileSource`) or the Kubernetes API (`api::ApiSource`).
//!
//! Both sources hand over the same thing, object by object: what changed since the last
//! update (`Change`), plus the complete lists after a (re)list or a file's first read. Neither
//! keeps a copy of the objects: the daemon's `view::LiveView` is the one cache of them.

use std::future::Future;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub mod api;
pub mod file;
mod yaml;

pub use api::ApiSource;
pub use file::FileSource;

/// (namespace, name)
pub type Key = (String, String);

/// The key of a namespaced object (`default` when the namespace is left out).
pub fn key_of(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One object that changed, or a complete list of one kind.
#[derive(Clone, Debug)]
pub enum Change {
    /// A Service's new state, or `None` when it was deleted.
    Service(Key, Option<Box<Service>>),
    /// An EndpointSlice's new state, or `None` when it was deleted.
    Slice(Key, Option<Box<EndpointSlice>>),
    /// Every Service there is (a list): those not in it are gone.
    AllServices(Vec<Service>),
    /// Every EndpointSlice there is.
    AllSlices(Vec<EndpointSlice>),
}

impl Change {
    /// A complete list: what the daemon installed for objects not in it must go too.
    pub fn is_list(&self) -> bool {
        matches!(self, Change::AllServices(_) | Change::AllSlices(_))
    }
}

/// What a source hands the daemon.
#[derive(Debug, Default)]
pub struct Update {
    pub changes: Vec<Change>,
    /// Every node of the cluster, when any node changed (for routes to their pods).
    pub nodes: Option<Vec<Node>>,
}

pub trait ServiceSource: Send {
    /// Waits for the next update. An `Err` is bad input: the daemon reports it and keeps
    /// its last good state. Must be cancel-safe (it is polled in a `select!`): nothing a
    /// cancelled call took in may be lost.
    fn next(&mut self) -> impl Future<Output = Result<Update>> + Send;
}
