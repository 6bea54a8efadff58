//! Who is asking (bearer tokens from a token file, client certificates of the cluster CA) and
//! may they (RBAC: Roles and ClusterRoles bound by RoleBindings and ClusterRoleBindings).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    pub fn new(name: &str, groups: &[&str]) -> Self {
        let mut g: Vec<String> = groups.iter().map(|s| s.to_string()).collect();
        if !g.iter().any(|x| x == "system:authenticated") {
            g.push("system:authenticated".into());
        }
        User {
            name: name.into(),
            groups: g,
        }
    }
}

/// Reads a Kubernetes static token file: `token,user,uid[,"group1,group2"]` per line.
pub fn load_tokens(path: &Path) -> Result<HashMap<String, User>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, groups) = match line.split_once(",\"") {
            Some((h, g)) => (h, g.trim_end_matches('"')),
            None => (line, ""),
        };
        let parts: Vec<&str> = head.split(',').map(str::trim).collect();
        if parts.len() < 3 || parts[0].is_empty() || parts[1].is_empty() {
            bail!(
                "{}:{}: expected token,user,uid[,\"group1,group2\"]",
                path.display(),
                n + 1
            );
        }
        let mut groups: Vec<&str> = groups.split(',').filter(|g| !g.is_empty()).collect();
        if parts.len() > 3 && groups.is_empty() {
            groups = parts[3..].to_vec();
        }
        out.insert(parts[0].to_string(), User::new(parts[1], &groups));
    }
    Ok(out)
}

/// The user a verified client certificate names: CN is the user, each O a group.
pub fn user_from_cert(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let orgs: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    let refs: Vec<&str> = orgs.iter().map(String::as_str).collect();
    Some(User::new(&cn, &refs))
}

/// What a request wants to do, in RBAC's terms.
#[derive(Clone, Debug, Default)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Set for requests that are not for a resource (/version, /api, /openapi/v3...).
    pub path: Option<String>,
}

/// A snapshot of every RBAC object, rebuilt when one changes.
#[derive(Default)]
pub struct Rbac {
    cluster_roles: HashMap<String, Vec<Value>>,
    /// (namespace, name) -> rules.
    roles: HashMap<(String, String), Vec<Value>>,
    cluster_bindings: Vec<Value>,
    /// Namespaced bindings.
    bindings: Vec<Value>,
}

fn has(list: &Value, want: &str) -> bool {
    list.as_array().is_some_and(|a| {
        a.iter()
            .any(|v| v.as_str() == Some(want) || v.as_str() == Some("*"))
    })
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    if !has(&rule["verbs"], &a.verb) {
        return false;
    }
    if let Some(path) = &a.path {
        return rule["nonResourceURLs"].as_array().is_some_and(|urls| {
            urls.iter().filter_map(|u| u.as_str()).any(|u| {
                u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p))
            })
        });
    }
    if !has(&rule["apiGroups"], &a.group) {
        return false;
    }
    let combined = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let resource_ok = rule["resources"].as_array().is_some_and(|rs| {
        rs.iter().filter_map(|r| r.as_str()).any(|r| {
            r == "*"
                || r == combined
                || (!a.subresource.is_empty() && r == format!("*/{}", a.subresource))
        })
    });
    if !resource_ok {
        return false;
    }
    match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => {
            !a.name.is_empty() && names.iter().any(|n| n.as_str() == Some(&a.name))
        }
        _ => true,
    }
}

fn subject_matches(binding: &Value, user: &User, binding_ns: &str) -> bool {
    binding["subjects"].as_array().is_some_and(|subs| {
        subs.iter().any(|s| {
            let name = s["name"].as_str().unwrap_or_default();
            match s["kind"].as_str().unwrap_or_default() {
                "User" => name == user.name,
                "Group" => user.groups.iter().any(|g| g == name),
                "ServiceAccount" => {
                    let ns = s["namespace"].as_str().unwrap_or(binding_ns);
                    user.name == format!("system:serviceaccount:{ns}:{name}")
                }
                _ => false,
            }
        })
    })
}

impl Rbac {
    pub fn add(&mut self, kind: &str, obj: &Value) {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let rules = obj["rules"].as_array().cloned().unwrap_or_default();
        match kind {
            "ClusterRole" => {
                self.cluster_roles.insert(name, rules);
            }
            "Role" => {
                self.roles.insert((ns, name), rules);
            }
            "ClusterRoleBinding" => self.cluster_bindings.push(obj.clone()),
            "RoleBinding" => self.bindings.push(obj.clone()),
            _ => {}
        }
    }

    fn role_rules(&self, binding: &Value, ns: &str) -> &[Value] {
        let role = &binding["roleRef"];
        let name = role["name"].as_str().unwrap_or_default();
        let found = match role["kind"].as_str() {
            Some("ClusterRole") => self.cluster_roles.get(name),
            Some("Role") => self.roles.get(&(ns.to_string(), name.to_string())),
            _ => None,
        };
        found.map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn allows(&self, user: &User, a: &Attributes) -> bool {
        if user.groups.iter().any(|g| g == "system:masters") {
            return true;
        }
        for b in &self.cluster_bindings {
            if subject_matches(b, user, "")
                && self.role_rules(b, "").iter().any(|r| rule_allows(r, a))
            {
                return true;
            }
        }
        if a.namespace.is_empty() || a.path.is_some() {
            return false;
        }
        self.bindings.iter().any(|b| {
            let ns = b["metadata"]["namespace"].as_str().unwrap_or_default();
            ns == a.namespace
                && subject_matches(b, user, ns)
                && self.role_rules(b, ns).iter().any(|r| rule_allows(r, a))
        })
    }
}

impl Rbac {
    /// The rules `user` holds in namespace `ns` (those of cluster-wide bindings, and of `ns`'s
    /// own bindings when `ns` is given), as SelfSubjectRulesReview lists them.
    pub fn rules_for(&self, user: &User, ns: &str) -> Vec<Value> {
        if user.groups.iter().any(|g| g == "system:masters") {
            return vec![
                json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}),
                json!({"verbs": ["*"], "nonResourceURLs": ["*"]}),
            ];
        }
        let mut out: Vec<Value> = Vec::new();
        for b in &self.cluster_bindings {
            if subject_matches(b, user, "") {
                out.extend(self.role_rules(b, "").iter().cloned());
            }
        }
        if !ns.is_empty() {
            for b in &self.bindings {
                let bns = b["metadata"]["namespace"].as_str().unwrap_or_default();
                if bns == ns && subject_matches(b, user, bns) {
                    out.extend(self.role_rules(b, bns).iter().cloned());
                }
            }
        }
        out
    }
}

/// The message kubectl prints for a denied request.
pub fn forbidden_message(user: &User, a: &Attributes) -> String {
    if let Some(path) = &a.path {
        return format!(
            "forbidden: User \"{}\" cannot {} path \"{path}\"",
            user.name, a.verb
        );
    }
    let res = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let name = if a.name.is_empty() {
        format!("{} ", a.resource)
    } else {
        format!("{} \"{}\" ", a.resource, a.name)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    let name_prefix = if name.is_empty() { String::new() } else { name };
    format!(
        "{name_prefix}is forbidden: User \"{}\" cannot {} resource \"{res}\" in API group \"{}\" {scope}",
        user.name, a.verb, a.group
    )
}

/// The roles and bindings every cluster starts with (as Kubernetes' bootstrap policy):
/// administrators, discovery for every authenticated user, and one identity per component
/// with only what it needs.
pub fn bootstrap_policy() -> Vec<Value> {
    let cr = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "rules": rules})
    };
    let crb = |name: &str, role: &str, kind: &str, subject: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}]})
    };
    let read = json!(["get", "list", "watch"]);
    let write = json!(["get", "list", "watch", "create", "update", "patch", "delete"]);
    vec![
        cr(
            "cluster-admin",
            json!([
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        ),
        crb("cluster-admin", "cluster-admin", "Group", "system:masters"),
        cr(
            "system:discovery",
            json!([{"nonResourceURLs": [
            "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz",
            "/openapi", "/openapi/*", "/version", "/version/"], "verbs": ["get"]}]),
        ),
        crb(
            "system:discovery",
            "system:discovery",
            "Group",
            "system:authenticated",
        ),
        // What anyone may ask about themselves (`kubectl auth can-i`, `can-i --list`, `auth
        // whoami`), as Kubernetes' system:basic-user.
        cr(
            "system:basic-user",
            json!([
            {"apiGroups": ["authorization.k8s.io"],
             "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
        ),
        crb(
            "system:basic-user",
            "system:basic-user",
            "Group",
            "system:authenticated",
        ),
        // Prometheus scrapers: the metrics and health paths, as Kubernetes' system:monitoring.
        cr(
            "system:monitoring",
            json!([{"nonResourceURLs": ["/metrics", "/healthz", "/healthz/*", "/livez", "/livez/*",
                                        "/readyz", "/readyz/*"], "verbs": ["get"]}]),
        ),
        crb(
            "system:monitoring",
            "system:monitoring",
            "Group",
            "system:monitoring",
        ),
        // For servers that delegate authentication and authorization to the API (bound by
        // whoever runs one), as Kubernetes' system:auth-delegator.
        cr(
            "system:auth-delegator",
            json!([
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}]),
        ),
        cr(
            "view",
            json!([{"apiGroups": ["", "apps", "batch", "discovery.k8s.io", "coordination.k8s.io",
                                  "networking.k8s.io", "policy", "autoscaling"],
            "resources": ["pods", "pods/status", "services", "services/status", "endpoints", "configmaps",
                          "events", "namespaces", "replicationcontrollers", "deployments", "deployments/scale",
                          "replicasets", "daemonsets", "statefulsets", "jobs", "cronjobs", "endpointslices", "leases",
                          "resourcequotas", "limitranges", "ingresses", "poddisruptionbudgets",
                          "horizontalpodautoscalers"],
            "verbs": read},
            {"apiGroups": ["metrics.k8s.io"], "resources": ["pods", "nodes"], "verbs": read}]),
        ),
        cr(
            "system:node-proxier",
            json!([
            {"apiGroups": [""], "resources": ["services", "endpoints", "nodes"], "verbs": read},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]}]),
        ),
        crb(
            "system:node-proxier",
            "system:node-proxier",
            "User",
            "system:kube-proxy",
        ),
        cr(
            "system:node",
            json!([
            {"apiGroups": [""], "resources": ["nodes", "nodes/status"], "verbs": write},
            {"apiGroups": [""], "resources": ["pods", "pods/status"], "verbs": write},
            {"apiGroups": [""], "resources": ["services", "endpoints", "namespaces"], "verbs": read},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": write},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]}]),
        ),
        crb("system:node", "system:node", "Group", "system:nodes"),
        cr(
            "system:kube-controller-manager",
            json!([
            {"apiGroups": ["", "apps", "batch", "discovery.k8s.io", "coordination.k8s.io", "policy"], "resources": ["*"], "verbs": ["*"]}]),
        ),
        crb(
            "system:kube-controller-manager",
            "system:kube-controller-manager",
            "User",
            "system:kube-controller-manager",
        ),
        cr(
            "system:kube-scheduler",
            json!([
            {"apiGroups": [""], "resources": ["pods", "nodes", "namespaces", "services", "replicationcontrollers", "persistentvolumeclaims"], "verbs": read},
            {"apiGroups": [""], "resources": ["pods/binding", "pods/status"], "verbs": ["create", "update", "patch"]},
            {"apiGroups": ["apps"], "resources": ["replicasets", "statefulsets"], "verbs": read},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": write},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]}]),
        ),
        crb(
            "system:kube-scheduler",
            "system:kube-scheduler",
            "User",
            "system:kube-scheduler",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rbac() -> Rbac {
        let mut r = Rbac::default();
        for o in bootstrap_policy() {
            r.add(o["kind"].as_str().unwrap(), &o);
        }
        r.add("Role", &json!({"metadata": {"namespace": "team", "name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"], "resourceNames": []},
                      {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["app-config"]}]}));
        r.add(
            "RoleBinding",
            &json!({"metadata": {"namespace": "team", "name": "jane-reads"},
            "roleRef": {"kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "User", "name": "jane"}]}),
        );
        r
    }

    fn attrs(
        verb: &str,
        group: &str,
        resource: &str,
        sub: &str,
        ns: &str,
        name: &str,
    ) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            path: None,
        }
    }

    #[test]
    fn rbac_checks_verb_resource_subresource_namespace_and_name() {
        let r = rbac();
        let jane = User::new("jane", &[]);
        assert!(r.allows(&jane, &attrs("list", "", "pods", "", "team", "")));
        assert!(!r.allows(&jane, &attrs("delete", "", "pods", "", "team", "p")));
        assert!(!r.allows(&jane, &attrs("list", "", "pods", "", "other", "")));
        assert!(!r.allows(&jane, &attrs("get", "", "pods", "status", "team", "p")));
        assert!(r.allows(
            &jane,
            &attrs("get", "", "configmaps", "", "team", "app-config")
        ));
        assert!(!r.allows(
            &jane,
            &attrs("get", "", "configmaps", "", "team", "db-password")
        ));
        assert!(!r.allows(&jane, &attrs("list", "apps", "pods", "", "team", "")));
        let proxy = User::new("system:kube-proxy", &[]);
        assert!(r.allows(
            &proxy,
            &attrs("watch", "discovery.k8s.io", "endpointslices", "", "", "")
        ));
        assert!(!r.allows(&proxy, &attrs("create", "", "services", "", "default", "")));
        let admin = User::new("root", &["system:masters"]);
        assert!(r.allows(
            &admin,
            &attrs("deletecollection", "apps", "deployments", "", "x", "")
        ));
        let mut discovery = attrs("get", "", "", "", "", "");
        discovery.path = Some("/apis/apps/v1".into());
        assert!(r.allows(&jane, &discovery));
        discovery.path = Some("/metrics".into());
        assert!(!r.allows(&jane, &discovery));
        assert_eq!(
            forbidden_message(&jane, &attrs("delete", "", "pods", "", "team", "p")),
            "pods \"p\" is forbidden: User \"jane\" cannot delete resource \"pods\" in API group \"\" in the namespace \"team\""
        );
    }

    #[test]
    fn token_file_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens.csv");
        std::fs::write(
            &p,
            "# comment\nabc,jane,1\ndef,ops,2,\"system:masters,ops\"\n",
        )
        .unwrap();
        let t = load_tokens(&p).unwrap();
        assert_eq!(t["abc"].name, "jane");
        assert!(t["def"].groups.contains(&"system:masters".to_string()));
        std::fs::write(&p, "justatoken\n").unwrap();
        assert!(load_tokens(&p)
            .unwrap_err()
            .to_string()
            .contains("tokens.csv:1"));
    }
}
