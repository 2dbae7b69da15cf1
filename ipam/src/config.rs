//! The one place that turns a datastore config into a backend, for the
//! conflist (`ipam.datastore`), `tabby-node` and `tabbyctl`:
//!
//! ```json
//! {"type": "file", "path": "/var/lib/tabby/datastore"}
//! {"type": "kubernetes", "kubeconfig": "/etc/cni/net.d/tabby-kubeconfig"}
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::datastore::{Datastore, Result};
use crate::file::{FileDatastore, DEFAULT_PATH};
use crate::kubernetes::{KubeDatastore, KubeOptions};

/// Which backend, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DatastoreConfig {
    /// A directory on this host.
    File {
        /// The directory (default `/var/lib/tabby/datastore`).
        #[serde(default = "default_path")]
        path: PathBuf,
    },
    /// The Kubernetes API (CRDs and Node annotations).
    Kubernetes(KubeOptions),
}

fn default_path() -> PathBuf {
    DEFAULT_PATH.into()
}

impl Default for DatastoreConfig {
    fn default() -> Self {
        Self::File {
            path: default_path(),
        }
    }
}

impl DatastoreConfig {
    /// The file backend in `path`.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::File { path: path.into() }
    }

    /// The Kubernetes backend through `kubeconfig` (`None`: `$KUBECONFIG`,
    /// `~/.kube/config`, or in-cluster).
    pub fn kubernetes(kubeconfig: Option<PathBuf>) -> Self {
        Self::Kubernetes(KubeOptions {
            kubeconfig,
            scope: None,
        })
    }

    /// Opens the backend (the file backend creates its directory; the
    /// Kubernetes backend reads its kubeconfig but sends no request yet).
    pub fn open(&self) -> Result<Box<dyn Datastore>> {
        Ok(match self {
            Self::File { path } => Box::new(FileDatastore::open(path)?),
            Self::Kubernetes(options) => Box::new(KubeDatastore::open(options)?),
        })
    }
}

/// Opens the backend `config` names (see [`DatastoreConfig::open`]).
pub fn datastore_from_config(config: &DatastoreConfig) -> Result<Box<dyn Datastore>> {
    config.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_from_the_conflist_form() {
        let file: DatastoreConfig = serde_json::from_str(r#"{"type":"file","path":"/x"}"#).unwrap();
        assert_eq!(file, DatastoreConfig::file("/x"));
        let default: DatastoreConfig = serde_json::from_str(r#"{"type":"file"}"#).unwrap();
        assert_eq!(default, DatastoreConfig::default());
        let kube: DatastoreConfig = serde_json::from_str(
            r#"{"type":"kubernetes","kubeconfig":"/etc/cni/net.d/tabby-kubeconfig"}"#,
        )
        .unwrap();
        assert_eq!(
            kube,
            DatastoreConfig::kubernetes(Some("/etc/cni/net.d/tabby-kubeconfig".into()))
        );
        assert!(serde_json::from_str::<DatastoreConfig>(r#"{"type":"etcd"}"#).is_err());
        assert!(serde_json::from_str::<DatastoreConfig>(
            r#"{"type":"kubernetes","kubeconfg":"x"}"#
        )
        .is_err());
    }

    #[test]
    fn a_missing_kubeconfig_is_unavailable_with_its_path() {
        let config = DatastoreConfig::kubernetes(Some("/nonexistent/kubeconfig".into()));
        let Err(err) = config.open() else {
            panic!("opened a missing kubeconfig");
        };
        assert!(
            matches!(err, crate::DatastoreError::Unavailable { ref location, .. } if location == "/nonexistent/kubeconfig"),
            "{err:?}"
        );
    }
}
