//! The controller manager: control loops that watch the API and act on it, as a client of the
//! API server like any other (`ferry-controlplane controller-manager --kubeconfig ...`).
//! So far: the Endpoints and EndpointSlice controller, the ReplicaSet and Deployment
//! controllers and the garbage collector.

pub mod deployment;
pub mod endpoints;
pub mod gc;
pub mod replicaset;
