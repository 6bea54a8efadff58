//! Request bodies, decoded as a hostile client might send them: only the media types the API
//! speaks (JSON, YAML, kubectl's protobuf), YAML bounded in nesting and parsed off the threads
//! that serve other requests, and duplicate JSON keys found (refused under
//! `fieldValidation=Strict`, a warning otherwise).

use axum::http::HeaderMap;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
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
        Media::Yaml => parse_yaml(body).await?,
        Media::Protobuf => super::protobuf::decode(body).map_err(|e| {
            ApiError::unsupported_media(format!(
                "this protobuf body is not supported ({e}); send it as application/json"
            ))
        })?,
        Media::Json => {
            let (v, duplicates) = parse_json(body)
                .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
            if !v.is_object() {
                return Err(ApiError::bad_request("the body must be a JSON object"));
            }
            return Ok(Decoded {
                value: v,
                duplicates,
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

async fn parse_yaml(body: &bytes::Bytes) -> ApiResult<Value> {
    check_yaml_depth(body)?;
    // libyaml's parser is slow on hostile input: keep it off the request threads.
    let b = body.clone();
    tokio::task::spawn_blocking(move || serde_yaml::from_slice::<Value>(&b))
        .await
        .map_err(|e| ApiError::internal(format!("YAML parser task: {e}")))?
        .map_err(|e| ApiError::bad_request(format!("the body is not valid YAML: {e}")))
}

/// The body of an apply patch (`application/apply-patch+yaml`): YAML, or JSON (which
/// kubectl and the client libraries send).
pub async fn parse_apply(body: &bytes::Bytes) -> ApiResult<Value> {
    let v = if body.trim_ascii_start().starts_with(b"{") {
        parse_json(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?
            .0
    } else {
        parse_yaml(body).await?
    };
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the applied configuration must be an object",
        ));
    }
    Ok(v)
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

/// Parses a JSON body in one pass, noting the paths (`metadata.labels.a`) of object keys that
/// appear more than once (the last one wins, as in any JSON decoder).
pub fn parse_json(body: &[u8]) -> Result<(Value, Vec<String>), serde_json::Error> {
    let mut ctx = Ctx::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = Build { ctx: &mut ctx }.deserialize(&mut de)?;
    de.end()?;
    Ok((v, ctx.duplicates))
}

#[derive(Default)]
struct Ctx {
    /// Keys and indexes from the root to the value being built.
    path: Vec<String>,
    duplicates: Vec<String>,
}

struct Build<'a> {
    ctx: &'a mut Ctx,
}

impl<'de> DeserializeSeed<'de> for Build<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Build<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            self.ctx.path.push(format!("[{}]", out.len()));
            let next = seq.next_element_seed(Build {
                ctx: &mut *self.ctx,
            });
            self.ctx.path.pop();
            match next? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            self.ctx.path.push(k);
            let v = map.next_value_seed(Build {
                ctx: &mut *self.ctx,
            });
            let k = self.ctx.path.pop().unwrap_or_default();
            let v = v?;
            if out.contains_key(&k) {
                let mut p = String::new();
                for seg in self.ctx.path.iter().chain(std::iter::once(&k)) {
                    if !p.is_empty() && !seg.starts_with('[') {
                        p.push('.');
                    }
                    p.push_str(seg);
                }
                self.ctx.duplicates.push(p);
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_found_with_their_paths_in_the_one_parse() {
        let b = br#"{"metadata":{"name":"a","name":"b","labels":{"x":"1"}},"data":{"k":"1","k":"2"},"items":[{"a":1,"a":2.5}]}"#;
        let (v, dups) = parse_json(b).unwrap();
        assert_eq!(dups, vec!["metadata.name", "data.k", "items[0].a"]);
        assert_eq!(v, serde_json::from_slice::<Value>(b).unwrap());
        let plain = br#"{"a":{"b":1},"c":{"b":[true,null,-3,"s"]}}"#;
        let (v, dups) = parse_json(plain).unwrap();
        assert!(dups.is_empty());
        assert_eq!(v, serde_json::from_slice::<Value>(plain).unwrap());
        assert!(parse_json(b"{} trailing").is_err());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(
            parse_json(deep.as_bytes()).is_err(),
            "serde_json's depth limit holds"
        );
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
