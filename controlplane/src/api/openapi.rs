//! The OpenAPI v3 documents (`/openapi/v3` and one per group version): every operation with
//! its path and query parameters, request bodies and responses, and the schemas of the typed
//! objects (from k8s-openapi), so that clients and tools that generate requests from them
//! (kubectl's field validation check, schemathesis, code generators) can use them.
//!
//! Component schemas carry no `x-kubernetes-group-version-kind`: kubectl would then take them
//! for its strategic-merge metadata, which these schemas lack (patch merge keys); only the
//! operations name their kind, which is what kubectl reads to learn that the server validates
//! fields itself.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use schemars::gen::{SchemaGenerator, SchemaSettings};
use serde_json::{json, Map, Value};

use super::discovery::KUBE_VERSION;
use super::resources::{groups, in_group_version, ResourceInfo};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// Every group version's document and its hash, built once.
static DOCS: LazyLock<BTreeMap<String, (Value, String)>> = LazyLock::new(|| {
    let mut gvs = vec![("", "v1")];
    gvs.extend(groups());
    gvs.into_iter()
        .filter_map(|(g, v)| {
            let doc = build(g, v)?;
            let hash = format!(
                "{:08X}",
                crc32fast::hash(&serde_json::to_vec(&doc).unwrap_or_default())
            );
            Some((gv_path(g, v), (doc, hash)))
        })
        .collect()
});

/// `/openapi/v3`: where each group version's document is, with a hash clients cache by.
pub fn root() -> Value {
    let paths: Map<String, Value> = DOCS
        .iter()
        .map(|(p, (_, hash))| {
            (
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash}")}),
            )
        })
        .collect();
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1`, `/openapi/v3/apis/<group>/<version>`.
pub fn group_version(path: &str) -> Option<Value> {
    DOCS.get(path.trim_matches('/')).map(|(d, _)| d.clone())
}

fn string_param(name: &str, place: &str, required: bool) -> Value {
    json!({"name": name, "in": place, "required": required, "schema": {"type": "string"}})
}

fn int_param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "integer"}})
}

fn write_params() -> Vec<Value> {
    vec![
        string_param("dryRun", "query", false),
        string_param("fieldManager", "query", false),
        json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}),
    ]
}

fn list_params() -> Vec<Value> {
    vec![
        string_param("labelSelector", "query", false),
        string_param("fieldSelector", "query", false),
        int_param("limit"),
        string_param("continue", "query", false),
        string_param("resourceVersion", "query", false),
        string_param("resourceVersionMatch", "query", false),
    ]
}

fn delete_params() -> Vec<Value> {
    vec![
        string_param("dryRun", "query", false),
        int_param("gracePeriodSeconds"),
        string_param("propagationPolicy", "query", false),
    ]
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn body(schema: Value, required: bool) -> Value {
    json!({"required": required, "content": {
        "application/json": {"schema": schema.clone()},
        "application/yaml": {"schema": schema}}})
}

fn patch_body() -> Value {
    let ops = json!({"type": "array", "items": {"type": "object", "required": ["op", "path"],
        "properties": {"op": {"type": "string", "enum": ["add", "remove", "replace", "move", "copy", "test"]},
                       "path": {"type": "string"}, "from": {"type": "string"}, "value": {}}}});
    json!({"required": true, "content": {
        "application/json-patch+json": {"schema": ops},
        "application/merge-patch+json": {"schema": {"type": "object"}},
        "application/strategic-merge-patch+json": {"schema": {"type": "object"}}}})
}

fn responses(code: &str, schema: Value) -> Value {
    json!({code: {"description": "OK", "content": {"application/json": {"schema": schema}}},
           "default": {"description": "a Status naming the problem",
                       "content": {"application/json": {"schema": reference("io.k8s.apimachinery.pkg.apis.meta.v1.Status")}}}})
}

struct Op<'a> {
    r: &'a ResourceInfo,
    id: &'a str,
    params: Vec<Value>,
    body: Option<Value>,
    code: &'a str,
    out: Value,
}

impl Op<'_> {
    fn json(self, path_params: &[Value]) -> Value {
        let mut params = path_params.to_vec();
        params.extend(self.params);
        let mut o = json!({
            "operationId": format!("{}{}", self.id, self.r.kind),
            "parameters": params,
            "x-kubernetes-group-version-kind": {"group": self.r.group, "version": self.r.version, "kind": self.r.kind},
            "responses": responses(self.code, self.out),
        });
        if let Some(b) = self.body {
            o["requestBody"] = b;
        }
        o
    }
}

fn build(group: &str, version: &str) -> Option<Value> {
    let rs = in_group_version(group, version);
    if rs.is_empty() {
        return None;
    }
    let mut gen = SchemaGenerator::new(SchemaSettings::openapi3());
    let mut paths = Map::new();
    for r in rs {
        let schema = serde_json::to_value((r.schema)(&mut gen)).unwrap_or(json!({}));
        let list = json!({"type": "object", "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": reference("io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"),
            "items": {"type": "array", "items": schema.clone()}}});
        let base = format!("/{}", gv_path(group, version));
        let ns = string_param("namespace", "path", true);
        let name = string_param("name", "path", true);
        let (coll, item, mut coll_params) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", r.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
                vec![ns],
            )
        } else {
            (
                format!("{base}/{}", r.plural),
                format!("{base}/{}/{{name}}", r.plural),
                vec![],
            )
        };
        let op = |id, params, body, code, out| Op {
            r,
            id,
            params,
            body,
            code,
            out,
        };
        let mut c = Map::new();
        let create = op(
            "create",
            write_params(),
            Some(body(schema.clone(), true)),
            "201",
            schema.clone(),
        )
        .json(&coll_params);
        if r.create_only {
            c.insert("post".into(), create);
            paths.insert(coll, Value::Object(c));
            continue;
        }
        c.insert(
            "get".into(),
            op("list", list_params(), None, "200", list).json(&coll_params),
        );
        c.insert("post".into(), create);
        if r.plural != "namespaces" {
            let mut p = list_params();
            p.extend(delete_params());
            c.insert(
                "delete".into(),
                op(
                    "deletecollection",
                    p,
                    None,
                    "200",
                    json!({"type": "object"}),
                )
                .json(&coll_params),
            );
        }
        paths.insert(coll, Value::Object(c));
        coll_params.push(name);
        let item_params = coll_params;
        let delete_opts = reference("io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions");
        paths.insert(
            item.clone(),
            json!({
                "get": op("read", vec![], None, "200", schema.clone()).json(&item_params),
                "put": op("replace", write_params(), Some(body(schema.clone(), true)), "200", schema.clone()).json(&item_params),
                "patch": op("patch", write_params(), Some(patch_body()), "200", schema.clone()).json(&item_params),
                "delete": op("delete", delete_params(), Some(body(delete_opts, false)), "200", schema.clone()).json(&item_params),
            }),
        );
        for sub in r.subresources {
            let p = format!("{item}/{sub}");
            let v = match *sub {
                "status" => json!({
                    "get": op("readStatus", vec![], None, "200", schema.clone()).json(&item_params),
                    "put": op("replaceStatus", write_params(), Some(body(schema.clone(), true)), "200", schema.clone()).json(&item_params),
                    "patch": op("patchStatus", write_params(), Some(patch_body()), "200", schema.clone()).json(&item_params),
                }),
                "scale" => {
                    let scale = reference("io.k8s.api.autoscaling.v1.Scale");
                    json!({
                        "get": op("readScale", vec![], None, "200", scale.clone()).json(&item_params),
                        "put": op("replaceScale", write_params(), Some(body(scale.clone(), true)), "200", scale.clone()).json(&item_params),
                        "patch": op("patchScale", write_params(), Some(patch_body()), "200", scale).json(&item_params),
                    })
                }
                "binding" => {
                    let b = reference("io.k8s.api.core.v1.Binding");
                    json!({"post": op("createBinding", write_params(), Some(body(b.clone(), true)), "201", b).json(&item_params)})
                }
                "finalize" => json!({
                    "put": op("replaceFinalize", write_params(), Some(body(schema.clone(), true)), "200", schema.clone()).json(&item_params),
                }),
                // Logs need a kubelet; they are not described here.
                _ => continue,
            };
            paths.insert(p, v);
        }
    }
    // Schemas every document refers to.
    gen.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>();
    gen.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::DeleteOptions>();
    gen.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta>();
    gen.subschema_for::<k8s_openapi::api::autoscaling::v1::Scale>();
    gen.subschema_for::<k8s_openapi::api::core::v1::Binding>();
    let mut schemas = serde_json::to_value(gen.take_definitions()).unwrap_or(json!({}));
    strip_gvk(&mut schemas);
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBE_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

fn strip_gvk(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("x-kubernetes-group-version-kind");
            m.values_mut().for_each(strip_gvk);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_gvk),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_declare_their_parameters_and_bodies_and_refs_resolve() {
        let doc = group_version("api/v1").unwrap();
        let item = &doc["paths"]["/api/v1/namespaces/{namespace}/configmaps/{name}"];
        let names: Vec<&str> = item["put"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["namespace", "name"]);
        assert!(
            item["put"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .unwrap()
                .ends_with("io.k8s.api.core.v1.ConfigMap")
        );
        assert!(item["patch"]["requestBody"]["content"]["application/json-patch+json"].is_object());
        assert_eq!(
            doc["paths"]["/api/v1/namespaces"]["post"]["x-kubernetes-group-version-kind"]["kind"],
            "Namespace"
        );
        // Every $ref names a schema of the document.
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(
                schemas.contains_key(name),
                "{name} is referred to but missing"
            );
        }
        assert!(!text.contains("x-kubernetes-group-version-kind\":[{"));
        let root = root();
        assert!(root["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap()
            .starts_with("/openapi/v3/apis/apps/v1?hash="));
    }
}
