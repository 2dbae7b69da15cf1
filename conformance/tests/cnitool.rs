//! Upstream `cnitool` v1.3.1 drives `tabby` from a conflist in a
//! `NETCONFPATH` directory, with `CNI_PATH` holding tabby and the upstream
//! reference plugins, as a user trying the plugin by hand does (README):
//! `add`, `check`, `status`, `del`, `del` again, and `gc`.
//!
//! cnitool keeps libcni's result cache in the fixed `/var/lib/cni`; each
//! call runs in a private mount namespace where a temp dir of the test is
//! bind-mounted there, so the tests run in parallel and leave nothing on the
//! machine. The network name is unique per test.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use tabby_conformance::{
    assert_gone, assert_tabby_pod, conflist, files_mentioning, k8s_args, plugins_dir, ready,
    release_dir, require_upstream, result_ipv4, tabby_plugin, unique_octet, with_bind_mounts,
};
use tabby_testkit::{unique, Netns};

/// cnitool with its environment, its network namespace and its cache.
struct Cnitool {
    netconfpath: PathBuf,
    cache: PathBuf,
    host: PathBuf,
    network: String,
}

impl Cnitool {
    /// Writes a conflist named `network` into `dir/net.d`.
    fn new(dir: &Path, host: &Netns, network: &str, list: &Value) -> Cnitool {
        let netconfpath = dir.join("net.d");
        let cache = dir.join("cache");
        for d in [&netconfpath, &cache] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut list = list.clone();
        list["name"] = network.into();
        std::fs::write(
            netconfpath.join("10-tabby.conflist"),
            serde_json::to_vec_pretty(&list).unwrap(),
        )
        .unwrap();
        Cnitool {
            netconfpath,
            cache,
            host: host.path(),
            network: network.to_string(),
        }
    }

    /// `cnitool VERB NETWORK POD` in the host namespace; its output.
    fn run(&self, verb: &str, pod: &Netns, cni_args: &str) -> Output {
        let binds = [(self.cache.as_path(), "/var/lib/cni")];
        let mut cmd = with_bind_mounts(&binds, &self.host, &plugins_dir().join("cnitool"));
        cmd.args([verb, &self.network]).arg(pod.path());
        let cni_path = format!("{}:{}", release_dir().display(), plugins_dir().display());
        cmd.env("NETCONFPATH", &self.netconfpath)
            .env("CNI_PATH", cni_path);
        if !cni_args.is_empty() {
            cmd.env("CNI_ARGS", cni_args);
        }
        cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
    }

    fn run_ok(&self, verb: &str, pod: &Netns, cni_args: &str) -> String {
        let out = self.run(verb, pod, cni_args);
        assert!(
            out.status.success(),
            "cnitool {verb} {}: {}",
            self.network,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn ready_with_cnitool(test: &str) -> bool {
    ready(test) && require_upstream(test, &["cnitool"])
}

#[test]
fn cnitool_add_check_status_del_del() {
    if !ready_with_cnitool("cnitool_add_check_status_del_del") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (host, pod) = (Netns::new("tcf-ct-host"), Netns::new("tcf-ct-pod"));
    let cidr = format!("10.{}.0.0/16", unique_octet());
    let list = conflist("1.1.0", vec![tabby_plugin(dir.path(), &cidr)]);
    let tool = Cnitool::new(dir.path(), &host, &unique("cnitool"), &list);
    let args = k8s_args("by-hand");

    let out = tool.run_ok("add", &pod, &args);
    let result: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("cnitool add printed no JSON result ({e}): {out}"));
    assert_eq!(result["cniVersion"], "1.1.0", "result: {result}");
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 address in {result}"));
    assert_tabby_pod(&host, &pod, ip);
    assert!(
        !files_mentioning(&tool.cache, &ip.to_string()).is_empty(),
        "libcni cached no result in the test's /var/lib/cni"
    );

    tool.run_ok("check", &pod, &args);
    tool.run_ok("status", &pod, "");
    tool.run_ok("del", &pod, &args);
    let store = dir.path().join("datastore");
    assert_gone(&host, &pod, ip, &store, "cnitool-");
    assert!(
        files_mentioning(&tool.cache, &ip.to_string()).is_empty(),
        "libcni's cache still holds the deleted attachment"
    );
    tool.run_ok("del", &pod, &args);
}

/// `cnitool gc` passes no valid attachments: libcni DELs every cached
/// attachment of the network, then sends GC without
/// `cni.dev/valid-attachments` (the spec says the runtime must send it).
/// Whatever tabby answers to that GC, the attachment is gone; if tabby
/// refuses, its error names the missing key.
#[test]
fn cnitool_gc_deletes_the_cached_attachment() {
    if !ready_with_cnitool("cnitool_gc_deletes_the_cached_attachment") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (host, pod) = (Netns::new("tcf-cg-host"), Netns::new("tcf-cg-pod"));
    let cidr = format!("10.{}.0.0/16", unique_octet());
    let list = conflist("1.1.0", vec![tabby_plugin(dir.path(), &cidr)]);
    let tool = Cnitool::new(dir.path(), &host, &unique("cnigc"), &list);
    let out = tool.run_ok("add", &pod, "");
    let result: Value = serde_json::from_str(&out).unwrap();
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 address in {result}"));
    assert_tabby_pod(&host, &pod, ip);

    let gc = tool.run("gc", &pod, "");
    let stderr = String::from_utf8_lossy(&gc.stderr);
    assert!(
        gc.status.success() || stderr.contains("cni.dev/valid-attachments"),
        "cnitool gc failed without naming the missing valid attachments: {stderr}"
    );
    assert_gone(&host, &pod, ip, &dir.path().join("datastore"), "cnitool-");
    assert!(
        files_mentioning(&tool.cache, &ip.to_string()).is_empty(),
        "libcni's cache still holds the collected attachment"
    );
}
