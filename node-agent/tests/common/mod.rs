//! Shared by the cluster tests: the shared control plane with
//! `deploy/tabby.yaml` applied once, ServiceAccount tokens, `kubectl auth
//! can-i`, Nodes as a kubelet makes them, and the release binaries.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tabby_testkit::kube::{shared, ControlPlane};

/// Where the manifest's ServiceAccounts live.
pub const NAMESPACE: &str = "kube-system";
/// The agent's ServiceAccount.
pub const AGENT_SA: &str = "tabby-node";
/// The plugin's ServiceAccount.
pub const PLUGIN_SA: &str = "tabby-plugin";

/// `deploy/tabby.yaml`.
pub fn manifest() -> PathBuf {
    tabby_testkit::bins::workspace_root().join("deploy/tabby.yaml")
}

/// The shared control plane after `kubectl apply --dry-run=server` and
/// then `kubectl apply` of the manifest, with every CRD Established.
pub fn installed() -> &'static ControlPlane {
    static APPLIED: OnceLock<Result<(), String>> = OnceLock::new();
    let cp = shared();
    let applied = APPLIED.get_or_init(|| {
        let path = manifest();
        let file = path.to_str().expect("a UTF-8 path");
        let dry = cp
            .kubectl(&["apply", "--dry-run=server", "-f", file])
            .map_err(|e| format!("dry run: {}", tabby_testkit::error_chain(&e)))?;
        eprintln!("dry run:\n{dry}");
        cp.kubectl(&["apply", "-f", file])
            .map_err(|e| format!("apply: {}", tabby_testkit::error_chain(&e)))?;
        let crds = tabby_testkit::bins::workspace_root().join("deploy/crds.yaml");
        cp.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            crds.to_str().expect("a UTF-8 path"),
        ])
        .map_err(|e| format!("wait for the CRDs: {}", tabby_testkit::error_chain(&e)))?;
        Ok(())
    });
    if let Err(e) = applied {
        panic!("deploy/tabby.yaml did not install: {e}");
    }
    cp
}

/// A token of ServiceAccount `sa` (kube-system), minted by the admin.
pub fn token(cp: &ControlPlane, sa: &str) -> String {
    cp.kubectl(&["-n", NAMESPACE, "create", "token", sa, "--duration=1h"])
        .unwrap_or_else(|e| panic!("a token for {sa}: {}", tabby_testkit::error_chain(&e)))
        .trim()
        .to_string()
}

/// A kubeconfig at `dir/<name>` that authenticates with `token`.
pub fn token_kubeconfig(cp: &ControlPlane, dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(name);
    cp.write_token_kubeconfig(&path, token).unwrap_or_else(|e| {
        panic!(
            "write {}: {}",
            path.display(),
            tabby_testkit::error_chain(&e)
        )
    });
    path
}

/// `kubectl auth can-i ARGS --as system:serviceaccount:kube-system:<sa>`.
pub fn can_i(cp: &ControlPlane, sa: &str, args: &[&str]) -> bool {
    let out = Command::new(tabby_testkit::bins::upstream_bin("kubectl"))
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .args(["auth", "can-i"])
        .args(args)
        .arg(format!("--as=system:serviceaccount:{NAMESPACE}:{sa}"))
        .output()
        .expect("run kubectl auth can-i");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match answer.as_str() {
        "yes" => true,
        "no" => false,
        _ => panic!(
            "kubectl auth can-i {args:?} as {sa}: {answer:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A release binary of the workspace (`TABBY_BIN_DIR`, else target/release).
pub fn bin(name: &str) -> PathBuf {
    if name == "tabby-node" {
        return PathBuf::from(env!("CARGO_BIN_EXE_tabby-node"));
    }
    tabby_testkit::bins::release_bin(name)
}

/// A runtime for the async kube client in a sync test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Creates Node `name` as a kubelet would, in Tabby scope `scope` (its
/// label), with `annotations` and the InternalIP `internal_ip`.
pub async fn create_node(
    nodes: &Api<Node>,
    scope: &str,
    name: &str,
    annotations: serde_json::Value,
    internal_ip: &str,
) {
    let object: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {"tabby.dev/scope": scope},
            "annotations": annotations,
        }
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &object).await.unwrap();
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": internal_ip}]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Merges `annotations` into Node `name`'s (a `null` value removes one).
pub async fn annotate_node(nodes: &Api<Node>, name: &str, annotations: serde_json::Value) {
    let patch = json!({"metadata": {"annotations": annotations}});
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}
