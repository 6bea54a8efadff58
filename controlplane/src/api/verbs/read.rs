//! get and list: one object, or a page of them with selectors, a consistent revision and a
//! continue token (also what a watch starts from).

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::api::resources::ResourceInfo;
use crate::api::status::{ApiError, ApiResult};
use crate::api::table;
use crate::api::{
    decode, decode_without_managed_fields, json_response, splice_rv, wants_table, Api, Query,
};
use crate::store::{KeyValue, ListOptions, StoreError};
use ferry_common::selectors::{labels_of, FieldSelector, LabelSelector};

/// Decoded objects of a list, its revision and continue token.
pub struct Listed(pub Vec<Value>, pub i64, pub Option<String>);

#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: i64,
    start: String,
}

impl Api {
    pub async fn get_object(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<(Value, KeyValue)> {
        let kv = self
            .store
            .get(&info.key(ns.unwrap_or_default(), name))
            .await?
            .ok_or_else(|| ApiError::not_found(info.plural, info.group, name))?;
        Ok((decode(&kv), kv))
    }

    pub(super) fn selectors(
        &self,
        info: &ResourceInfo,
        q: &Query,
    ) -> ApiResult<(LabelSelector, FieldSelector)> {
        let ls = LabelSelector::parse(q.get("labelSelector").unwrap_or_default())
            .map_err(ApiError::bad_request)?;
        let fs = FieldSelector::parse(
            q.get("fieldSelector").unwrap_or_default(),
            &info.field_selectable(),
        )
        .map_err(ApiError::bad_request)?;
        Ok((ls, fs))
    }

    /// Objects matching the request's selectors, honouring limit and continue.
    pub async fn list_objects(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        q: &Query,
    ) -> ApiResult<Listed> {
        self.list_decoded(info, ns, q, decode).await
    }

    /// [`Api::list_objects`] decoding each object with `decode_with` (a table's rows skip
    /// the managedFields).
    pub(crate) async fn list_decoded(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        q: &Query,
        decode_with: fn(&KeyValue) -> Value,
    ) -> ApiResult<Listed> {
        let (ls, fs) = self.selectors(info, q)?;
        let limit = q.count("limit")?.unwrap_or(0) as usize;
        let prefix = info.list_prefix(ns);
        let (mut rv, mut start) = match q.get("continue") {
            Some(tok) => {
                let c: Continue = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(tok)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "continue key is not valid: run the list again without it",
                        )
                    })?;
                (c.rv, Some(c.start))
            }
            None => (self.list_revision(q)?, None),
        };
        let mut out = Vec::new();
        loop {
            let page = self
                .store
                .list(ListOptions {
                    prefix: &prefix,
                    start_after: start.as_deref(),
                    limit: if limit > 0 { (limit - out.len()).max(64) } else { 0 },
                    revision: rv,
                })
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if q.get("continue").is_some() => ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ),
                    e => e.into(),
                })?;
            rv = page.revision;
            let mut last = None;
            for kv in &page.kvs {
                last = Some(kv.key.clone());
                let obj = decode_with(kv);
                if (ls.is_empty() || ls.matches(&labels_of(&obj)))
                    && (fs.is_empty() || fs.matches(&obj))
                {
                    out.push(obj);
                    if limit > 0 && out.len() == limit {
                        let more = page.more || kv.key != page.kvs.last().unwrap().key;
                        let token = more.then(|| {
                            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
                                serde_json::to_vec(&Continue {
                                    rv,
                                    start: kv.key.clone(),
                                })
                                .unwrap(),
                            )
                        });
                        return Ok(Listed(out, rv, token));
                    }
                }
            }
            if !page.more || last.is_none() {
                return Ok(Listed(out, rv, None));
            }
            start = last;
        }
    }

    pub(super) fn list_revision(&self, q: &Query) -> ApiResult<i64> {
        match (q.get("resourceVersion"), q.get("resourceVersionMatch")) {
            (Some(rv), Some("Exact")) => rv.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid resourceVersion \"{rv}\": must be an integer"
                ))
            }),
            (Some(rv), _) => {
                rv.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid resourceVersion \"{rv}\": must be an integer"
                    ))
                })?;
                Ok(0)
            }
            _ => Ok(0),
        }
    }

    pub(super) async fn list(
        &self,
        info: &ResourceInfo,
        ns: Option<&str>,
        q: &Query,
        headers: &HeaderMap,
    ) -> ApiResult<Response> {
        let table = wants_table(headers);
        let plain = q.get("labelSelector").is_none()
            && q.get("fieldSelector").is_none()
            && q.get("limit").is_none()
            && q.get("continue").is_none();
        let kind = format!("{}List", info.kind);
        if plain && !table {
            // The fast path: stored bytes with the resource version spliced in, unparsed.
            let l = self
                .store
                .list(ListOptions {
                    prefix: &info.list_prefix(ns),
                    revision: self.list_revision(q)?,
                    ..Default::default()
                })
                .await?;
            let mut body =
                Vec::with_capacity(l.kvs.iter().map(|kv| kv.value.len() + 32).sum::<usize>() + 128);
            body.extend_from_slice(
                format!("{{\"kind\":\"{kind}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{}\"}},\"items\":[", info.api_version(), l.revision).as_bytes(),
            );
            for (i, kv) in l.kvs.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(&splice_rv(&kv.value, kv.mod_revision));
            }
            body.extend_from_slice(b"]}");
            return Ok((
                StatusCode::OK,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response());
        }
        let decode_with = if table {
            decode_without_managed_fields
        } else {
            decode
        };
        let Listed(items, rv, token) = self.list_decoded(info, ns, q, decode_with).await?;
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if let Some(t) = token {
            meta["continue"] = json!(t);
        }
        if table {
            return Ok(json_response(
                StatusCode::OK,
                &table::table(info, &items, meta),
            ));
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({"kind": kind, "apiVersion": info.api_version(), "metadata": meta, "items": items}),
        ))
    }
}
