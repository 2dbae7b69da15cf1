//! `apply -f` / `delete -f`: Kubernetes objects kept as one YAML file each in
//! `<state>/resources/` (`<kind>-<namespace>-<name>.yaml`), the directory the
//! node agents watch; plus the EndpointSlices derived from the lab's pods.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

use crate::cni::POD_NAMESPACE;
use crate::endpoints::{derive_endpoint_slices, is_derived, EndpointPod};
use crate::state::{write_atomic, LabState};

/// The identity of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKey {
    /// e.g. `Service`.
    pub kind: String,
    /// `metadata.namespace`, `default` when absent.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// Reads kind and metadata from an object.
    pub fn of(object: &Value) -> anyhow::Result<ObjectKey> {
        let kind = object["kind"].as_str().context("an object without kind")?;
        let name = object["metadata"]["name"]
            .as_str()
            .with_context(|| format!("a {kind} without metadata.name"))?;
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        for part in [kind, name, namespace] {
            anyhow::ensure!(
                !part.is_empty() && !part.contains('/') && !part.starts_with('.'),
                "{kind} {namespace}/{name}: unusable as a file name"
            );
        }
        Ok(ObjectKey {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// The object's file name, e.g. `service-default-web.yaml`.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}-{}.yaml",
            self.kind.to_ascii_lowercase(),
            self.namespace,
            self.name
        )
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The objects of a multi-document YAML text (empty documents skipped;
/// `kind: List` expanded into its items).
pub fn parse_documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut objects = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).with_context(|| format!("YAML document {}", i + 1))?;
        match value {
            Value::Null => {}
            v if v["kind"] == "List" => {
                objects.extend(v["items"].as_array().cloned().unwrap_or_default())
            }
            v => objects.push(v),
        }
    }
    Ok(objects)
}

/// Reads a file of objects, `-` meaning stdin.
pub fn read_objects(file: &Path) -> anyhow::Result<Vec<Value>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    parse_documents(&text).with_context(|| format!("parsing {}", file.display()))
}

/// Writes each object into `dir`; returns their keys.
pub fn apply(dir: &Path, objects: &[Value]) -> anyhow::Result<Vec<ObjectKey>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Validate every object before writing any.
    let keys = objects
        .iter()
        .map(ObjectKey::of)
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (key, object) in keys.iter().zip(objects) {
        write_object(dir, key, object)?;
    }
    Ok(keys)
}

/// Removes each object's file from `dir`; returns the keys with whether a
/// file was there.
pub fn delete(dir: &Path, objects: &[Value]) -> anyhow::Result<Vec<(ObjectKey, bool)>> {
    let keys = objects
        .iter()
        .map(ObjectKey::of)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for key in keys {
        let path = dir.join(key.file_name());
        let existed = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        };
        out.push((key, existed));
    }
    Ok(out)
}

fn write_object(dir: &Path, key: &ObjectKey, object: &Value) -> anyhow::Result<PathBuf> {
    let path = dir.join(key.file_name());
    let yaml = serde_norway::to_string(object).with_context(|| format!("encoding {key}"))?;
    write_atomic(&path, yaml.as_bytes())?;
    Ok(path)
}

/// Every object stored in `dir` with its file.
fn stored_objects(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Value)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        for object in
            parse_documents(&text).with_context(|| format!("parsing {}", path.display()))?
        {
            out.push((path.clone(), object));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Rewrites the derived EndpointSlices in `dir` from the applied Services
/// and the lab's pods; removes derived slices of Services that are gone.
/// Returns how many slices were written.
pub fn sync_endpoint_slices(dir: &Path, state: &LabState) -> anyhow::Result<usize> {
    let stored = stored_objects(dir)?;
    let objects: Vec<Value> = stored.iter().map(|(_, o)| o.clone()).collect();
    let pods: Vec<EndpointPod<'_>> = state
        .pods
        .iter()
        .map(|p| EndpointPod {
            name: &p.name,
            namespace: POD_NAMESPACE,
            node: &p.node,
            ip: p.ip,
            labels: &p.labels,
            ready: p.ready,
        })
        .collect();
    let slices = derive_endpoint_slices(&objects, &pods);
    let mut wanted = BTreeSet::new();
    for slice in &slices {
        let key = ObjectKey::of(slice)?;
        wanted.insert(dir.join(key.file_name()));
        let path = dir.join(key.file_name());
        // Unchanged slices are not rewritten, so watchers see no event.
        let current = stored.iter().find(|(p, _)| *p == path).map(|(_, o)| o);
        if current != Some(slice) {
            write_object(dir, &key, slice)?;
        }
    }
    for (path, object) in &stored {
        if is_derived(object) && !wanted.contains(path) {
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(slices.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PodState;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector:\n    app: echo\n  ports:\n  - port: 80\n    targetPort: 8080\n---\n---\nkind: EndpointSlice\nmetadata:\n  name: manual\n  namespace: prod\n";

    #[test]
    fn multi_document_yaml_yields_one_file_per_object() {
        let objects = parse_documents(SERVICE).unwrap();
        assert_eq!(objects.len(), 2);
        let keys: Vec<String> = objects
            .iter()
            .map(|o| ObjectKey::of(o).unwrap().file_name())
            .collect();
        assert_eq!(
            keys,
            ["service-default-web.yaml", "endpointslice-prod-manual.yaml"]
        );
        assert!(ObjectKey::of(&serde_json::json!({"kind": "Service"})).is_err());
    }

    #[test]
    fn apply_writes_delete_removes_and_slices_follow_the_pods() {
        let dir = tempfile::tempdir().unwrap();
        let objects = parse_documents(SERVICE).unwrap();
        apply(dir.path(), &objects).unwrap();
        let mut state = LabState::default();
        state.pods.push(PodState {
            name: "node-1-pod1".into(),
            node: "node-1".into(),
            netns: "tabby-pod-node-1-pod1".into(),
            container_id: "node-1-pod1".into(),
            ip: Some([10, 244, 0, 1].into()),
            labels: [("app".to_string(), "echo".to_string())].into(),
            echo: None,
            ready: true,
        });
        assert_eq!(sync_endpoint_slices(dir.path(), &state).unwrap(), 1);
        let slice_file = dir.path().join("endpointslice-default-web-tabby-lab.yaml");
        let text = fs::read_to_string(&slice_file).unwrap();
        assert!(text.contains("10.244.0.1"), "{text}");

        // The Service goes: its derived slice goes too; the manual one stays.
        let deleted = delete(dir.path(), &objects[..1]).unwrap();
        assert!(deleted[0].1);
        assert_eq!(sync_endpoint_slices(dir.path(), &state).unwrap(), 0);
        assert!(!slice_file.exists());
        assert!(dir.path().join("endpointslice-prod-manual.yaml").exists());
        assert!(!delete(dir.path(), &objects[..1]).unwrap()[0].1);
    }
}
