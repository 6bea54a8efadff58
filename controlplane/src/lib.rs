//! Ferry's control plane: a Kubernetes-compatible API server over a durable store.

pub mod store;
