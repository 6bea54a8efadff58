//! A pod's names, as the kubelet gives them: its `/etc/resolv.conf` (the CRI `DNSConfig` the
//! runtime writes, per `dnsPolicy` and `dnsConfig`), its managed `/etc/hosts` (localhost, its own
//! address with its hostname and FQDN, `hostAliases`), and its hostname (`hostname`,
//! `subdomain`, `setHostnameAsFQDN`).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::PodSpec;

use crate::cri::v1 as cri;

/// The node's DNS settings (`--cluster-dns`, `--cluster-domain`, the node's resolv.conf).
#[derive(Clone, Debug, Default)]
pub struct DnsSettings {
    pub cluster_dns: Vec<IpAddr>,
    pub cluster_domain: String,
    /// The node's own resolver configuration, for `Default` and for the search list
    /// `ClusterFirst` appends.
    pub host: ResolvConf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// glibc's limits, which the kubelet applies too.
const MAX_SERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;
const MAX_SEARCH_CHARS: usize = 2048;

impl ResolvConf {
    pub fn parse(text: &str) -> ResolvConf {
        let mut r = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => r.servers.extend(words.next().map(str::to_string)),
                // The last search (or domain) line wins, as in glibc.
                Some("search") | Some("domain") => {
                    r.searches = words.map(|w| w.trim_end_matches('.').to_string()).collect()
                }
                Some("options") => r.options.extend(words.map(str::to_string)),
                _ => {}
            }
        }
        r
    }
}

/// The pod's resolver configuration; a message naming the field when the pod asks for one
/// this node cannot give.
pub fn dns_config(
    spec: &PodSpec,
    namespace: &str,
    node: &DnsSettings,
) -> Result<cri::DnsConfig, String> {
    let host_network = spec.host_network.unwrap_or(false);
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster_first = match policy {
        "ClusterFirst" => !host_network,
        "ClusterFirstWithHostNet" => true,
        "Default" | "None" => false,
        other => {
            return Err(format!(
            "spec.dnsPolicy {other:?}: use ClusterFirst, ClusterFirstWithHostNet, Default or None"
        ))
        }
    };
    let mut out = ResolvConf::default();
    if cluster_first && !node.cluster_dns.is_empty() {
        let zone = node.cluster_domain.trim_end_matches('.');
        out.servers = node.cluster_dns.iter().map(IpAddr::to_string).collect();
        out.searches = vec![
            format!("{namespace}.svc.{zone}"),
            format!("svc.{zone}"),
            zone.to_string(),
        ];
        out.searches.extend(node.host.searches.iter().cloned());
        out.options = vec!["ndots:5".to_string()];
    } else if policy != "None" {
        // Default, ClusterFirst on the host network, or a node without cluster DNS.
        out = node.host.clone();
    }
    if let Some(c) = &spec.dns_config {
        out.servers.extend(c.nameservers.iter().flatten().cloned());
        out.searches.extend(c.searches.iter().flatten().cloned());
        for o in c.options.iter().flatten() {
            let text = match &o.value {
                Some(v) => format!("{}:{v}", o.name.as_deref().unwrap_or_default()),
                None => o.name.clone().unwrap_or_default(),
            };
            let name = text.split(':').next().unwrap_or_default().to_string();
            // A pod's option replaces the node's of the same name.
            out.options
                .retain(|x| x.split(':').next().unwrap_or_default() != name);
            out.options.push(text);
        }
    } else if policy == "None" {
        return Err(
            "spec.dnsConfig: dnsPolicy None needs a dnsConfig (nameservers, searches, options)"
                .into(),
        );
    }
    dedup(&mut out.servers);
    dedup(&mut out.searches);
    for s in &out.servers {
        s.parse::<IpAddr>()
            .map_err(|_| format!("spec.dnsConfig.nameservers: {s:?} is no IP address"))?;
    }
    // As the kubelet does: extra servers and searches beyond the resolver's limits are dropped.
    out.servers.truncate(MAX_SERVERS);
    out.searches.truncate(MAX_SEARCHES);
    while out.searches.iter().map(|s| s.len() + 1).sum::<usize>() > MAX_SEARCH_CHARS {
        out.searches.pop();
    }
    Ok(cri::DnsConfig {
        servers: out.servers,
        searches: out.searches,
        options: out.options,
    })
}

fn dedup(v: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|s| seen.insert(s.clone()));
}

/// The pod's hostname and, with a subdomain, its fully qualified name.
pub fn hostname(
    spec: &PodSpec,
    pod_name: &str,
    namespace: &str,
    zone: &str,
) -> Result<(String, Option<String>), String> {
    let short: String = spec
        .hostname
        .clone()
        .unwrap_or_else(|| pod_name.to_string())
        .chars()
        .take(63)
        .collect();
    let fqdn = spec
        .subdomain
        .as_ref()
        .filter(|s| !s.is_empty())
        .map(|sub| {
            format!(
                "{short}.{sub}.{namespace}.svc.{}",
                zone.trim_end_matches('.')
            )
        });
    if spec.set_hostname_as_fqdn == Some(true) {
        if let Some(f) = &fqdn {
            if f.len() > 64 {
                return Err(format!(
                    "spec.setHostnameAsFQDN: the FQDN {f:?} is longer than 64 characters; use a shorter hostname or subdomain"
                ));
            }
            return Ok((f.clone(), fqdn));
        }
    }
    Ok((short, fqdn))
}

/// The managed `/etc/hosts` of a pod: `base` (the standard header, or the node's own file for
/// a host-network pod), the pod's address with its names, then `hostAliases`.
pub fn hosts_file(spec: &PodSpec, ip: &str, names: &(String, Option<String>)) -> String {
    let mut s = String::from("# Kubernetes-managed hosts file.\n");
    if spec.host_network.unwrap_or(false) {
        s.push_str(&std::fs::read_to_string("/etc/hosts").unwrap_or_default());
        if !s.ends_with('\n') {
            s.push('\n');
        }
    } else {
        s.push_str(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
        );
        let (short, fqdn) = names;
        // The first label is the hostname even when it is the FQDN (setHostnameAsFQDN).
        let short = short.split('.').next().unwrap_or(short);
        match fqdn {
            Some(f) => s.push_str(&format!("{ip}\t{f}\t{short}\n")),
            None => s.push_str(&format!("{ip}\t{short}\n")),
        }
    }
    let aliases = spec.host_aliases.iter().flatten();
    let mut first = true;
    for a in aliases {
        let names = a.hostnames.clone().unwrap_or_default();
        if names.is_empty() {
            continue;
        }
        if first {
            s.push_str("\n# Entries added by HostAliases.\n");
            first = false;
        }
        s.push_str(&format!("{}\t{}\n", a.ip, names.join("\t")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{HostAlias, PodDNSConfig, PodDNSConfigOption};

    fn node() -> DnsSettings {
        DnsSettings {
            cluster_dns: vec!["10.96.0.10".parse().unwrap()],
            cluster_domain: "cluster.local".into(),
            host: ResolvConf::parse(
                "# comment\nnameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch corp.example\noptions edns0\n",
            ),
        }
    }

    #[test]
    fn the_node_resolv_conf_is_read_as_glibc_does() {
        let r = ResolvConf::parse("domain a.example\nnameserver 1.1.1.1 # x\nsearch b.example c.example.\noptions ndots:2 rotate\n");
        assert_eq!(r.servers, ["1.1.1.1"]);
        assert_eq!(r.searches, ["b.example", "c.example"]);
        assert_eq!(r.options, ["ndots:2", "rotate"]);
    }

    #[test]
    fn policies_give_the_kubelets_resolv_conf() {
        let spec = PodSpec::default();
        let c = dns_config(&spec, "shop", &node()).unwrap();
        assert_eq!(c.servers, ["10.96.0.10"]);
        assert_eq!(
            c.searches,
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example"
            ]
        );
        assert_eq!(c.options, ["ndots:5"]);

        // ClusterFirst on the host network is Default; ClusterFirstWithHostNet is not.
        let host = PodSpec {
            host_network: Some(true),
            ..Default::default()
        };
        assert_eq!(
            dns_config(&host, "shop", &node()).unwrap().servers,
            ["192.0.2.53", "192.0.2.54"]
        );
        let with = PodSpec {
            host_network: Some(true),
            dns_policy: Some("ClusterFirstWithHostNet".into()),
            ..Default::default()
        };
        assert_eq!(
            dns_config(&with, "shop", &node()).unwrap().servers,
            ["10.96.0.10"]
        );

        // None takes only the pod's dnsConfig; options override by name.
        let none = PodSpec {
            dns_policy: Some("None".into()),
            dns_config: Some(PodDNSConfig {
                nameservers: Some(vec!["192.0.2.1".into()]),
                searches: Some(vec!["ns1.svc.cluster-domain.example".into()]),
                options: Some(vec![
                    PodDNSConfigOption {
                        name: Some("ndots".into()),
                        value: Some("2".into()),
                    },
                    PodDNSConfigOption {
                        name: Some("edns0".into()),
                        value: None,
                    },
                ]),
            }),
            ..Default::default()
        };
        let c = dns_config(&none, "shop", &node()).unwrap();
        assert_eq!(c.servers, ["192.0.2.1"]);
        assert_eq!(c.searches, ["ns1.svc.cluster-domain.example"]);
        assert_eq!(c.options, ["ndots:2", "edns0"]);
        let mut merged = none.clone();
        merged.dns_policy = None;
        assert_eq!(
            dns_config(&merged, "shop", &node()).unwrap().options,
            ["ndots:2", "edns0"]
        );

        // Bad input names the field.
        let bad = PodSpec {
            dns_policy: Some("None".into()),
            ..Default::default()
        };
        assert!(dns_config(&bad, "shop", &node())
            .unwrap_err()
            .contains("spec.dnsConfig"));
        let bad = PodSpec {
            dns_policy: Some("Clusterfirst".into()),
            ..Default::default()
        };
        assert!(dns_config(&bad, "shop", &node())
            .unwrap_err()
            .contains("spec.dnsPolicy"));
    }

    #[test]
    fn hosts_and_hostnames() {
        let spec = PodSpec {
            hostname: Some("web-0".into()),
            subdomain: Some("nginx".into()),
            host_aliases: Some(vec![HostAlias {
                ip: "192.0.2.7".into(),
                hostnames: Some(vec!["foo.local".into(), "bar.local".into()]),
            }]),
            ..Default::default()
        };
        let names = hostname(&spec, "web-0", "shop", "cluster.local").unwrap();
        assert_eq!(names.0, "web-0");
        assert_eq!(
            names.1.as_deref(),
            Some("web-0.nginx.shop.svc.cluster.local")
        );
        let hosts = hosts_file(&spec, "10.244.1.5", &names);
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"));
        assert!(hosts.contains("10.244.1.5\tweb-0.nginx.shop.svc.cluster.local\tweb-0\n"));
        assert!(
            hosts.ends_with("# Entries added by HostAliases.\n192.0.2.7\tfoo.local\tbar.local\n")
        );

        let mut fq = spec.clone();
        fq.set_hostname_as_fqdn = Some(true);
        let names = hostname(&fq, "web-0", "shop", "cluster.local").unwrap();
        assert_eq!(names.0, "web-0.nginx.shop.svc.cluster.local");
        assert!(hosts_file(&fq, "10.244.1.5", &names)
            .contains("10.244.1.5\tweb-0.nginx.shop.svc.cluster.local\tweb-0\n"));
        fq.subdomain = Some("x".repeat(60));
        assert!(hostname(&fq, "web-0", "shop", "cluster.local")
            .unwrap_err()
            .contains("setHostnameAsFQDN"));
    }
}
