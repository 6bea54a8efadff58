//! Validation every object gets, whatever its kind, with Kubernetes' rules and messages:
//! names (DNS-1123 subdomains and labels), qualified keys of labels and annotations, label
//! values, the total size of annotations, finalizer names, owner references, generation; and
//! the data keys and sizes of ConfigMaps and Secrets.

use serde_json::Value;

use super::status::FieldError;

const QUALIFIED_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const CONFIG_KEY_MSG: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";
/// Kubernetes' limit on all annotations of one object together.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// Kubernetes' limit on the data of one ConfigMap or Secret.
pub const MAX_DATA_BYTES: usize = 1024 * 1024;

pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// At most 253 characters of dot-separated lowercase labels; a single label may be longer than
/// 63 characters here (only the whole name is limited, as in Kubernetes).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// Why `key` is not a qualified name (`[prefix/]name`), if it is not.
pub fn qualified_name_error(key: &str) -> Option<String> {
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                return Some("prefix part must be non-empty".into());
            }
            if !is_dns1123_subdomain(prefix) {
                return Some(format!("prefix part {}", super::admission::SUBDOMAIN_MSG));
            }
            name
        }
        _ => return Some(format!("a qualified name {QUALIFIED_MSG}")),
    };
    if name.is_empty() {
        return Some("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Some("name part must be no more than 63 characters".into());
    }
    (!is_name_part(name)).then(|| QUALIFIED_MSG.to_string())
}

fn is_label_value(v: &str) -> bool {
    v.is_empty() || is_name_part(v)
}

/// Labels: qualified keys, valid values.
pub fn validate_labels(labels: &Value, field: &str, errs: &mut Vec<FieldError>) {
    let Some(m) = labels.as_object() else { return };
    for (k, v) in m {
        if let Some(why) = qualified_name_error(k) {
            errs.push(FieldError::invalid(field, format!("\"{k}\""), &why));
        }
        let v = v.as_str().unwrap_or_default();
        if v.len() > 63 {
            errs.push(FieldError::invalid(
                field.to_string(),
                format!("\"{v}\""),
                "must be no more than 63 characters",
            ));
        } else if !is_label_value(v) {
            errs.push(FieldError::invalid(
                field,
                format!("\"{v}\""),
                LABEL_VALUE_MSG,
            ));
        }
    }
}

/// The object's metadata beyond its name.
pub fn validate_meta(obj: &Value, errs: &mut Vec<FieldError>) {
    let meta = &obj["metadata"];
    validate_labels(&meta["labels"], "metadata.labels", errs);
    if let Some(ann) = meta["annotations"].as_object() {
        let mut total = 0;
        for (k, v) in ann {
            if let Some(why) = qualified_name_error(&k.to_lowercase()) {
                errs.push(FieldError::invalid(
                    "metadata.annotations",
                    format!("\"{k}\""),
                    &why,
                ));
            }
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        if total > MAX_ANNOTATIONS_BYTES {
            errs.push(too_long("metadata.annotations", MAX_ANNOTATIONS_BYTES));
        }
    }
    if let Some(fins) = meta["finalizers"].as_array() {
        for (i, f) in fins.iter().enumerate() {
            let f = f.as_str().unwrap_or_default();
            if let Some(why) = qualified_name_error(f) {
                errs.push(FieldError::invalid(
                    format!("metadata.finalizers[{i}]"),
                    format!("\"{f}\""),
                    &why,
                ));
            }
        }
        let has = |n: &str| fins.iter().any(|f| f.as_str() == Some(n));
        if has("orphan") && has("foregroundDeletion") {
            errs.push(FieldError::invalid(
                "metadata.finalizers",
                "foregroundDeletion",
                "finalizer orphan and foregroundDeletion cannot be both set",
            ));
        }
    }
    if let Some(refs) = meta["ownerReferences"].as_array() {
        let mut controllers = 0;
        for r in refs {
            for (key, what) in [
                ("apiVersion", "version"),
                ("kind", "kind"),
                ("name", "name"),
                ("uid", "uid"),
            ] {
                if r[key].as_str().is_none_or(str::is_empty) {
                    errs.push(FieldError::invalid(
                        format!("metadata.ownerReferences.{key}"),
                        "\"\"",
                        &format!("{what} must not be empty"),
                    ));
                }
            }
            if r["controller"] == Value::Bool(true) {
                controllers += 1;
            }
        }
        if controllers > 1 {
            errs.push(FieldError::invalid(
                "metadata.ownerReferences",
                format!("{}", meta["ownerReferences"]),
                "Only one reference can have Controller set to true",
            ));
        }
    }
    if let Some(g) = meta["generation"].as_i64().filter(|g| *g < 0) {
        errs.push(FieldError::invalid(
            "metadata.generation",
            g,
            "must be greater than or equal to 0",
        ));
    }
}

fn too_long(field: &str, max: usize) -> FieldError {
    FieldError {
        field: field.into(),
        kind: "FieldValueTooLong",
        message: format!("Too long: must have at most {max} bytes"),
    }
}

fn config_key_error(k: &str) -> Option<&'static str> {
    if k.len() > 253 {
        return Some("must be no more than 253 characters");
    }
    if k == "." || k == ".." {
        return Some("must not be '.' or '..'");
    }
    if k.starts_with("..") {
        return Some("must not start with '..'");
    }
    let ok = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    (!ok).then_some(CONFIG_KEY_MSG)
}

/// Keys of a ConfigMap's `data`/`binaryData` or a Secret's `data`/`stringData`, and sizes.
pub fn validate_data(kind: &str, obj: &Value, errs: &mut Vec<FieldError>) {
    let fields: &[&str] = if kind == "Secret" {
        &["data", "stringData"]
    } else {
        &["data", "binaryData"]
    };
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    for f in fields {
        let Some(m) = obj[*f].as_object() else {
            continue;
        };
        for (k, v) in m {
            if let Some(why) = config_key_error(k) {
                errs.push(FieldError::invalid(
                    format!("{f}[{k}]"),
                    format!("\"{k}\""),
                    why,
                ));
            }
            if kind == "ConfigMap" && !seen.insert(k.clone()) {
                errs.push(FieldError::invalid(
                    format!("{f}[{k}]"),
                    format!("\"{k}\""),
                    "duplicate of key present in data",
                ));
            }
            let len = v.as_str().map_or(0, str::len);
            // A Secret's data is base64: count the bytes it decodes to.
            total += k.len()
                + if kind == "Secret" && *f == "data" {
                    len / 4 * 3
                } else {
                    len
                };
        }
    }
    if total > MAX_DATA_BYTES {
        errs.push(too_long(
            if kind == "Secret" { "data" } else { "[]" },
            MAX_DATA_BYTES,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errs(obj: Value) -> Vec<String> {
        let mut e = Vec::new();
        validate_meta(&obj, &mut e);
        e.into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    #[test]
    fn names_and_qualified_keys() {
        assert!(is_dns1123_subdomain(&"a".repeat(200)));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(qualified_name_error("example.com/app").is_none());
        assert!(qualified_name_error(&format!("{}/x", "a".repeat(254))).is_some());
        assert!(qualified_name_error("a b").is_some());
        assert!(qualified_name_error("a/b/c").is_some());
        assert!(qualified_name_error("/x").is_some());
        assert!(qualified_name_error(&"k".repeat(64)).is_some());
    }

    #[test]
    fn metadata_rules() {
        assert!(errs(json!({"metadata": {"labels": {"app": "web"}, "annotations": {"example.com/x": "y"},
            "finalizers": ["example.com/f"], "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}]}})).is_empty());
        let e = errs(json!({"metadata": {"annotations": {"a b": "x"}}}));
        assert!(
            e[0].starts_with("metadata.annotations: Invalid value: \"a b\""),
            "{e:?}"
        );
        let e =
            errs(json!({"metadata": {"annotations": {"big": "x".repeat(MAX_ANNOTATIONS_BYTES)}}}));
        assert_eq!(
            e,
            ["metadata.annotations: Too long: must have at most 262144 bytes"]
        );
        let e = errs(json!({"metadata": {"finalizers": ["a b", "orphan", "foregroundDeletion"]}}));
        assert_eq!(e.len(), 2, "{e:?}");
        let e =
            errs(json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod"}]}}));
        assert_eq!(
            e,
            [
                "metadata.ownerReferences.name: Invalid value: \"\": name must not be empty",
                "metadata.ownerReferences.uid: Invalid value: \"\": uid must not be empty"
            ]
        );
        let e = errs(json!({"metadata": {"generation": -1}}));
        assert_eq!(
            e,
            ["metadata.generation: Invalid value: -1: must be greater than or equal to 0"]
        );
        let e = errs(json!({"metadata": {"labels": {"app": "-bad"}}}));
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn config_keys() {
        let mut e = Vec::new();
        validate_data(
            "ConfigMap",
            &json!({"data": {"a/b": "1", "ok.key_1-x": "2", "..x": "3"}, "binaryData": {"ok.key_1-x": ""}}),
            &mut e,
        );
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["data[..x]", "data[a/b]", "binaryData[ok.key_1-x]"]);
        let mut e = Vec::new();
        validate_data(
            "Secret",
            &json!({"data": {"k": "x".repeat(MAX_DATA_BYTES * 2)}}),
            &mut e,
        );
        assert_eq!(e[0].field, "data");
    }
}
