//! Sets of field paths, the unit of ownership in `metadata.managedFields`, and their
//! `FieldsV1` form: `{"f:spec":{"f:replicas":{}}}`, list items by key
//! (`k:{"name":"web"}`), set members by value (`v:"x"`), `.` for a node owned itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

/// One step of a path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathElement {
    /// A field of an object (struct field or map key).
    Field(String),
    /// An item of an associative list, by its key fields: canonical JSON with the fields in
    /// name order, `{"containerPort":80,"protocol":"TCP"}`.
    Key(String),
    /// An item of a set-like list, by its value as JSON.
    Value(String),
    /// An item of a list by position (only read from other servers' records).
    Index(usize),
}

pub type Path = Vec<PathElement>;

impl PathElement {
    fn encode(&self) -> String {
        match self {
            PathElement::Field(f) => format!("f:{f}"),
            PathElement::Key(k) => format!("k:{k}"),
            PathElement::Value(v) => format!("v:{v}"),
            PathElement::Index(i) => format!("i:{i}"),
        }
    }

    fn decode(s: &str) -> Result<Self, String> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("path element {s:?} has no prefix (f:, k:, v:, i:)"))?;
        Ok(match kind {
            "f" => PathElement::Field(rest.to_string()),
            "k" => {
                let v: Value = serde_json::from_str(rest)
                    .map_err(|e| format!("key {rest:?} is not JSON: {e}"))?;
                let Value::Object(m) = v else {
                    return Err(format!("key {rest:?} is not a JSON object"));
                };
                PathElement::Key(canonical_object(&m))
            }
            "v" => {
                let v: Value = serde_json::from_str(rest)
                    .map_err(|e| format!("value {rest:?} is not JSON: {e}"))?;
                PathElement::Value(canonical(&v))
            }
            "i" => PathElement::Index(
                rest.parse()
                    .map_err(|_| format!("index {rest:?} is not a number"))?,
            ),
            other => return Err(format!("unknown path element kind {other:?} in {s:?}")),
        })
    }
}

impl fmt::Display for PathElement {
    /// As Kubernetes prints paths in conflict messages: `.spec`, `[name="web"]`, `[="x"]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathElement::Field(n) => write!(f, ".{n}"),
            PathElement::Key(k) => {
                let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "[{}]", parts.join(","))
            }
            PathElement::Value(v) => write!(f, "[={v}]"),
            PathElement::Index(i) => write!(f, "[{i}]"),
        }
    }
}

pub fn display(path: &[PathElement]) -> String {
    path.iter().map(|p| p.to_string()).collect()
}

/// JSON with object fields in name order (the form keys and values are compared in).
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => canonical_object(m),
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(canonical).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

fn canonical_object(m: &Map<String, Value>) -> String {
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    let parts: Vec<String> = keys
        .iter()
        .map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&m[*k])))
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// A set of paths as a tree: `members` are paths that end here, `children` continue.
/// A path element may be both (a node owned itself and some of its fields).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet {
    members: BTreeSet<PathElement>,
    children: BTreeMap<PathElement, FieldSet>,
}

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.children.is_empty()
    }

    pub fn insert(&mut self, path: &[PathElement]) {
        match path {
            [] => {}
            [last] => {
                self.members.insert(last.clone());
            }
            [first, rest @ ..] => self.children.entry(first.clone()).or_default().insert(rest),
        }
    }

    /// Whether the path of one element, `pe`, is a member.
    pub fn has_member(&self, pe: &PathElement) -> bool {
        self.members.contains(pe)
    }

    /// The subtree under `pe`, if any path continues through it.
    pub fn sub(&self, pe: &PathElement) -> Option<&FieldSet> {
        self.children.get(pe)
    }

    /// The first elements of the set's paths.
    pub fn elements(&self) -> impl Iterator<Item = &PathElement> {
        let mut all: BTreeSet<&PathElement> = self.members.iter().collect();
        all.extend(self.children.keys());
        all.into_iter()
    }

    /// The subtree under `pe`, created if absent.
    pub fn child(&mut self, pe: PathElement) -> &mut FieldSet {
        self.children.entry(pe).or_default()
    }

    pub fn has(&self, path: &[PathElement]) -> bool {
        match path {
            [] => false,
            [last] => self.members.contains(last),
            [first, rest @ ..] => self.children.get(first).is_some_and(|c| c.has(rest)),
        }
    }

    /// Whether any path of the set starts with `prefix` (is it, or lies under it).
    pub fn touches(&self, prefix: &[PathElement]) -> bool {
        match prefix {
            [] => !self.is_empty(),
            [last] => self.members.contains(last) || self.children.contains_key(last),
            [first, rest @ ..] => self.children.get(first).is_some_and(|c| c.touches(rest)),
        }
    }

    /// Whether a path of the set is a proper prefix of `path` (or `path` itself).
    pub fn touches_prefix_of(&self, path: &[PathElement]) -> bool {
        (1..=path.len()).any(|n| self.has(&path[..n]))
    }

    pub fn union(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        out.members.extend(other.members.iter().cloned());
        for (k, c) in &other.children {
            let merged = match out.children.get(k) {
                Some(mine) => mine.union(c),
                None => c.clone(),
            };
            out.children.insert(k.clone(), merged);
        }
        out
    }

    pub fn difference(&self, other: &FieldSet) -> FieldSet {
        let members = self.members.difference(&other.members).cloned().collect();
        let mut children = BTreeMap::new();
        for (k, c) in &self.children {
            let d = match other.children.get(k) {
                Some(o) => c.difference(o),
                None => c.clone(),
            };
            if !d.is_empty() {
                children.insert(k.clone(), d);
            }
        }
        FieldSet { members, children }
    }

    pub fn intersection(&self, other: &FieldSet) -> FieldSet {
        let members = self.members.intersection(&other.members).cloned().collect();
        let mut children = BTreeMap::new();
        for (k, c) in &self.children {
            if let Some(o) = other.children.get(k) {
                let i = c.intersection(o);
                if !i.is_empty() {
                    children.insert(k.clone(), i);
                }
            }
        }
        FieldSet { members, children }
    }

    /// Every path of the set, parents before their children.
    pub fn paths(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        let mut keys: BTreeSet<&PathElement> = self.members.iter().collect();
        keys.extend(self.children.keys());
        for k in keys {
            prefix.push(k.clone());
            if self.members.contains(k) {
                out.push(prefix.clone());
            }
            if let Some(c) = self.children.get(k) {
                c.collect(prefix, out);
            }
            prefix.pop();
        }
    }

    /// The `FieldsV1` JSON form.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        let mut keys: BTreeSet<&PathElement> = self.members.iter().collect();
        keys.extend(self.children.keys());
        for k in keys {
            let mut v = match self.children.get(k) {
                Some(c) => c.to_json(),
                None => Value::Object(Map::new()),
            };
            if self.members.contains(k) && self.children.contains_key(k) {
                if let Some(o) = v.as_object_mut() {
                    o.insert(".".into(), Value::Object(Map::new()));
                }
            }
            m.insert(k.encode(), v);
        }
        Value::Object(m)
    }

    /// Reads the `FieldsV1` JSON form; the error names what is wrong.
    pub fn from_json(v: &Value) -> Result<FieldSet, String> {
        let Value::Object(m) = v else {
            return Err("fieldsV1 must be a JSON object".into());
        };
        let mut set = FieldSet::default();
        for (k, child) in m {
            if k == "." {
                continue;
            }
            let pe = PathElement::decode(k)?;
            let Value::Object(cm) = child else {
                return Err(format!("the value of {k:?} must be an object"));
            };
            if cm.is_empty() || cm.contains_key(".") {
                set.members.insert(pe.clone());
            }
            if cm.keys().any(|ck| ck != ".") {
                set.children.insert(pe, FieldSet::from_json(child)?);
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(s: &str) -> PathElement {
        PathElement::Field(s.into())
    }

    #[test]
    fn fields_v1_round_trips_and_set_operations() {
        let j = json!({"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}}},
                       "f:finalizers": {"v:\"x\"": {}}, "f:replicas": {}}});
        let s = FieldSet::from_json(&j).unwrap();
        assert_eq!(s.to_json(), j);
        assert!(s.has(&[f("spec"), f("replicas")]));
        assert!(s.has(&[f("metadata"), f("labels")]));
        assert!(!s.has(&[f("metadata")]));
        assert!(s.touches(&[f("metadata")]));
        let web = PathElement::Key("{\"name\":\"web\"}".into());
        assert!(s.has(&[f("spec"), f("containers"), web.clone()]));
        assert_eq!(
            display(&[f("spec"), f("containers"), web, f("image")]),
            ".spec.containers[name=\"web\"].image"
        );
        let mut r = FieldSet::default();
        r.insert(&[f("spec"), f("replicas")]);
        let d = s.difference(&r);
        assert!(!d.has(&[f("spec"), f("replicas")]));
        assert_eq!(s.intersection(&r), r);
        assert_eq!(d.union(&r), s);
        assert_eq!(s.paths().len(), 6);
        assert!(FieldSet::from_json(&json!({"x:y": {}})).is_err());
        assert!(FieldSet::from_json(&json!({"f:y": 1})).is_err());
    }

    #[test]
    fn keys_are_canonical_whatever_their_order() {
        let a = PathElement::decode("k:{\"protocol\":\"TCP\",\"port\":80}").unwrap();
        assert_eq!(
            a,
            PathElement::Key("{\"port\":80,\"protocol\":\"TCP\"}".into())
        );
    }
}
