//! Ferry's control plane: a Kubernetes-compatible API server over a durable store.
//!
//! - [`store`]: the `Store` trait, the embedded default and the etcd backend;
//! - [`api`]: authentication, RBAC, admission, the REST verbs, watch, discovery, tables;
//! - [`pki`]: the cluster CA, serving and client certificates, kubeconfigs;
//! - [`server`]: HTTPS with client certificates;
//! - [`controllers`]: the controller manager's control loops (a client of the API);
//! - [`scheduler`]: assigns pods to nodes;
//! - [`leader`]: leader election on a Lease, so only one controller manager or scheduler acts;
//! - [`events`]: Events as components report them;
//! - [`files`]: state on disk readable by its owner only.

pub mod api;
pub mod controllers;
pub mod files;
pub mod pki;
pub mod quantity;
pub mod scheduler;
pub mod server;
pub mod store;

pub use files::private_dir;
