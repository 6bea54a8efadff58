//! Ferry's cluster DNS, served by `ferry-proxy` on every node from the Services and
//! EndpointSlices it already watches.
//!
//! - `records`: the cluster's names, kept per object as changes arrive;
//! - `answer`: the Kubernetes DNS specification's answers from those records;
//! - `forward`: other names, asked of the node's upstream resolvers, with a cache;
//! - `server`: UDP and TCP listeners and the bounds every client is held to;
//! - `reply_cache`: the encoded answers of repeated queries, for one generation of the records;
//! - `udp_batch`: datagrams received and answered in batches (recvmmsg, sendmmsg).
//!
//! Wire format by `hickory-proto`; nothing here parses DNS by hand.

pub mod answer;
pub mod forward;
pub mod records;
mod reply_cache;
pub mod server;
mod udp_batch;

pub use answer::Zone;
pub use forward::{ForwardConfig, Forwarder};
pub use records::Records;
pub use server::{Server, ServerConfig};

/// The nameservers of a resolv.conf, as upstreams (port 53), without those in `exclude` (the
/// cluster's own DNS addresses: forwarding to itself would loop).
pub fn upstreams_from_resolv_conf(
    text: &str,
    exclude: &[std::net::IpAddr],
) -> Vec<std::net::SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            words.next()?.parse::<std::net::IpAddr>().ok()
        })
        .filter(|ip| !exclude.contains(ip))
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .collect()
}
