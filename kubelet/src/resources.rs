//! A container's resources as cgroup settings for CRI: CPU limit as a CFS quota, CPU request as
//! shares, memory limit in bytes (kubelet's conversions).

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::cri::v1 as cri;

/// The CFS period the quota is a share of (100 ms, as kubelet uses).
const CPU_PERIOD: i64 = 100_000;
/// The least shares a container gets (a container without a CPU request).
const MIN_SHARES: i64 = 2;

/// A quantity's value (`500m` = 0.5, `64Mi` = 67108864, `1e3` = 1000), for cgroup settings
/// where a rounding to the byte or millicore is all that matters.
pub(crate) fn value(q: &Quantity) -> Result<f64, String> {
    let s = q.0.trim();
    let bad = || format!("{s:?} is not a quantity (e.g. 500m, 2, 128Mi, 1G)");
    let split = s
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let num: f64 = num.parse().map_err(|_| bad())?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return Err(bad()),
    };
    Ok(num * scale)
}

/// The cgroup settings for `c`'s requests and limits; an unparsable quantity names its field.
pub fn linux_resources(c: &Container) -> Result<cri::LinuxContainerResources, String> {
    let res = c.resources.clone().unwrap_or_default();
    let get = |m: &Option<std::collections::BTreeMap<String, Quantity>>, kind: &str, key: &str| {
        m.as_ref()
            .and_then(|m| m.get(key))
            .map(|q| {
                value(q).map_err(|e| format!("container {:?}: resources.{kind}.{key}: {e}", c.name))
            })
            .transpose()
    };
    let cpu_limit = get(&res.limits, "limits", "cpu")?;
    let cpu_request = get(&res.requests, "requests", "cpu")?.or(cpu_limit);
    let memory_limit = get(&res.limits, "limits", "memory")?;
    let mut r = cri::LinuxContainerResources {
        cpu_shares: cpu_request
            .map(|cpu| ((cpu * 1024.0).round() as i64).max(MIN_SHARES))
            .unwrap_or(MIN_SHARES),
        ..Default::default()
    };
    if let Some(cpu) = cpu_limit {
        r.cpu_period = CPU_PERIOD;
        // At least 1 ms per period, as the kernel requires.
        r.cpu_quota = ((cpu * CPU_PERIOD as f64).round() as i64).max(1000);
    }
    if let Some(mem) = memory_limit {
        r.memory_limit_in_bytes = mem.round() as i64;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(resources: serde_json::Value) -> Container {
        serde_json::from_value(json!({"name": "c", "resources": resources})).unwrap()
    }

    #[test]
    fn limits_and_requests_become_cgroup_settings() {
        let r = linux_resources(&container(json!({
            "limits": {"cpu": "500m", "memory": "64Mi"},
            "requests": {"cpu": "250m"}})))
        .unwrap();
        assert_eq!(r.cpu_period, 100_000);
        assert_eq!(r.cpu_quota, 50_000);
        assert_eq!(r.cpu_shares, 256);
        assert_eq!(r.memory_limit_in_bytes, 64 * 1024 * 1024);
        let r =
            linux_resources(&container(json!({"limits": {"cpu": "2", "memory": "1G"}}))).unwrap();
        assert_eq!(
            (r.cpu_quota, r.cpu_shares),
            (200_000, 2048),
            "the request defaults to the limit"
        );
        assert_eq!(r.memory_limit_in_bytes, 1_000_000_000);
        let none = linux_resources(&container(json!({}))).unwrap();
        assert_eq!(
            (none.cpu_quota, none.cpu_shares, none.memory_limit_in_bytes),
            (0, 2, 0)
        );
    }

    #[test]
    fn a_bad_quantity_names_its_field() {
        let e = linux_resources(&container(json!({"limits": {"memory": "lots"}}))).unwrap_err();
        assert!(
            e.contains("resources.limits.memory") && e.contains("\"lots\""),
            "{e}"
        );
    }
}
