//! The live view of Services and EndpointSlices from the API, turned into frontends one
//! Service at a time.
//!
//! A change to a Service or to one of its slices marks that Service dirty; `delta` recomputes
//! only the dirty Services' frontends (`model::service_desired`) and returns what to remove
//! and what to write, so one endpoint change costs the same with 10 or 10,000 Services.
//! A Service whose objects are invalid is reported and keeps what it had installed; the
//! others go on. A frontend claimed by two Services (e.g. the same NodePort) stays with the
//! Service that had it first, and the other is reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{
    service_desired, DesiredState, Frontend, FrontendSpec, HealthCheck, NodeInfo, ValidationError,
    SERVICE_NAME_LABEL,
};
use crate::source::{key_of, Change, Key};

/// What the maps must do to follow the changes since the last delta.
#[derive(Debug, Default)]
pub struct Delta {
    pub removed: Vec<Frontend>,
    pub upserts: DesiredState,
    pub errors: Vec<(Key, ValidationError)>,
    /// Services whose frontends were recomputed.
    pub recomputed: usize,
    /// The health check of each recomputed Service (`None`: it has none now).
    pub health: Vec<(Key, Option<HealthCheck>)>,
}

#[derive(Default)]
pub struct LiveView {
    services: HashMap<Key, Service>,
    slices: HashMap<Key, EndpointSlice>,
    /// Slice names by the Service they name.
    slices_of: HashMap<Key, BTreeSet<String>>,
    /// Frontends installed for each Service, as last computed.
    owned: HashMap<Key, BTreeMap<Frontend, FrontendSpec>>,
    owner: HashMap<Frontend, Key>,
    /// Services refused a frontend another Service holds: retried when it is let go.
    waiting: HashMap<Frontend, BTreeSet<Key>>,
    dirty: BTreeSet<Key>,
}

fn service_of(slice_key: &Key, slice: &EndpointSlice) -> Option<Key> {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .map(|s| (slice_key.0.clone(), s.clone()))
}

impl LiveView {
    pub fn services(&self) -> usize {
        self.services.len()
    }

    pub fn slices(&self) -> usize {
        self.slices.len()
    }

    pub fn change(&mut self, c: Change) {
        match c {
            Change::Service(key, svc) => {
                match svc {
                    Some(s) => self.services.insert(key.clone(), *s),
                    None => self.services.remove(&key),
                };
                self.dirty.insert(key);
            }
            Change::Slice(key, slice) => {
                // The Service it named before and the one it names now both change.
                if let Some(old) = self.slices.remove(&key) {
                    if let Some(svc) = service_of(&key, &old) {
                        if let Some(set) = self.slices_of.get_mut(&svc) {
                            set.remove(&key.1);
                            if set.is_empty() {
                                self.slices_of.remove(&svc);
                            }
                        }
                        self.dirty.insert(svc);
                    }
                }
                if let Some(new) = slice {
                    if let Some(svc) = service_of(&key, &new) {
                        self.slices_of
                            .entry(svc.clone())
                            .or_default()
                            .insert(key.1.clone());
                        self.dirty.insert(svc);
                    }
                    self.slices.insert(key, *new);
                }
            }
            // A complete list (first list, a relist after the watch lost its place, a file's
            // first read): every Service old or new is recomputed.
            Change::AllServices(all) => {
                let old: Vec<Key> = self
                    .services
                    .keys()
                    .chain(self.owned.keys())
                    .cloned()
                    .collect();
                self.dirty.extend(old);
                self.services.clear();
                for s in all {
                    let k = key_of(&s.metadata);
                    self.dirty.insert(k.clone());
                    self.services.insert(k, s);
                }
            }
            Change::AllSlices(all) => {
                self.dirty.extend(self.slices_of.keys().cloned());
                self.slices.clear();
                self.slices_of.clear();
                for s in all {
                    let k = key_of(&s.metadata);
                    self.change(Change::Slice(k, Some(Box::new(s))));
                }
            }
        }
    }

    /// Whether changes wait for `delta` (also after a delta freed a contested frontend).
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Recomputes the dirty Services and returns the difference to what is installed (which
    /// it then considers installed; the caller writes it to the maps).
    pub fn delta(&mut self, node: &NodeInfo) -> Delta {
        let mut d = Delta::default();
        let dirty = std::mem::take(&mut self.dirty);
        d.recomputed = dirty.len();
        // First every dirty Service's new frontends, then removals, then claims: a frontend
        // moving from one Service to another in the same batch is not a conflict.
        let mut fresh: Vec<(Key, BTreeMap<Frontend, FrontendSpec>)> = Vec::new();
        for key in dirty {
            let want = match self.services.get(&key) {
                None => {
                    d.health.push((key.clone(), None));
                    BTreeMap::new()
                }
                Some(svc) => {
                    let slices = self
                        .slices_of
                        .get(&key)
                        .into_iter()
                        .flatten()
                        .filter_map(|n| self.slices.get(&(key.0.clone(), n.clone())));
                    match service_desired(svc, slices, node) {
                        Ok(w) => {
                            d.health.push((key.clone(), w.health));
                            w.frontends
                        }
                        Err(e) => {
                            d.errors.push((key, e));
                            continue; // keeps what it had
                        }
                    }
                }
            };
            fresh.push((key, want));
        }
        for (key, want) in &fresh {
            if let Some(old) = self.owned.get(key) {
                for fe in old.keys().filter(|fe| !want.contains_key(fe)) {
                    d.removed.push(*fe);
                    self.owner.remove(fe);
                    if let Some(w) = self.waiting.remove(fe) {
                        self.dirty.extend(w);
                    }
                }
            }
        }
        for (key, mut want) in fresh {
            let mut conflicts = Vec::new();
            want.retain(|fe, spec| match self.owner.get(fe) {
                Some(other) if *other != key => {
                    self.waiting.entry(*fe).or_default().insert(key.clone());
                    conflicts.push(crate::model::InvalidField {
                        object: format!("Service {}/{}", key.0, key.1),
                        field: "spec".into(),
                        message: format!(
                            "Duplicate value: {fe} ({}) is already used by Service {}/{}",
                            spec.service, other.0, other.1
                        ),
                    });
                    false
                }
                _ => true,
            });
            if !conflicts.is_empty() {
                d.errors.push((key.clone(), ValidationError(conflicts)));
            }
            let old = self.owned.get(&key);
            for (fe, spec) in &want {
                if old.and_then(|o| o.get(fe)) != Some(spec) {
                    d.upserts.insert(*fe, spec.clone());
                }
                self.owner.insert(*fe, key.clone());
            }
            if want.is_empty() {
                self.owned.remove(&key);
            } else {
                self.owned.insert(key, want);
            }
        }
        d
    }

    /// Everything installed, as one desired state (after a failed write, to start over).
    pub fn installed(&self) -> DesiredState {
        self.owned
            .values()
            .flat_map(|m| m.iter().map(|(fe, s)| (*fe, s.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n".into(),
            addresses: vec!["192.168.1.1".parse().unwrap()],
            local_dns: None,
        }
    }

    fn svc(name: &str, ip: &str, node_port: Option<i32>) -> Change {
        let ty = if node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": ty, "clusterIP": ip, "ports": [{"port": 80, "nodePort": node_port}]}
        }))
        .unwrap();
        Change::Service(("default".into(), name.into()), Some(Box::new(s)))
    }

    fn slice(name: &str, service: &str, ips: &[&str]) -> Change {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": ips.iter().map(|ip| json!({"addresses": [ip]})).collect::<Vec<_>>()
        }))
        .unwrap();
        Change::Slice(("default".into(), name.into()), Some(Box::new(s)))
    }

    fn backends(d: &Delta) -> Vec<String> {
        d.upserts
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.to_string()))
            .collect()
    }

    #[test]
    fn only_the_changed_service_is_recomputed() {
        let mut v = LiveView::default();
        for i in 0..100 {
            v.change(svc(&format!("s{i}"), &format!("10.96.1.{i}"), None));
            v.change(slice(&format!("s{i}-x"), &format!("s{i}"), &["10.1.0.1"]));
        }
        let d = v.delta(&node());
        assert_eq!((d.recomputed, d.upserts.len()), (100, 100));
        v.change(slice("s7-x", "s7", &["10.1.0.1", "10.1.0.2"]));
        let d = v.delta(&node());
        assert_eq!(d.recomputed, 1);
        assert_eq!(backends(&d), ["10.1.0.1:8080/TCP", "10.1.0.2:8080/TCP"]);
        assert!(d.removed.is_empty());
        // Nothing changed: nothing to write.
        v.change(slice("s7-x", "s7", &["10.1.0.1", "10.1.0.2"]));
        let d = v.delta(&node());
        assert!(d.upserts.is_empty() && d.removed.is_empty());
        // A deleted Service takes its frontend away.
        v.change(Change::Service(("default".into(), "s3".into()), None));
        let d = v.delta(&node());
        assert_eq!(d.removed.len(), 1);
        assert_eq!(d.removed[0].addr.to_string(), "10.96.1.3");
    }

    #[test]
    fn a_slice_moving_between_services_updates_both() {
        let mut v = LiveView::default();
        v.change(svc("a", "10.96.0.1", None));
        v.change(svc("b", "10.96.0.2", None));
        v.change(slice("x", "a", &["10.1.0.9"]));
        v.delta(&node());
        v.change(slice("x", "b", &["10.1.0.9"]));
        let d = v.delta(&node());
        assert_eq!(d.recomputed, 2);
        let by_addr: BTreeMap<String, usize> = d
            .upserts
            .iter()
            .map(|(fe, s)| (fe.addr.to_string(), s.backends.len()))
            .collect();
        assert_eq!(by_addr["10.96.0.1"], 0);
        assert_eq!(by_addr["10.96.0.2"], 1);
    }

    #[test]
    fn a_bad_service_keeps_its_state_and_does_not_stop_the_others() {
        let mut v = LiveView::default();
        v.change(svc("good", "10.96.0.1", None));
        v.change(svc("bad", "10.96.0.2", None));
        v.delta(&node());
        v.change(svc("bad", "not-an-ip", None));
        v.change(slice("g", "good", &["10.1.0.1"]));
        let d = v.delta(&node());
        assert_eq!(d.errors.len(), 1);
        assert!(
            d.errors[0].1.to_string().contains("spec.clusterIP"),
            "{}",
            d.errors[0].1
        );
        assert_eq!(backends(&d), ["10.1.0.1:8080/TCP"]);
        assert!(d.removed.is_empty(), "the bad Service keeps its frontend");
    }

    #[test]
    fn a_node_port_taken_twice_stays_with_its_first_service() {
        let mut v = LiveView::default();
        v.change(svc("first", "10.96.0.1", Some(30080)));
        v.delta(&node());
        v.change(svc("second", "10.96.0.2", Some(30080)));
        let d = v.delta(&node());
        assert_eq!(d.errors.len(), 1);
        let msg = d.errors[0].1.to_string();
        assert!(
            msg.contains("already used by Service default/first"),
            "{msg}"
        );
        // The second still gets its ClusterIP.
        assert_eq!(d.upserts.len(), 1);
        // When the first lets go, the second claims it.
        v.change(Change::Service(("default".into(), "first".into()), None));
        let d = v.delta(&node());
        assert_eq!(d.removed.len(), 2);
        assert!(v.has_changes(), "the waiting Service is recomputed next");
        let d = v.delta(&node());
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.upserts.len(), 1);
        assert_eq!(d.upserts.keys().next().unwrap().port, 30080);
    }
}
