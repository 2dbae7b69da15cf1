//! The one thing the CNI plugin reads about a pod: its annotations
//! (`tabby.dev/ipv4pools`, `tabby.dev/ipAddrs`), through the datastore's
//! client so that the plugin opens one kubeconfig and one connection.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use super::{KubeDatastore, Missing};
use crate::datastore::Result;

impl KubeDatastore {
    /// The annotations of pod `namespace/name`; `None` when the pod does
    /// not exist. Reads only the object's metadata (`get` on pods).
    pub fn pod_annotations(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>> {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        self.run(|inner| async move {
            let api: Api<Pod> = Api::namespaced(inner.client.clone(), &namespace);
            let key = format!("pod {namespace}/{name}");
            let meta = api
                .get_metadata_opt(&name)
                .await
                .map_err(|e| inner.error(&key, e, Missing::NotFound))?;
            Ok(meta.map(|m| m.metadata.annotations.unwrap_or_default()))
        })
    }
}
