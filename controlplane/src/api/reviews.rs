//! The review APIs: questions put to the API server's authenticators and authorizers, answered
//! and never stored, as kube-apiserver's. `authorization.k8s.io/v1`: SelfSubjectAccessReview
//! (`kubectl auth can-i`), SubjectAccessReview and the namespaced LocalSubjectAccessReview (the
//! same question about another user), SelfSubjectRulesReview (`kubectl auth can-i --list`);
//! `authentication.k8s.io/v1`: TokenReview (whose is this bearer token) and SelfSubjectReview
//! (`kubectl auth whoami`). Each needs `create` on its resource, like any request; the bootstrap
//! policy grants the self reviews to every authenticated user (`system:basic-user`) and the
//! others to no one (`system:auth-delegator` is there to bind). Answers come from the same
//! authorizers requests meet: the node authorizer for a node's identity, then RBAC.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::auth::{Attributes, User};
use super::body::parse_object;
use super::serviceaccount::{self, ISSUER};
use super::status::{ApiError, ApiResult, FieldError};
use super::{json_response, Api, Target};

fn invalid(t: &Target, errs: Vec<FieldError>) -> ApiError {
    ApiError::invalid(t.info.kind, t.info.group, "", errs)
}

/// What an access review asks, in the authorizers' terms.
fn attributes(t: &Target, spec: &Value) -> ApiResult<Attributes> {
    let r = &spec["resourceAttributes"];
    let n = &spec["nonResourceAttributes"];
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    match (r.is_object(), n.is_object()) {
        (true, true) => Err(invalid(
            t,
            vec![FieldError::invalid(
                "spec.resourceAttributes",
                "{...}",
                "cannot be specified in combination with nonResourceAttributes",
            )],
        )),
        (false, false) => Err(invalid(
            t,
            vec![FieldError::invalid(
                "spec.resourceAttributes",
                "null",
                "exactly one of nonResourceAttributes or resourceAttributes must be specified",
            )],
        )),
        (true, false) => Ok(Attributes {
            verb: s(r, "verb"),
            group: s(r, "group"),
            resource: s(r, "resource"),
            subresource: s(r, "subresource"),
            namespace: s(r, "namespace"),
            name: s(r, "name"),
            path: None,
        }),
        (false, true) => Ok(Attributes {
            verb: s(n, "verb"),
            path: Some(s(n, "path")),
            ..Default::default()
        }),
    }
}

/// The subject a SubjectAccessReview names: exactly the user and groups given (no implied
/// `system:authenticated`, as Kubernetes).
fn subject(t: &Target, spec: &Value) -> ApiResult<User> {
    let name = spec["user"].as_str().unwrap_or_default().to_string();
    let groups: Vec<String> = spec["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g.as_str().map(str::to_string))
        .collect();
    if name.is_empty() && groups.is_empty() {
        return Err(invalid(
            t,
            vec![FieldError::invalid(
                "spec.user",
                "\"\"",
                "at least one of user or group must be specified",
            )],
        ));
    }
    Ok(User { name, groups })
}

/// RBAC rules as SelfSubjectRulesReview's resource and non-resource rules.
fn split_rules(rules: Vec<Value>) -> (Vec<Value>, Vec<Value>) {
    let (mut resource, mut non_resource) = (Vec::new(), Vec::new());
    let nonempty = |v: &Value| v.as_array().is_some_and(|a| !a.is_empty());
    for r in rules {
        if nonempty(&r["resources"]) {
            let mut rr = json!({"verbs": r["verbs"], "apiGroups": r["apiGroups"],
                                "resources": r["resources"]});
            if nonempty(&r["resourceNames"]) {
                rr["resourceNames"] = r["resourceNames"].clone();
            }
            resource.push(rr);
        }
        if nonempty(&r["nonResourceURLs"]) {
            non_resource
                .push(json!({"verbs": r["verbs"], "nonResourceURLs": r["nonResourceURLs"]}));
        }
    }
    (resource, non_resource)
}

fn user_info(u: &User) -> Value {
    json!({"username": u.name, "groups": u.groups})
}

impl Api {
    /// Answers a review `t` asked by `user` (already allowed to `create` it).
    pub(super) async fn review(
        &self,
        user: &User,
        t: &Target,
        headers: &HeaderMap,
        body: &bytes::Bytes,
    ) -> ApiResult<Response> {
        let mut obj = parse_object(t.info, headers, body).await?.value;
        obj = (t.info.normalize)(obj)
            .map_err(|e| ApiError::bad_request(format!("the {} is not valid: {e}", t.info.kind)))?;
        let spec = obj["spec"].clone();
        let status = match t.info.plural {
            "selfsubjectaccessreviews" => {
                let a = attributes(t, &spec)?;
                self.access(user, &a).await
            }
            "subjectaccessreviews" => {
                let a = attributes(t, &spec)?;
                self.access(&subject(t, &spec)?, &a).await
            }
            "localsubjectaccessreviews" => {
                let ns = t.ns.clone().unwrap_or_default();
                if spec["nonResourceAttributes"].is_object() {
                    return Err(ApiError::bad_request(
                        "nonResourceAttributes are not allowed in a LocalSubjectAccessReview: use a SubjectAccessReview",
                    ));
                }
                let a = attributes(t, &spec)?;
                if a.namespace != ns {
                    return Err(ApiError::bad_request(format!(
                        "spec.resourceAttributes.namespace must match namespace: {ns}"
                    )));
                }
                obj["metadata"]["namespace"] = json!(ns);
                self.access(&subject(t, &spec)?, &a).await
            }
            "selfsubjectrulesreviews" => {
                let ns = spec["namespace"].as_str().unwrap_or_default();
                let rules = self.rbac.read().unwrap().rules_for(user, ns);
                let (resource, non_resource) = split_rules(rules);
                // A node's own authorizer grants by object, not by rule: not listable.
                let node = super::node::node_of(user).is_some() && self.cfg.node_authorizer;
                let mut st = json!({"resourceRules": resource, "nonResourceRules": non_resource,
                                    "incomplete": node});
                if node {
                    st["evaluationError"] =
                        json!("the node authorizer's grants depend on the objects bound to the node and are not listed");
                }
                st
            }
            "tokenreviews" => self.token_review(&spec).await,
            "selfsubjectreviews" => json!({"userInfo": user_info(user)}),
            other => {
                return Err(ApiError::internal(format!(
                    "{other}: a review the server does not answer"
                )))
            }
        };
        obj["status"] = status;
        if obj["metadata"].is_null() {
            obj["metadata"] = json!({});
        }
        Ok(json_response(StatusCode::CREATED, &obj))
    }

    /// An access review's status: the same decision a request with these attributes meets.
    async fn access(&self, user: &User, a: &Attributes) -> Value {
        let one = (!a.name.is_empty()).then_some(a.name.as_str());
        match self.decide(user, a, one).await {
            Ok(()) => json!({"allowed": true}),
            Err(Some(why)) => json!({"allowed": false, "denied": true, "reason": why}),
            Err(None) => json!({"allowed": false}),
        }
    }

    /// A TokenReview's status: whose the token is, if the API server would accept it from a
    /// client for the audiences asked (the API's own when none).
    async fn token_review(&self, spec: &Value) -> Value {
        let token = spec["token"].as_str().unwrap_or_default().trim();
        let asked: Vec<String> = spec["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        if !asked.is_empty() && !asked.iter().any(|a| a == ISSUER) {
            return json!({"authenticated": false, "error": format!(
                "token audiences {asked:?} is invalid for the target audiences [{ISSUER:?}]: this server's tokens are for its own audience only")});
        }
        let user = if token.is_empty() {
            None
        } else if let Some(u) = self.cfg.tokens.get(token) {
            Some(u.clone())
        } else if serviceaccount::looks_like_jwt(token) {
            self.authenticate_token(token).await
        } else {
            None
        };
        match user {
            Some(u) => json!({"authenticated": true, "user": user_info(&u), "audiences": [ISSUER]}),
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_split_into_resource_and_non_resource_ones() {
        let (r, n) = split_rules(vec![
            json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"], "resourceNames": ["a"]}),
            json!({"verbs": ["list"], "apiGroups": ["apps"], "resources": ["deployments"]}),
            json!({"verbs": ["get"], "nonResourceURLs": ["/healthz"]}),
        ]);
        assert_eq!(
            r,
            vec![
                json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"], "resourceNames": ["a"]}),
                json!({"verbs": ["list"], "apiGroups": ["apps"], "resources": ["deployments"]}),
            ]
        );
        assert_eq!(
            n,
            vec![json!({"verbs": ["get"], "nonResourceURLs": ["/healthz"]})]
        );
    }
}
