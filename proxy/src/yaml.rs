//! Multi-document YAML (`---`-separated), and the Services and
//! EndpointSlices in it: the one loader of the resource files that the
//! proxy watches, `tabbyctl service list` reads and `tabby-lab apply` writes.
//!
//! Documents are counted from 1 as they appear in the text, empty ones
//! included (and skipped); an error names the document and the field
//! (`spec.ports[0].port`) that failed, and rejects the whole text.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_norway::Value;

/// Why a YAML text was rejected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A document is not YAML.
    #[error("document {index}")]
    Syntax {
        /// The document, counted from 1.
        index: usize,
        /// The parser's error (with line and column).
        #[source]
        source: serde_norway::Error,
    },
    /// A document does not match its type.
    #[error("document {index}: {kind} at {path}")]
    Schema {
        /// The document, counted from 1.
        index: usize,
        /// What it was read as, e.g. `Service`.
        kind: String,
        /// The field that failed, e.g. `spec.ports[0].port` (`.` for the document itself).
        path: String,
        /// What is wrong with it.
        #[source]
        source: serde_norway::Error,
    },
    /// A Service or EndpointSlice without `metadata.name`.
    #[error("document {index}: {kind} has no metadata.name")]
    NoName {
        /// The document, counted from 1.
        index: usize,
        /// `Service` or `EndpointSlice`.
        kind: &'static str,
    },
}

/// `Result` with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The non-empty documents of `text`, each with its index (from 1).
fn values(text: &str) -> Result<Vec<(usize, Value)>> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = Value::deserialize(doc).map_err(|source| Error::Syntax { index, source })?;
        if !value.is_null() {
            out.push((index, value));
        }
    }
    Ok(out)
}

/// Reads `value` (document `index`) as a `T`, naming the failing field.
fn typed<T: DeserializeOwned>(value: Value, index: usize, kind: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| Error::Schema {
        index,
        kind: kind.to_string(),
        path: e.path().to_string(),
        source: e.into_inner(),
    })
}

/// Every non-empty document of `text` as a `T`.
pub fn documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>> {
    let kind = std::any::type_name::<T>().rsplit("::").next().unwrap_or("");
    values(text)?
        .into_iter()
        .map(|(index, value)| typed(value, index, kind))
        .collect()
}

/// A document that is neither a v1 Service nor a discovery.k8s.io/v1
/// EndpointSlice (nor a `List`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The document, counted from 1.
    pub index: usize,
    /// Its `apiVersion` (empty when absent).
    pub api_version: String,
    /// Its `kind` (empty when absent).
    pub kind: String,
}

/// The Services and EndpointSlices of a text, in document order, each with
/// its namespace defaulted to `default`; what else it held.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    /// `v1` `Service`s.
    pub services: Vec<Service>,
    /// `discovery.k8s.io/v1` `EndpointSlice`s.
    pub slices: Vec<EndpointSlice>,
    /// Documents of other kinds or API versions.
    pub skipped: Vec<Skipped>,
}

/// Splits `text` into Services and EndpointSlices by `apiVersion` and
/// `kind` (also inside the items of a `kind: List`). Other documents are
/// listed in [`Objects::skipped`]; an invalid Service or EndpointSlice, or
/// one without a name, rejects the whole text.
pub fn objects(text: &str) -> Result<Objects> {
    let mut out = Objects::default();
    for (index, value) in values(text)? {
        out.add(value, index)?;
    }
    Ok(out)
}

/// A string field of a document, empty when absent.
fn field<'v>(value: &'v Value, name: &str) -> &'v str {
    value.get(name).and_then(Value::as_str).unwrap_or("")
}

impl Objects {
    fn add(&mut self, value: Value, index: usize) -> Result<()> {
        let (api, kind) = (field(&value, "apiVersion"), field(&value, "kind"));
        if (api, kind) == (Service::API_VERSION, Service::KIND) {
            let mut svc: Service = typed(value, index, Service::KIND)?;
            named(&mut svc.metadata, index, Service::KIND)?;
            self.services.push(svc);
        } else if (api, kind) == (EndpointSlice::API_VERSION, EndpointSlice::KIND) {
            let mut slice: EndpointSlice = typed(value, index, EndpointSlice::KIND)?;
            named(&mut slice.metadata, index, EndpointSlice::KIND)?;
            self.slices.push(slice);
        } else if kind == "List" {
            if let Some(Value::Sequence(items)) = value.get("items") {
                for item in items.clone() {
                    self.add(item, index)?;
                }
            }
        } else {
            self.skipped.push(Skipped {
                index,
                api_version: api.to_string(),
                kind: kind.to_string(),
            });
        }
        Ok(())
    }
}

/// Requires a name; defaults the namespace.
fn named(meta: &mut ObjectMeta, index: usize, kind: &'static str) -> Result<()> {
    if meta.name.as_deref().unwrap_or("").is_empty() {
        return Err(Error::NoName { index, kind });
    }
    meta.namespace.get_or_insert_with(|| "default".into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{port: 80, targetPort: 8080}]\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: prod}\naddressType: IPv4\nendpoints: [{addresses: [10.244.1.2]}]\n";

    #[test]
    fn empty_documents_are_skipped_and_indexes_count_every_document() {
        // A leading `---` opens the first document; `---\n---` holds an empty one.
        let text = format!("---\n{WEB}---\n---\n{}", WEB.replace("port: 80", "port: x"));
        let err = documents::<Service>(&text).unwrap_err();
        assert!(matches!(err, Error::Schema { index: 3, .. }), "{err:?}");
        assert_eq!(err.to_string(), "document 3: Service at spec.ports[0].port");
        assert!(
            err.source().unwrap().to_string().contains("invalid type"),
            "{:?}",
            err.source()
        );
        assert_eq!(
            documents::<Service>(&format!("---\n{WEB}---\n"))
                .unwrap()
                .len(),
            1
        );
        assert!(documents::<Service>("").unwrap().is_empty());
    }

    #[test]
    fn a_syntax_error_names_its_document_and_keeps_the_line() {
        let err = documents::<Value>(&format!("{WEB}---\nmetadata: [oops\n")).unwrap_err();
        assert!(matches!(err, Error::Syntax { index: 2, .. }), "{err:?}");
        assert!(
            err.source().unwrap().to_string().contains("line"),
            "{err:?}"
        );
    }

    #[test]
    fn objects_split_by_kind_with_lists_defaults_and_the_rest_skipped() {
        let list = "apiVersion: v1\nkind: List\nitems:\n  - {apiVersion: v1, kind: Service, metadata: {name: dns, namespace: kube-system}}\n";
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
        let old = SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1");
        let text = format!("{WEB}---\n{SLICE}---\n{list}---\n{cm}---\n{old}");
        let o = objects(&text).unwrap();
        let names: Vec<_> = o
            .services
            .iter()
            .map(|s| {
                (
                    s.metadata.namespace.clone().unwrap(),
                    s.metadata.name.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("default".to_string(), "web".to_string()),
                ("kube-system".to_string(), "dns".to_string())
            ]
        );
        assert_eq!(o.slices.len(), 1);
        assert_eq!(o.slices[0].metadata.namespace.as_deref(), Some("prod"));
        assert_eq!(o.slices[0].endpoints.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            o.skipped,
            [
                Skipped {
                    index: 4,
                    api_version: "v1".into(),
                    kind: "ConfigMap".into()
                },
                Skipped {
                    index: 5,
                    api_version: "discovery.k8s.io/v1beta1".into(),
                    kind: "EndpointSlice".into()
                },
            ]
        );
    }

    #[test]
    fn a_nameless_or_invalid_object_rejects_the_text() {
        let nameless = "apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n";
        assert!(matches!(
            objects(nameless),
            Err(Error::NoName {
                index: 1,
                kind: "Service"
            })
        ));
        let bad = SLICE.replace("addressType: IPv4", "addressType: [IPv4]");
        let err = objects(&format!("{WEB}---\n{bad}")).unwrap_err();
        assert!(
            matches!(&err, Error::Schema { index: 2, kind, .. } if kind == "EndpointSlice"),
            "{err:?}"
        );
    }
}
