//! Request bodies, decoded as a hostile client might send them: only the media types the API
//! speaks (JSON, YAML, kubectl's protobuf), YAML bounded in nesting and parsed off the threads
//! that serve other requests, and duplicate JSON keys found (refused under
//! `fieldValidation=Strict`, a warning otherwise).

use axum::http::HeaderMap;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Value};

use super::resources::ResourceInfo;
use super::status::{ApiError, ApiResult};

/// Deepest nesting of a YAML body (JSON bodies are bounded by serde_json's own limit of 128).
pub const MAX_YAML_DEPTH: usize = 100;

/// A decoded body: the object, and the paths of keys that appeared twice in it.
pub struct Decoded {
    pub value: Value,
    pub duplicates: Vec<String>,
}

enum Media {
    Json,
    Yaml,
    Protobuf,
}

fn media(headers: &HeaderMap) -> ApiResult<Media> {
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("application/json");
    let base = ct.split(';').next().unwrap_or_default().trim();
    match base {
        "" | "application/json" | "*/*" => Ok(Media::Json),
        "application/yaml" | "application/x-yaml" | "text/yaml" => Ok(Media::Yaml),
        "application/vnd.kubernetes.protobuf" => Ok(Media::Protobuf),
        other => Err(ApiError::unsupported_media(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (got \"{other}\")"
        ))),
    }
}

/// The request body as an object (JSON, or YAML when so labelled).
pub async fn parse_any(headers: &HeaderMap, body: &bytes::Bytes) -> ApiResult<Decoded> {
    let v: Value = match media(headers)? {
        Media::Yaml => {
            check_yaml_depth(body)?;
            // libyaml's parser is slow on hostile input: keep it off the request threads.
            let b = body.clone();
            tokio::task::spawn_blocking(move || serde_yaml::from_slice::<Value>(&b))
                .await
                .map_err(|e| ApiError::internal(format!("YAML parser task: {e}")))?
                .map_err(|e| ApiError::bad_request(format!("the body is not valid YAML: {e}")))?
        }
        Media::Protobuf => super::protobuf::decode(body).map_err(|e| {
            ApiError::unsupported_media(format!(
                "this protobuf body is not supported ({e}); send it as application/json"
            ))
        })?,
        Media::Json => {
            let v = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
            if !Value::is_object(&v) {
                return Err(ApiError::bad_request("the body must be a JSON object"));
            }
            return Ok(Decoded {
                value: v,
                duplicates: duplicate_keys(body),
            });
        }
    };
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    Ok(Decoded {
        value: v,
        duplicates: Vec::new(),
    })
}

/// The body as an object of this resource: apiVersion and kind must match the path.
pub async fn parse_object(
    info: &ResourceInfo,
    headers: &HeaderMap,
    body: &bytes::Bytes,
) -> ApiResult<Decoded> {
    let mut d = parse_any(headers, body).await?;
    let v = &mut d.value;
    let want_av = info.api_version();
    match v["apiVersion"].as_str() {
        None | Some("") => v["apiVersion"] = json!(want_av),
        Some(av) if av != want_av => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({want_av})"
            )))
        }
        _ => {}
    }
    match v["kind"].as_str() {
        None | Some("") => v["kind"] = json!(info.kind),
        Some(k) if k != info.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({}): send it to the {} endpoint or fix `kind`",
                info.kind, k.to_lowercase()
            )))
        }
        _ => {}
    }
    Ok(d)
}

/// Refuses YAML nested deeper than [`MAX_YAML_DEPTH`] before any parser sees it. The count is
/// an upper bound of the parser's depth: open flow collections (`[`, `{`), block indentation
/// levels, and sequence dashes that open a nested sequence on the same line (`- - - x`).
pub fn check_yaml_depth(body: &[u8]) -> ApiResult<()> {
    let mut flow = 0usize;
    let mut indents: Vec<usize> = Vec::new();
    for line in body.split(|&b| b == b'\n') {
        let ind = line.iter().take_while(|&&b| b == b' ').count();
        let rest = &line[ind..];
        if flow == 0 && !rest.is_empty() && rest[0] != b'#' {
            while indents.last().is_some_and(|&top| top > ind) {
                indents.pop();
            }
            if indents.last() != Some(&ind) {
                indents.push(ind);
            }
        }
        let mut dashes = 0;
        let mut r = rest;
        while r.starts_with(b"- ") || r == b"-" {
            dashes += 1;
            r = r.get(2..).unwrap_or_default();
            r = &r[r.iter().take_while(|&&b| b == b' ').count()..];
        }
        let mut quote: Option<u8> = None;
        for &b in r {
            match (quote, b) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, b'"') | (None, b'\'') => quote = Some(b),
                (None, b'#') => break,
                (None, b'[') | (None, b'{') => flow += 1,
                (None, b']') | (None, b'}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            if flow + indents.len() + dashes > MAX_YAML_DEPTH {
                break;
            }
        }
        if flow + indents.len() + dashes > MAX_YAML_DEPTH {
            return Err(ApiError::bad_request(format!(
                "the YAML body is nested more than {MAX_YAML_DEPTH} levels deep: flatten it"
            )));
        }
    }
    Ok(())
}

/// Paths (`metadata.labels.a`) of object keys that appear more than once in a JSON body.
pub fn duplicate_keys(body: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = Walk {
        path: String::new(),
        out: &mut out,
    }
    .deserialize(&mut de);
    out
}

struct Walk<'a> {
    path: String,
    out: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let path = format!("{}[{i}]", self.path);
            if seq
                .next_element_seed(Walk {
                    path,
                    out: self.out,
                })?
                .is_none()
            {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                k.clone()
            } else {
                format!("{}.{k}", self.path)
            };
            if !seen.insert(k) {
                self.out.push(path);
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            map.next_value_seed(Walk {
                path,
                out: self.out,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_found_with_their_paths() {
        let b = br#"{"metadata":{"name":"a","name":"b","labels":{"x":"1"}},"data":{"k":"1","k":"2"},"items":[{"a":1,"a":2}]}"#;
        assert_eq!(
            duplicate_keys(b),
            vec!["metadata.name", "data.k", "items[0].a"]
        );
        assert!(duplicate_keys(br#"{"a":{"b":1},"c":{"b":2}}"#).is_empty());
    }

    #[test]
    fn deep_yaml_is_refused_before_parsing_and_normal_yaml_passes() {
        let flow = format!("a: {}1{}", "[".repeat(5000), "]".repeat(5000));
        assert!(check_yaml_depth(flow.as_bytes()).is_err());
        let mut block = String::new();
        for i in 0..200 {
            block.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        assert!(check_yaml_depth(block.as_bytes()).is_err());
        let dashes = format!("{}x\n", "- ".repeat(500));
        assert!(check_yaml_depth(dashes.as_bytes()).is_err());
        let ok = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  labels: {a: b}\ndata:\n  k: \"[[[[\"\n  list: |\n    - - - a\n";
        check_yaml_depth(ok.as_bytes()).unwrap();
        let mut fine = String::new();
        for i in 0..60 {
            fine.push_str(&format!("{}k{i}:\n", "  ".repeat(i)));
        }
        check_yaml_depth(fine.as_bytes()).unwrap();
    }
}
