//! Kubernetes YAML as `ferry-proxy --services` reads it: a multi-document stream split at its
//! `---` lines, and each document read as v1 Services, discovery.k8s.io/v1 EndpointSlices,
//! v1 Nodes or a v1 List of them.

use anyhow::{anyhow, bail, Context as _, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The objects of one document, parsed.
#[derive(Default)]
pub(super) struct Parsed {
    pub(super) services: Vec<Service>,
    pub(super) slices: Vec<EndpointSlice>,
    pub(super) nodes: Vec<Node>,
}

/// The documents of a multi-document YAML stream, as bytes: split at lines that are `---`
/// (optionally followed by a space and more). The marker is searched for (SIMD memmem), not
/// line by line, and the text is not checked for UTF-8 here: only the documents that get
/// parsed are (a change to one document of a large file costs that document).
pub(super) fn split_documents(bytes: &[u8]) -> Vec<&[u8]> {
    let text = bytes;
    let mut docs = Vec::new();
    let mut start = 0;
    for at in memchr::memmem::find_iter(bytes, b"---") {
        let line_start = at == 0 || bytes[at - 1] == b'\n';
        let line_end = bytes
            .get(at + 3)
            .is_none_or(|c| matches!(c, b'\n' | b'\r' | b' '));
        if !(line_start && line_end) || at < start {
            continue;
        }
        docs.push(&text[start..at]);
        // The next document starts after the marker's line.
        start = memchr::memchr(b'\n', &bytes[at..]).map_or(text.len(), |n| at + n + 1);
    }
    docs.push(&text[start..]);
    docs
}

/// Parses one YAML document: a v1 Service, a discovery.k8s.io/v1 EndpointSlice, a v1 Node or
/// a v1 List of them (other kinds are skipped with a warning). Errors name the object and the
/// field serde could not read.
pub(super) fn parse_document(doc: &str) -> Result<Parsed> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(doc).map_err(|e| anyhow!("malformed YAML: {e}"))?;
    let mut out = Parsed::default();
    parse_value(value, &mut out)?;
    Ok(out)
}

fn parse_value(value: serde_yaml::Value, out: &mut Parsed) -> Result<()> {
    if value.is_null() {
        return Ok(());
    }
    let field = |f: &str| {
        value
            .get(f)
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let (api, kind) = (field("apiVersion"), field("kind"));
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    match (api.as_str(), kind.as_str()) {
        ("v1", "Service") => out
            .services
            .push(serde_yaml::from_value(value).with_context(|| format!("(Service {name})"))?),
        ("discovery.k8s.io/v1", "EndpointSlice") => out.slices.push(
            serde_yaml::from_value(value).with_context(|| format!("(EndpointSlice {name})"))?,
        ),
        ("v1", "Node") => out
            .nodes
            .push(serde_yaml::from_value(value).with_context(|| format!("(Node {name})"))?),
        ("v1", "List") => {
            if let Some(serde_yaml::Value::Sequence(items)) = value.get("items").cloned() {
                for item in items {
                    parse_value(item, out)?;
                }
            }
        }
        ("", _) | (_, "") => {
            bail!("apiVersion and kind are required (e.g. apiVersion: v1, kind: Service)")
        }
        _ => {
            tracing::warn!(%api, %kind, %name, "ignoring an object that is not a v1 Service, discovery.k8s.io/v1 EndpointSlice or v1 Node")
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_marker_lines_only() {
        let text = "---\na: 1\n--- # two\nb: '---'\nc: ----\n---\r\nd: 4\n---";
        let docs: Vec<&str> = split_documents(text.as_bytes())
            .into_iter()
            .map(|d| std::str::from_utf8(d).unwrap())
            .collect();
        assert_eq!(docs, ["", "a: 1\n", "b: '---'\nc: ----\n", "d: 4\n", ""]);
    }
}
