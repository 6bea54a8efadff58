//! A load balancer's `loadBalancerSourceRanges` (or their annotation), as this node enforces
//! them: the IPv4 prefixes new flows to its ingress IPs may come from.

use std::collections::BTreeSet;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Service;

use super::Errors;

/// The annotation kube-proxy reads when `spec.loadBalancerSourceRanges` is empty.
const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// The IPv4 `loadBalancerSourceRanges` of a LoadBalancer Service (or, when the field is empty,
/// of its annotation, comma-separated), as kube-proxy reads them; `None` when neither is set.
/// IPv6 ranges are valid but concern another family: a list of only IPv6 ranges admits no
/// IPv4 client.
pub(super) fn source_ranges(
    svc: &Service,
    obj: &str,
    errs: &mut Errors,
) -> Option<BTreeSet<Ipv4Network>> {
    let field: Vec<(String, String)> = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| (format!("spec.loadBalancerSourceRanges[{i}]"), r.clone()))
        .collect();
    let listed = if field.is_empty() {
        let annotation = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))?;
        annotation
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|r| {
                (
                    format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"),
                    r.to_string(),
                )
            })
            .collect()
    } else {
        field
    };
    if listed.is_empty() {
        return None;
    }
    let mut out = BTreeSet::new();
    for (field, range) in listed {
        match range.trim().parse::<ipnetwork::IpNetwork>() {
            Ok(ipnetwork::IpNetwork::V4(net)) => {
                // The prefix as a network: 10.1.2.3/8 means 10.0.0.0/8.
                out.insert(Ipv4Network::new(net.network(), net.prefix()).unwrap_or(net));
            }
            Ok(ipnetwork::IpNetwork::V6(_)) => {}
            Err(_) => errs.push(
                obj,
                field,
                format!("invalid value \"{range}\": must be a CIDR such as 203.0.113.0/24"),
            ),
        }
    }
    Some(out)
}
