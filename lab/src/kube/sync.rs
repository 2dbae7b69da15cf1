//! `--cni tabby`: the cluster's Services and EndpointSlices for the
//! agents' embedded proxies. main's proxy reads its cluster state from a
//! directory of YAML only (`FileClusterState`; the Kubernetes source is not
//! there yet), so a small relay lists both kinds from the apiserver and
//! writes them into the lab's resources directory, which every node's
//! agent watches (as in the namespace lab).
//!
//! ```text
//!  kube-apiserver ──list every 300 ms──▶ tabby-lab sync-resources
//!      ──<state>/resources/cluster.yaml (atomic, on change)──▶ tabby-node [proxy] × N
//! ```

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::state::write_atomic;

/// The file the relay writes in the resources directory.
pub const FILE: &str = "cluster.yaml";
/// Time between two lists.
const INTERVAL: Duration = Duration::from_millis(300);

/// Relays forever (until killed); a failed list is logged and retried.
pub fn serve(kubeconfig: &Path, dir: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    runtime.block_on(relay(kubeconfig, dir))
}

async fn relay(kubeconfig: &Path, dir: &Path) -> anyhow::Result<()> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await
            .context("loading the kubeconfig")?;
    let client = kube::Client::try_from(config).context("making a Kubernetes client")?;
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(FILE);
    let mut last = String::new();
    loop {
        match snapshot(&services, &slices).await {
            Ok(text) if text != last => {
                write_atomic(&path, text.as_bytes())?;
                eprintln!(
                    "sync-resources: wrote {} ({} bytes)",
                    path.display(),
                    text.len()
                );
                last = text;
            }
            Ok(_) => {}
            Err(e) => eprintln!("sync-resources: {e:#}"),
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// Every Service and EndpointSlice as `---`-separated YAML documents, in
/// the apiserver's order (by namespace and name), without managedFields.
async fn snapshot(services: &Api<Service>, slices: &Api<EndpointSlice>) -> anyhow::Result<String> {
    let lp = ListParams::default();
    let mut docs = Vec::new();
    for mut svc in services.list(&lp).await.context("listing Services")?.items {
        svc.metadata.managed_fields = None;
        docs.push(document(&svc)?);
    }
    for mut slice in slices
        .list(&lp)
        .await
        .context("listing EndpointSlices")?
        .items
    {
        slice.metadata.managed_fields = None;
        docs.push(document(&slice)?);
    }
    Ok(docs.join("---\n"))
}

fn document(object: &impl Serialize) -> anyhow::Result<String> {
    serde_norway::to_string(object).context("writing YAML")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_becomes_a_document_with_its_kind() {
        let mut svc = Service::default();
        svc.metadata.name = Some("hello".into());
        let doc = document(&svc).unwrap();
        assert!(doc.contains("kind: Service"), "{doc}");
        assert!(doc.contains("apiVersion: v1"), "{doc}");
        assert!(doc.contains("name: hello"), "{doc}");
    }
}
