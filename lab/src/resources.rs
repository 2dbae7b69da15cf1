//! `apply -f` / `delete -f`: Kubernetes objects kept as one YAML file each in
//! `<state>/resources/` (`<kind>-<namespace>-<name>.yaml`), the directory the
//! node agents watch; plus the EndpointSlices derived from the lab's pods.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Resource;
use tabby_proxy::yaml;

use crate::cni::POD_NAMESPACE;
use crate::endpoints::{derive_endpoint_slices, is_derived, EndpointPod};
use crate::state::{write_atomic, LabState};

/// An object the lab keeps: what the agents' proxies read.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A v1 Service.
    Service(Box<Service>),
    /// A discovery.k8s.io/v1 EndpointSlice.
    Slice(Box<EndpointSlice>),
}

impl Object {
    /// Its kind and metadata.
    fn meta(&self) -> (&'static str, &ObjectMeta) {
        match self {
            Self::Service(s) => (Service::KIND, &s.metadata),
            Self::Slice(s) => (EndpointSlice::KIND, &s.metadata),
        }
    }

    /// The object as YAML (with its apiVersion and kind).
    fn to_yaml(&self) -> Result<String, serde_norway::Error> {
        match self {
            Self::Service(s) => serde_norway::to_string(s),
            Self::Slice(s) => serde_norway::to_string(s),
        }
    }
}

/// The identity of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKey {
    /// `Service` or `EndpointSlice`.
    pub kind: String,
    /// `metadata.namespace`, `default` when absent.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// Reads kind and metadata from an object.
    pub fn of(object: &Object) -> anyhow::Result<ObjectKey> {
        let (kind, meta) = object.meta();
        let name = meta
            .name
            .as_deref()
            .with_context(|| format!("a {kind} without metadata.name"))?;
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        for part in [name, namespace] {
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

/// The Services and EndpointSlices of a multi-document YAML text, and the
/// documents of other kinds.
fn split(text: &str) -> Result<(Vec<Object>, Vec<yaml::Skipped>), yaml::Error> {
    let o = yaml::objects(text)?;
    let services = o.services.into_iter().map(|s| Object::Service(Box::new(s)));
    let slices = o.slices.into_iter().map(|s| Object::Slice(Box::new(s)));
    Ok((services.chain(slices).collect(), o.skipped))
}

/// The objects of a multi-document YAML text to apply: Services, then
/// EndpointSlices (empty documents skipped; `kind: List` expanded). Any
/// other kind is an error, so nothing of a file is applied in part.
pub fn parse_documents(text: &str) -> anyhow::Result<Vec<Object>> {
    let (objects, skipped) = split(text)?;
    if let Some(s) = skipped.first() {
        anyhow::bail!(
            "document {}: apiVersion {:?} kind {:?}: the lab applies only {} {} and {} {} objects",
            s.index,
            s.api_version,
            s.kind,
            Service::API_VERSION,
            Service::KIND,
            EndpointSlice::API_VERSION,
            EndpointSlice::KIND,
        );
    }
    Ok(objects)
}

/// Reads a file of objects, `-` meaning stdin.
pub fn read_objects(file: &Path) -> anyhow::Result<Vec<Object>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    parse_documents(&text).with_context(|| format!("parsing {}", file.display()))
}

/// Writes each object into `dir`; returns their keys.
pub fn apply(dir: &Path, objects: &[Object]) -> anyhow::Result<Vec<ObjectKey>> {
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
pub fn delete(dir: &Path, objects: &[Object]) -> anyhow::Result<Vec<(ObjectKey, bool)>> {
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

fn write_object(dir: &Path, key: &ObjectKey, object: &Object) -> anyhow::Result<PathBuf> {
    let path = dir.join(key.file_name());
    let yaml = object
        .to_yaml()
        .with_context(|| format!("encoding {key}"))?;
    write_atomic(&path, yaml.as_bytes())?;
    Ok(path)
}

/// Every object stored in `dir` with its file (other kinds ignored, as the
/// agents ignore them).
fn stored_objects(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Object)>> {
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
        let (objects, _) = split(&text).with_context(|| format!("parsing {}", path.display()))?;
        for object in objects {
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
    let services: Vec<Service> = stored
        .iter()
        .filter_map(|(_, o)| match o {
            Object::Service(s) => Some(s.as_ref().clone()),
            Object::Slice(_) => None,
        })
        .collect();
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
    let slices = derive_endpoint_slices(&services, &pods);
    let count = slices.len();
    let mut wanted = BTreeSet::new();
    for slice in slices.into_iter().map(|s| Object::Slice(Box::new(s))) {
        let key = ObjectKey::of(&slice)?;
        wanted.insert(dir.join(key.file_name()));
        let path = dir.join(key.file_name());
        // Unchanged slices are not rewritten, so watchers see no event.
        let current = stored.iter().find(|(p, _)| *p == path).map(|(_, o)| o);
        if current != Some(&slice) {
            write_object(dir, &key, &slice)?;
        }
    }
    for (path, object) in &stored {
        let derived = matches!(object, Object::Slice(s) if is_derived(s));
        if derived && !wanted.contains(path) {
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PodState;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector:\n    app: echo\n  ports:\n  - port: 80\n    targetPort: 8080\n---\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: manual\n  namespace: prod\naddressType: IPv4\n";

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
        let nameless = parse_documents("apiVersion: v1\nkind: Service\nmetadata: {}\n");
        assert!(format!("{:#}", nameless.unwrap_err()).contains("no metadata.name"));
        let other = parse_documents(&format!("{SERVICE}---\napiVersion: v1\nkind: Pod\n"));
        let err = format!("{:#}", other.unwrap_err());
        assert!(
            err.contains("document 4: apiVersion \"v1\" kind \"Pod\""),
            "{err}"
        );
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
