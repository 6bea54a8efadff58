//! A request's query parameters, decoded, and the checks that refuse values Kubernetes does
//! not define (rather than ignoring them).

use std::collections::HashMap;

use super::status::{ApiError, ApiResult};

/// Query parameters, decoded.
pub struct Query(pub HashMap<String, String>);

impl Query {
    pub(super) fn parse(q: Option<&str>) -> Query {
        let mut m = HashMap::new();
        for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            m.insert(pct_decode(k), pct_decode(v));
        }
        Query(m)
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|s| !s.is_empty())
    }
    /// `dryRun=All`: admit and validate, write nothing ([`Query::check_write_options`] has
    /// refused any other value).
    pub fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }

    /// Options take only the values Kubernetes defines: an unknown one is refused rather than
    /// ignored (an unknown dryRun must never write).
    pub fn check_options(&self, verb: &str) -> ApiResult<()> {
        if matches!(verb, "list" | "watch" | "deletecollection") {
            self.count("limit")?;
            self.count("timeoutSeconds")?;
        }
        if !matches!(
            verb,
            "create" | "update" | "patch" | "delete" | "deletecollection"
        ) {
            return Ok(());
        }
        if let Some(d) = self.0.get("dryRun") {
            if d != "All" {
                return Err(invalid_dry_run(d));
            }
        }
        if let Some(f) = self.0.get("fieldValidation") {
            if !matches!(f.as_str(), "Ignore" | "Warn" | "Strict" | "") {
                return Err(ApiError::bad_request(format!(
                    "fieldValidation \"{f}\" is not supported: use Ignore, Warn or Strict"
                )));
            }
        }
        Ok(())
    }
    /// A parameter that must be a non-negative whole number if given (`limit`,
    /// `timeoutSeconds`, `gracePeriodSeconds`).
    pub fn count(&self, k: &str) -> ApiResult<Option<u64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid value for {k}: {v:?}: must be a non-negative integer"
                ))
            }),
        }
    }

    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true") | Some("1"))
    }
}

pub(super) fn invalid_dry_run(value: &str) -> ApiError {
    ApiError::bad_request(format!(
        "Invalid dry run value: {value:?}: the only supported value is \"All\" (nothing is written)"
    ))
}

fn pct_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
