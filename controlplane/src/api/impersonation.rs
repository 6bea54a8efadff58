//! Impersonation: `Impersonate-User`, `-Group`, `-Uid` and `-Extra-<key>` headers make a
//! request act as another user (what `kubectl --as`/`--as-group` send). Each is allowed only
//! when the real user may `impersonate` it through RBAC, as in Kubernetes:
//! `users`/`groups`/`serviceaccounts` in the core group, `uids` and `userextras/<key>` in
//! `authentication.k8s.io`. A request that may not impersonate is refused (403) rather than
//! served as the real user.

use axum::http::HeaderMap;

use super::auth::{Attributes, User};
use super::status::{ApiError, ApiResult};
use super::Api;

const USER: &str = "impersonate-user";
const GROUP: &str = "impersonate-group";
const UID: &str = "impersonate-uid";
const EXTRA: &str = "impersonate-extra-";

fn check(
    api: &Api,
    real: &User,
    group: &str,
    resource: &str,
    ns: &str,
    name: &str,
) -> ApiResult<()> {
    let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
    api.authorize(
        real,
        &Attributes {
            verb: "impersonate".into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            path: None,
        },
    )
}

fn header_values<'a>(headers: &'a HeaderMap, name: &str) -> ApiResult<Vec<&'a str>> {
    headers
        .get_all(name)
        .iter()
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request(format!("header {name} is not valid text")))
        })
        .collect()
}

/// The user a request acts as: `real`, or whom its impersonation headers name (if allowed).
pub fn effective_user(api: &Api, real: User, headers: &HeaderMap) -> ApiResult<User> {
    let users = header_values(headers, USER)?;
    let groups = header_values(headers, GROUP)?;
    let uids = header_values(headers, UID)?;
    let extras: Vec<(String, &str)> = headers
        .iter()
        .filter_map(|(k, v)| {
            k.as_str()
                .strip_prefix(EXTRA)
                .map(|key| (key.to_string(), v.to_str().unwrap_or_default()))
        })
        .collect();
    if users.is_empty() {
        if !groups.is_empty() || !uids.is_empty() || !extras.is_empty() {
            return Err(ApiError::bad_request(
                "impersonating groups, a uid or extras needs Impersonate-User as well",
            ));
        }
        return Ok(real);
    }
    if users.len() > 1 || uids.len() > 1 {
        return Err(ApiError::bad_request(
            "Impersonate-User and Impersonate-Uid may each be given once",
        ));
    }
    let name = users[0].trim();
    if name.is_empty() {
        return Err(ApiError::bad_request("Impersonate-User is empty"));
    }
    let mut out_groups: Vec<String> = Vec::new();
    if let Some(sa) = name.strip_prefix("system:serviceaccount:") {
        let (ns, sa_name) = sa.split_once(':').ok_or_else(|| {
            ApiError::bad_request(format!(
                "Impersonate-User {name:?}: a service account is system:serviceaccount:<namespace>:<name>"
            ))
        })?;
        check(api, &real, "", "serviceaccounts", ns, sa_name)?;
        out_groups.push("system:serviceaccounts".into());
        out_groups.push(format!("system:serviceaccounts:{ns}"));
    } else {
        check(api, &real, "", "users", "", name)?;
    }
    for g in &groups {
        check(api, &real, "", "groups", "", g)?;
        out_groups.push(g.to_string());
    }
    if let Some(uid) = uids.first() {
        check(api, &real, "authentication.k8s.io", "uids", "", uid)?;
    }
    for (key, value) in &extras {
        check(
            api,
            &real,
            "authentication.k8s.io",
            &format!("userextras/{key}"),
            "",
            value,
        )?;
    }
    tracing::debug!(real = %real.name, as_user = name, groups = ?out_groups, "impersonating");
    let refs: Vec<&str> = out_groups.iter().map(String::as_str).collect();
    if name == "system:anonymous" {
        let mut u = User::new(name, &refs);
        u.groups.retain(|g| g != "system:authenticated");
        if !u.groups.iter().any(|g| g == "system:unauthenticated") {
            u.groups.push("system:unauthenticated".into());
        }
        return Ok(u);
    }
    Ok(User::new(name, &refs))
}
