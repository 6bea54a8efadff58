//! Ferry's node agent: runs the pods bound to its node through a container runtime's CRI
//! (containerd), and owns the runtime's configuration on this node.
//!
//! - [`cri`]: the CRI client (runtime.v1 over containerd's unix socket).
//! - [`containerd`]: containerd's configuration under Ferry's state directory, and starting it
//!   when it is not running.

pub mod containerd;
pub mod cri;
pub mod node;
pub mod pods;
pub mod probe;
pub mod resources;
pub mod server;
pub mod services;
pub mod serving;
pub mod stats;
pub mod streaming;
