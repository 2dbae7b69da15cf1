//! The cluster's kubectl with the admin kubeconfig: what `tabby-lab
//! kubectl` runs, and the lab's own queries while it waits for the cluster.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};

use anyhow::Context;
use serde_json::Value;

use super::upstream;
use crate::sh;
use crate::state::StateDir;

/// kubectl with `--kubeconfig <state>/kubeconfig`.
#[derive(Debug, Clone)]
pub struct Kubectl {
    program: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    /// The lab's kubectl (the upstream binary).
    pub fn new(dir: &StateDir) -> anyhow::Result<Kubectl> {
        Ok(Kubectl {
            program: upstream("kubectl")?,
            kubeconfig: dir.kubeconfig(),
        })
    }

    /// `kubectl --kubeconfig K ARGS...`, ready to run.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd
    }

    /// Runs kubectl with the caller's stdin, stdout and stderr.
    pub fn interactive<S: AsRef<OsStr>>(&self, args: &[S]) -> anyhow::Result<ExitStatus> {
        self.command(args)
            .status()
            .with_context(|| format!("running {}", self.program.display()))
    }

    /// Runs kubectl and returns its stdout; fails with its stderr.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> anyhow::Result<String> {
        sh::run(self.command(args))
    }

    /// `kubectl get ARGS -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let out = self.run(&all)?;
        serde_json::from_str(&out).context("parsing kubectl's JSON")
    }

    /// Whether `/readyz` answers `ok`.
    pub fn ready(&self) -> bool {
        self.run(&["get", "--raw", "/readyz", "--request-timeout=3s"])
            .is_ok_and(|out| out.trim() == "ok")
    }

    /// The nodes by name, with whether each is Ready.
    pub fn nodes(&self) -> anyhow::Result<Vec<(String, bool)>> {
        let list = self.get_json(&["nodes"])?;
        Ok(node_readiness(&list))
    }
}

/// Name and Ready condition of every node in a `NodeList`.
pub fn node_readiness(list: &Value) -> Vec<(String, bool)> {
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|node| {
                    let name = node["metadata"]["name"].as_str().unwrap_or("").to_string();
                    let ready = node["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True");
                    (name, ready)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The message of a node's Ready condition (why it is not ready).
pub fn ready_message(list: &Value, node: &str) -> Option<String> {
    let item = list["items"]
        .as_array()?
        .iter()
        .find(|n| n["metadata"]["name"] == node)?;
    let cond = item["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?;
    cond["message"].as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_comes_from_the_ready_condition() {
        let list = serde_json::json!({"items": [
            {"metadata": {"name": "node-1"}, "status": {"conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "True", "message": "kubelet is posting ready status"}]}},
            {"metadata": {"name": "node-2"}, "status": {"conditions": [
                {"type": "Ready", "status": "False", "message": "container runtime network not ready"}]}},
            {"metadata": {"name": "node-3"}, "status": {}}
        ]});
        assert_eq!(
            node_readiness(&list),
            vec![
                ("node-1".to_string(), true),
                ("node-2".to_string(), false),
                ("node-3".to_string(), false)
            ]
        );
        assert_eq!(
            ready_message(&list, "node-2").as_deref(),
            Some("container runtime network not ready")
        );
        assert_eq!(ready_message(&list, "node-3"), None);
    }
}
