//! `metadata.managedFields` cut from an object's stored bytes without parsing them, for
//! readers that never need them (tables, the server's own lists).

/// The stored form (`{"metadata":{...},...}`, see `api::encode`) with the metadata's
/// `managedFields` member removed; None when it has none (or is not in that form).
pub fn cut_managed_fields(raw: &[u8]) -> Option<Vec<u8>> {
    const HEAD: &[u8] = b"{\"metadata\":{";
    if !raw.starts_with(HEAD) {
        return None;
    }
    // Walk the metadata's members: a key (a string), a colon, a value, then a comma or the
    // closing brace.
    let mut i = HEAD.len();
    let mut member_start = i;
    loop {
        match raw.get(i)? {
            b'}' => return None,
            b'"' => {}
            _ => return None,
        }
        let key_end = skip_string(raw, i)?;
        let key = &raw[i + 1..key_end - 1];
        if raw.get(key_end)? != &b':' {
            return None;
        }
        let value_end = skip_value(raw, key_end + 1)?;
        if key == b"managedFields" {
            let mut out = Vec::with_capacity(raw.len());
            match raw.get(value_end)? {
                // Not the last member: drop it and its comma.
                b',' => {
                    out.extend_from_slice(&raw[..member_start]);
                    out.extend_from_slice(&raw[value_end + 1..]);
                }
                // The last: drop it and the comma before it, if any.
                _ => {
                    let cut = if raw[member_start - 1] == b',' {
                        member_start - 1
                    } else {
                        member_start
                    };
                    out.extend_from_slice(&raw[..cut]);
                    out.extend_from_slice(&raw[value_end..]);
                }
            }
            return Some(out);
        }
        match raw.get(value_end)? {
            b',' => {
                i = value_end + 1;
                member_start = i;
            }
            _ => return None,
        }
    }
}

/// The end (exclusive) of the JSON string starting at `at` (its opening quote).
fn skip_string(raw: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    loop {
        match raw.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The end (exclusive) of the compact JSON value starting at `at`.
fn skip_value(raw: &[u8], at: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = at;
    loop {
        match raw.get(i)? {
            b'"' => i = skip_string(raw, i)?,
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                if depth == 0 {
                    return Some(i);
                }
                depth -= 1;
                i += 1;
            }
            b',' if depth == 0 => return Some(i),
            _ => i += 1,
        }
        if depth == 0 && matches!(raw.get(i - 1), Some(b'}') | Some(b']') | Some(b'"')) {
            return Some(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn cuts_only_the_metadata_member() {
        let cases = [
            json!({"metadata": {"annotations": {"managedFields": "[x]", "q": "\"managedFields\":["},
                "managedFields": [{"manager": "a", "fieldsV1": {"f:data": {"f:x}": {}}}}],
                "name": "n"}, "data": {"managedFields": "[1]"}}),
            json!({"metadata": {"labels": {"a": "b"}, "managedFields": [{"manager": "last"}]}, "spec": {}}),
            json!({"metadata": {"managedFields": []}}),
            json!({"metadata": {"managedFields": [], "name": "first"}}),
        ];
        for obj in cases {
            // The stored form: metadata first, compact.
            let mut rest = obj.as_object().unwrap().clone();
            let meta = rest.remove("metadata").unwrap();
            let mut raw = format!("{{\"metadata\":{}", serde_json::to_string(&meta).unwrap());
            for (k, v) in rest {
                raw.push_str(&format!(",{}:{v}", Value::String(k)));
            }
            raw.push('}');
            let cut = cut_managed_fields(raw.as_bytes()).expect("has managedFields");
            let got: Value = serde_json::from_slice(&cut)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&cut)));
            let mut want = obj.clone();
            want["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("managedFields");
            assert_eq!(got, want);
        }
        assert!(
            cut_managed_fields(br#"{"metadata":{"name":"n"},"data":{"managedFields":[]}}"#)
                .is_none()
        );
        assert!(cut_managed_fields(br#"{"metadata":{}}"#).is_none());
        assert!(cut_managed_fields(b"{\"metadata\":{\"name\":\"unterminated").is_none());
    }
}
