//! `ferry-proxy`: the per-node daemon of Ferry. It reads Services and EndpointSlices
//! (`source`), computes what every frontend should do (`model`), writes the difference into the
//! eBPF maps (`reconcile`, `datapath`), attaches the datapath to matching interfaces (`links`),
//! collects conntrack (`conntrack`) and exports metrics (`metrics`). With connect-time load
//! balancing, the socket programs are attached to a cgroup (`datapath`) and connected UDP
//! sockets of removed backends are destroyed (`sockets`). The node's cluster DNS server
//! (the `dns` crate) is fed from the same changes (`dns`).

pub mod conntrack;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod healthcheck;
pub mod links;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod routes;
pub mod sockets;
pub mod source;
#[doc(hidden)]
pub mod testrun;
pub mod view;
