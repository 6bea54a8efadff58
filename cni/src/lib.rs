//! `ferry-cni`: a CNI plugin (spec 1.0.0 and 1.1.0) that wires pods into the node.
//!
//! - [`spec`]: the environment, the network configuration, results and error codes;
//! - [`ipam`]: pod addresses from the node's pod CIDR, file-locked and crash safe;
//! - [`link`]: the veth pair, addresses and routes over rtnetlink;
//! - [`plugin`]: the commands (ADD, DEL, CHECK, VERSION, STATUS, GC).

pub mod ipam;
pub mod link;
pub mod plugin;
pub mod spec;
