//! kube-proxy's rule layouts, generated the way kube-proxy (~v1.32) writes them, so the comparison
//! runs against what users run. See shared/kube-proxy-rules.md for the layouts; only ClusterIP
//! Services with Cluster traffic policy are generated (what the benchmark programs).
//!
//! nfacct counters are left out: kube-proxy writes them only when the kernel has nfacct.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
const MASQ_MARK: &str = "0x00004000";

/// One Service port with its ready endpoints.
#[derive(Clone, Debug)]
pub struct Svc {
    pub ns: String,
    pub name: String,
    pub port_name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl Svc {
    /// `<ns>/<name>:<portName>`, kube-proxy's service-port name.
    fn spn(&self) -> String {
        format!("{}/{}:{}", self.ns, self.name, self.port_name)
    }
    /// `<ns>/<name>/tcp/<portName>`, the nftables base name.
    fn nft_base(&self) -> String {
        format!("{}/{}/tcp/{}", self.ns, self.name, self.port_name)
    }
}

/// base32 (RFC 4648, uppercase) of sha256(text), cut to `n` characters.
fn hash(text: &str, n: usize) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut s = data_encoding::BASE32.encode(&digest);
    s.truncate(n);
    s
}

fn svc_chain(s: &Svc) -> String {
    format!("KUBE-SVC-{}", hash(&format!("{}tcp", s.spn()), 16))
}

fn sep_chain(s: &Svc, ep: (Ipv4Addr, u16)) -> String {
    format!(
        "KUBE-SEP-{}",
        hash(&format!("{}tcp{}:{}", s.spn(), ep.0, ep.1), 16)
    )
}

/// Top-level jumps kube-proxy installs one by one (`iptables -I`) on a full sync, as
/// `(table, chain, rule)`; the chains they jump to must exist first (`iptables -N`).
pub fn iptables_hooks() -> Vec<(&'static str, &'static str, Vec<String>)> {
    let r = |s: &str| shell_words(s);
    vec![
        ("nat", "PREROUTING", r("-m comment --comment 'kubernetes service portals' -j KUBE-SERVICES")),
        ("nat", "OUTPUT", r("-m comment --comment 'kubernetes service portals' -j KUBE-SERVICES")),
        ("nat", "POSTROUTING", r("-m comment --comment 'kubernetes postrouting rules' -j KUBE-POSTROUTING")),
        ("filter", "INPUT", r("-m conntrack --ctstate NEW -m comment --comment 'kubernetes externally-visible service portals' -j KUBE-EXTERNAL-SERVICES")),
        ("filter", "FORWARD", r("-m conntrack --ctstate NEW -m comment --comment 'kubernetes externally-visible service portals' -j KUBE-EXTERNAL-SERVICES")),
        ("filter", "INPUT", r("-m comment --comment 'kubernetes health check service ports' -j KUBE-NODEPORTS")),
        ("filter", "FORWARD", r("-m conntrack --ctstate NEW -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES")),
        ("filter", "OUTPUT", r("-m conntrack --ctstate NEW -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES")),
        ("filter", "FORWARD", r("-m comment --comment 'kubernetes forwarding rules' -j KUBE-FORWARD")),
        ("filter", "INPUT", r("-m conntrack --ctstate NEW -m comment --comment 'kubernetes load balancer firewall' -j KUBE-PROXY-FIREWALL")),
        ("filter", "OUTPUT", r("-m conntrack --ctstate NEW -m comment --comment 'kubernetes load balancer firewall' -j KUBE-PROXY-FIREWALL")),
        ("filter", "FORWARD", r("-m conntrack --ctstate NEW -m comment --comment 'kubernetes load balancer firewall' -j KUBE-PROXY-FIREWALL")),
        ("filter", "INPUT", r("-j KUBE-FIREWALL")),
        ("filter", "OUTPUT", r("-j KUBE-FIREWALL")),
    ]
}

/// Chains that must exist before the hooks are inserted.
pub const IPTABLES_HOOK_TARGETS: &[(&str, &str)] = &[
    ("nat", "KUBE-SERVICES"),
    ("nat", "KUBE-POSTROUTING"),
    ("filter", "KUBE-EXTERNAL-SERVICES"),
    ("filter", "KUBE-NODEPORTS"),
    ("filter", "KUBE-SERVICES"),
    ("filter", "KUBE-FORWARD"),
    ("filter", "KUBE-PROXY-FIREWALL"),
    ("filter", "KUBE-FIREWALL"),
];

/// Splits a rule on spaces, keeping 'quoted' words together.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn iptables_filter_section(out: &mut String) {
    out.push_str("*filter\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str("-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n");
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    let _ = writeln!(out, "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT");
    out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    out.push_str("COMMIT\n");
}

fn iptables_service_chains(out: &mut String, s: &Svc) {
    let svc = svc_chain(s);
    let spn = s.spn();
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{spn} cluster IP\" -m tcp -p tcp -d {} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        s.vip, s.port
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = sep_chain(s, *ep);
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(out, "-A {svc} -m comment --comment \"{spn} -> {}:{}\" -m statistic --mode random --probability {p:.10} -j {sep}", ep.0, ep.1);
        } else {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{spn} -> {}:{}\" -j {sep}",
                ep.0, ep.1
            );
        }
    }
    for ep in &s.endpoints {
        let sep = sep_chain(s, *ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {spn} -s {} -j KUBE-MARK-MASQ",
            ep.0
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {spn} -m tcp -p tcp -j DNAT --to-destination {}:{}",
            ep.0, ep.1
        );
    }
}

/// One `iptables-restore --noflush` input. `changed` selects the Services whose SVC/SEP chains
/// are written (all of them on a full sync); KUBE-SERVICES and the fixed chains are always
/// written in full, as kube-proxy's partial sync does.
pub fn iptables_restore(svcs: &[Svc], changed: &dyn Fn(usize) -> bool) -> String {
    let mut out = String::with_capacity(svcs.len() * 900);
    iptables_filter_section(&mut out);
    out.push_str("*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for (i, s) in svcs.iter().enumerate() {
        if changed(i) && !s.endpoints.is_empty() {
            let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
            for ep in &s.endpoints {
                let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, *ep));
            }
        }
    }
    let _ = writeln!(
        out,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(out, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    for (i, s) in svcs.iter().enumerate() {
        if s.endpoints.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {} --dport {} -j {}",
            s.spn(),
            s.vip,
            s.port,
            svc_chain(s)
        );
        if changed(i) {
            iptables_service_chains(&mut out, s);
        }
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    out.push_str("COMMIT\n");
    out
}

fn nft_endpoint_chain(s: &Svc, ep: (Ipv4Addr, u16)) -> String {
    let e = format!("{}__{}/{}", s.nft_base(), ep.0, ep.1);
    format!("endpoint-{}-{e}", hash(&e, 8))
}

fn nft_service_chain(s: &Svc) -> String {
    let b = s.nft_base();
    format!("service-{}-{b}", hash(&b, 8))
}

/// The fixed part of kube-proxy's table (first full sync of a process).
fn nft_skeleton(out: &mut String, node_ip: Ipv4Addr) {
    let t = "ip kube-proxy";
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    // Priorities as numbers (dstnat = -100, srcnat = 100): the names are not accepted for every
    // hook by Debian 12's nft.
    let base = [
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("filter-output-post-dnat", "filter", "output", "-90"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ];
    for (name, ty, hook, prio) in base {
        let _ = writeln!(
            out,
            "add chain {t} {name} {{ type {ty} hook {hook} priority {prio} ; }}"
        );
        let _ = writeln!(out, "flush chain {t} {name}");
    }
    let jumps = [
        ("filter-prerouting", "firewall-check", true),
        ("filter-input", "nodeport-endpoints-check", true),
        ("filter-input", "service-endpoints-check", true),
        ("filter-forward", "service-endpoints-check", true),
        ("filter-forward", "cluster-ips-check", true),
        ("filter-output", "service-endpoints-check", true),
        ("filter-output", "firewall-check", true),
        ("filter-output-post-dnat", "cluster-ips-check", true),
        ("nat-prerouting", "services", false),
        ("nat-output", "services", false),
        ("nat-postrouting", "masquerading", false),
    ];
    let mut made = Vec::new();
    for (from, to, ct_new) in jumps {
        if !made.contains(&to) {
            let _ = writeln!(out, "add chain {t} {to}");
            let _ = writeln!(out, "flush chain {t} {to}");
            made.push(to);
        }
        let cond = if ct_new { "ct state new " } else { "" };
        let _ = writeln!(out, "add rule {t} {from} {cond}jump {to}");
    }
    let _ = writeln!(out, "add chain {t} mark-for-masquerade");
    let _ = writeln!(out, "flush chain {t} mark-for-masquerade");
    let _ = writeln!(
        out,
        "add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}"
    );
    let _ = writeln!(
        out,
        "add rule {t} masquerading mark and {MASQ_MARK} == 0 return"
    );
    let _ = writeln!(
        out,
        "add rule {t} masquerading mark set mark xor {MASQ_MARK}"
    );
    let _ = writeln!(out, "add rule {t} masquerading masquerade fully-random");
    let _ = writeln!(
        out,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(out, "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"");
    let _ = writeln!(out, "add rule {t} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\"");
    let _ = writeln!(out, "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}");
    let _ = writeln!(out, "flush set {t} nodeport-ips");
    let _ = writeln!(out, "add element {t} nodeport-ips {{ {node_ip} }}");
    let _ = writeln!(out, "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}");
    let _ = writeln!(out, "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}");
    let _ = writeln!(out, "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}");
    let _ = writeln!(out, "flush chain {t} reject-chain");
    let _ = writeln!(out, "add rule {t} reject-chain reject");
    let _ = writeln!(out, "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services");
    let _ = writeln!(out, "add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports");
    let _ = writeln!(out, "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}");
    let _ = writeln!(
        out,
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(out, "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}");
    let _ = writeln!(out, "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}");
    let _ = writeln!(
        out,
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(out, "add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports");
    for set in [
        "set cluster-ips",
        "map service-ips",
        "map firewall-ips",
        "map no-endpoint-services",
        "map no-endpoint-nodeports",
        "map service-nodeports",
    ] {
        let _ = writeln!(
            out,
            "flush {set}",
            set = set.replacen(' ', &format!(" {t} "), 1)
        );
    }
}

/// The service and endpoint chains of one Service (created and flushed, then filled).
fn nft_service(out: &mut String, s: &Svc) {
    let t = "ip kube-proxy";
    let svc = nft_service_chain(s);
    let eps: Vec<String> = s
        .endpoints
        .iter()
        .map(|e| nft_endpoint_chain(s, *e))
        .collect();
    for c in eps.iter().chain(std::iter::once(&svc)) {
        let _ = writeln!(out, "add chain {t} {c}");
        let _ = writeln!(out, "flush chain {t} {c}");
    }
    let _ = writeln!(out, "add rule {t} {svc} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade", s.vip, s.port);
    let vmap: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{i} : goto {c}"))
        .collect();
    let _ = writeln!(
        out,
        "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        vmap.join(" , ")
    );
    for (ep, c) in s.endpoints.iter().zip(&eps) {
        let _ = writeln!(
            out,
            "add rule {t} {c} ip saddr {} jump mark-for-masquerade",
            ep.0
        );
        let _ = writeln!(
            out,
            "add rule {t} {c} meta l4proto tcp dnat to {}:{}",
            ep.0, ep.1
        );
    }
}

/// kube-proxy's full-sync transaction for `nft -f`.
pub fn nft_full(svcs: &[Svc], node_ip: Ipv4Addr) -> String {
    let mut out = String::with_capacity(svcs.len() * 1500);
    nft_skeleton(&mut out, node_ip);
    let t = "ip kube-proxy";
    for s in svcs.iter().filter(|s| !s.endpoints.is_empty()) {
        nft_service(&mut out, s);
        let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", s.vip);
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . tcp . {} : goto {} }}",
            s.vip,
            s.port,
            nft_service_chain(s)
        );
    }
    out
}

/// kube-proxy's partial-sync transaction after one Service's endpoints changed: its chains are
/// rewritten, the elements stay.
pub fn nft_partial(s: &Svc) -> String {
    let mut out = String::new();
    nft_service(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Svc {
        Svc {
            ns: "default".into(),
            name: "web".into(),
            port_name: "http".into(),
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            endpoints: vec![
                (Ipv4Addr::new(10, 244, 1, 2), 8080),
                (Ipv4Addr::new(10, 244, 1, 3), 8080),
            ],
        }
    }

    /// The names kube-proxy gives the scenario of shared/kube-proxy-rules.md.
    #[test]
    fn names_match_kube_proxy() {
        let s = web();
        assert_eq!(svc_chain(&s), "KUBE-SVC-CDGGSHYLG3RE2FKL");
        assert_eq!(sep_chain(&s, s.endpoints[0]), "KUBE-SEP-UIQK3OSOSTRHRPBX");
        assert_eq!(sep_chain(&s, s.endpoints[1]), "KUBE-SEP-2AZ33KU3V5PGPQZH");
        assert_eq!(
            nft_service_chain(&s),
            "service-SUSTUHLJ-default/web/tcp/http"
        );
        assert_eq!(
            nft_endpoint_chain(&s, s.endpoints[0]),
            "endpoint-SVLGPL42-default/web/tcp/http__10.244.1.2/8080"
        );
        assert_eq!(
            nft_endpoint_chain(&s, s.endpoints[1]),
            "endpoint-QYTGA46O-default/web/tcp/http__10.244.1.3/8080"
        );
    }

    #[test]
    fn iptables_layout_matches_kube_proxy() {
        let text = iptables_restore(&[web()], &|_| true);
        for line in [
            "-A KUBE-SERVICES -m comment --comment \"default/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-CDGGSHYLG3RE2FKL",
            "-A KUBE-SVC-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http -> 10.244.1.2:8080\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UIQK3OSOSTRHRPBX",
            "-A KUBE-SVC-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http -> 10.244.1.3:8080\" -j KUBE-SEP-2AZ33KU3V5PGPQZH",
            "-A KUBE-SEP-UIQK3OSOSTRHRPBX -m comment --comment default/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.2:8080",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        ] {
            assert!(text.lines().any(|l| l == line), "missing: {line}");
        }
    }

    #[test]
    fn nft_layout_matches_kube_proxy() {
        let text = nft_full(&[web()], Ipv4Addr::new(192, 168, 1, 10));
        for line in [
            "add element ip kube-proxy service-ips { 10.96.0.10 . tcp . 80 : goto service-SUSTUHLJ-default/web/tcp/http }",
            "add rule ip kube-proxy service-SUSTUHLJ-default/web/tcp/http numgen random mod 2 vmap { 0 : goto endpoint-SVLGPL42-default/web/tcp/http__10.244.1.2/8080 , 1 : goto endpoint-QYTGA46O-default/web/tcp/http__10.244.1.3/8080 }",
            "add rule ip kube-proxy endpoint-QYTGA46O-default/web/tcp/http__10.244.1.3/8080 meta l4proto tcp dnat to 10.244.1.3:8080",
            "add rule ip kube-proxy masquerading masquerade fully-random",
            "flush map ip kube-proxy service-ips",
        ] {
            assert!(text.lines().any(|l| l == line), "missing: {line}");
        }
    }
}
