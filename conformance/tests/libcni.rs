//! CNI conformance through libcni v1.3.1 (the runtime library of containerd
//! and CRI-O), with the upstream reference plugins v1.10 as peers:
//! - `tabby` delegating to upstream `host-local` IPAM;
//! - upstream `ptp` using `tabby-ipam`;
//! - every supported cniVersion gets a result in that version (1.1.0
//!   unadapted);
//! - GC: libcni DELs the stale cached attachments and tabby's own GC (with
//!   `cni.dev/valid-attachments`) releases one libcni no longer knows;
//! - STATUS answers through libcni, and fails when the datastore is gone.
//!
//! Each test runs in its own "host" and pod namespaces (deleted on drop) with
//! its own temp datastore, so tests run in parallel and never touch the host.

use std::net::Ipv4Addr;

use serde_json::{json, Value};
use tabby_conformance::{
    assert_gone, assert_tabby_pod, conflist, files_mentioning, k8s_args, plugins_dir, ready,
    release_dir, result_ipv4, tabby_ipam, tabby_plugin, unique_octet, Driver,
};
use tabby_testkit::{unique, Netns};

#[test]
fn tabby_uses_upstream_host_local_as_its_ipam() {
    if !ready("tabby_uses_upstream_host_local_as_its_ipam") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (host, pod) = (Netns::new("tcf-hl-host"), Netns::new("tcf-hl-pod"));
    let subnet = format!("10.{}.7.0/24", unique_octet());
    let store = dir.path().join("host-local");
    let plugin = json!({
        "type": "tabby", "nodename": "node-a", "mtu": 1450, "log_file": dir.path().join("cni.log"),
        "ipam": {"type": "host-local", "dataDir": store, "ranges": [[{"subnet": subnet}]]},
    });
    let cni = Driver::new(
        &host,
        dir.path(),
        &conflist("1.1.0", vec![plugin]),
        &[&release_dir(), &plugins_dir()],
    );
    let id = unique("hostlocal");
    let args = k8s_args(&id);
    let extra = ["--args", args.as_str()];

    let result = cni.add(&pod, &id, &extra);
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 address in {result}"));
    assert!(
        ip.to_string().starts_with(subnet.trim_end_matches("0/24")),
        "{ip} is not from host-local's {subnet}"
    );
    assert_tabby_pod(&host, &pod, ip);
    assert!(
        !files_mentioning(&store, &id).is_empty(),
        "host-local recorded no allocation for {id}"
    );

    cni.check(&pod, &id, &extra);
    cni.del(&pod, &id, &extra);
    assert_gone(&host, &pod, ip, &store, &id);
    // A second DEL must succeed too.
    cni.del(&pod, &id, &extra);
}

#[test]
fn upstream_ptp_uses_tabby_ipam() {
    if !ready("upstream_ptp_uses_tabby_ipam") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (host, pod) = (Netns::new("tcf-ptp-host"), Netns::new("tcf-ptp-pod"));
    let cidr = format!("10.{}.0.0/16", unique_octet());
    let plugin = json!({"type": "ptp", "mtu": 1450, "ipam": tabby_ipam(dir.path(), &cidr)});
    let cni = Driver::new(
        &host,
        dir.path(),
        &conflist("1.1.0", vec![plugin]),
        &[&release_dir(), &plugins_dir()],
    );
    let id = unique("ptp");
    let args = k8s_args(&id);
    let extra = ["--args", args.as_str()];

    let result = cni.add(&pod, &id, &extra);
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 address in {result}"));
    let addrs = pod.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains(&format!("inet {ip}/")),
        "pod eth0 lacks {ip}: {addrs}"
    );
    assert!(
        host.ping(&ip.to_string()),
        "host cannot ping the ptp pod at {ip}"
    );
    let store = dir.path().join("datastore");
    assert!(
        !files_mentioning(&store, &id).is_empty(),
        "tabby-ipam recorded no allocation for {id}"
    );

    cni.check(&pod, &id, &extra);
    cni.del(&pod, &id, &extra);
    assert_gone(&host, &pod, ip, &store, &id);
    // A second DEL must succeed too.
    cni.del(&pod, &id, &extra);
}

/// ADD (result in `version`, parsed by libcni), CHECK where the version has
/// it, DEL, DEL again.
fn round_trip_in_version(version: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tag = version.replace('.', "");
    let (host, pod) = (
        Netns::new(&format!("tcf-v{tag}-host")),
        Netns::new(&format!("tcf-v{tag}-pod")),
    );
    let cidr = format!("10.{}.0.0/16", unique_octet());
    let list = conflist(version, vec![tabby_plugin(dir.path(), &cidr)]);
    let cni = Driver::new(&host, dir.path(), &list, &[&release_dir()]);
    let id = unique(&format!("v{tag}"));
    let args = k8s_args(&id);
    let extra = ["--args", args.as_str()];

    let result: Value = cni.add(&pod, &id, &extra);
    assert!(
        result["cniVersion"] == version,
        "asked for {version}, libcni parsed a {} result",
        result["cniVersion"]
    );
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 address in {result}"));
    if version.starts_with("0.") {
        assert!(
            result["ips"][0]["version"] == "4",
            "0.x result lacks ips[].version: {result}"
        );
    }
    assert_tabby_pod(&host, &pod, ip);
    if version != "0.3.1" {
        cni.check(&pod, &id, &extra); // CHECK exists from 0.4.0 on
    }
    cni.del(&pod, &id, &extra);
    assert_gone(&host, &pod, ip, &dir.path().join("datastore"), &id);
    // A second DEL must succeed too.
    cni.del(&pod, &id, &extra);
}

#[test]
fn cni_0_3_1_config_gets_a_0_3_1_result() {
    if !ready("cni_0_3_1_config_gets_a_0_3_1_result") {
        return;
    }
    round_trip_in_version("0.3.1")
}

#[test]
fn cni_0_4_0_config_gets_a_0_4_0_result() {
    if !ready("cni_0_4_0_config_gets_a_0_4_0_result") {
        return;
    }
    round_trip_in_version("0.4.0")
}

#[test]
fn cni_1_0_0_config_gets_a_1_0_0_result() {
    if !ready("cni_1_0_0_config_gets_a_1_0_0_result") {
        return;
    }
    round_trip_in_version("1.0.0")
}

#[test]
fn cni_1_1_0_config_gets_a_1_1_0_result() {
    if !ready("cni_1_1_0_config_gets_a_1_1_0_result") {
        return;
    }
    round_trip_in_version("1.1.0")
}

/// A cniVersion 1.1.0 tabby list with three pods: `keep` stays valid, `stale`
/// is still in libcni's cache (libcni's GC DELs it), `leaked` was dropped
/// from the cache (only tabby's GC, given `cni.dev/valid-attachments`, can
/// release it).
#[test]
fn libcni_gc_dels_stale_attachments_and_tabby_gc_releases_leaked_ones() {
    if !ready("libcni_gc_dels_stale_attachments_and_tabby_gc_releases_leaked_ones") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("tcf-gc-host");
    let pods = [
        Netns::new("tcf-gc-keep"),
        Netns::new("tcf-gc-stale"),
        Netns::new("tcf-gc-leak"),
    ];
    let cidr = format!("10.{}.0.0/16", unique_octet());
    let list = conflist("1.1.0", vec![tabby_plugin(dir.path(), &cidr)]);
    let cni = Driver::new(&host, dir.path(), &list, &[&release_dir()]);
    let ids = [unique("keep"), unique("stale"), unique("leak")];
    let ips: Vec<Ipv4Addr> = pods
        .iter()
        .zip(&ids)
        .map(|(pod, id)| {
            let result = cni.add(pod, id, &["--args", &k8s_args(id)]);
            result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 address in {result}"))
        })
        .collect();
    let store = dir.path().join("datastore");
    let cached = files_mentioning(cni.cache_dir(), &ids[2]);
    assert!(!cached.is_empty(), "libcni cached nothing for {}", ids[2]);
    for f in cached {
        std::fs::remove_file(&f).unwrap();
    }

    cni.gc(&[(ids[0].as_str(), "eth0")]);
    for (i, what) in [
        (1, "libcni's DEL of a stale cached attachment"),
        (2, "tabby's GC"),
    ] {
        let left = files_mentioning(&store, &ids[i]);
        assert!(
            left.is_empty(),
            "{what} left {}'s allocation in {left:?}",
            ids[i]
        );
        let routes = host.ip(&["-4", "route", "show"]);
        assert!(
            !routes
                .lines()
                .any(|l| l.starts_with(&format!("{} ", ips[i]))),
            "{what} left the host route to {}: {routes}",
            ips[i]
        );
    }
    let veth = assert_tabby_pod(&host, &pods[0], ips[0]);
    let links = host.links();
    assert_eq!(
        links.iter().filter(|l| *l != "lo").collect::<Vec<_>>(),
        vec![&veth],
        "after GC the host should keep only the valid pod's veth"
    );
    assert!(
        !files_mentioning(&store, &ids[0]).is_empty(),
        "GC released the valid attachment {}",
        ids[0]
    );
    cni.check(&pods[0], &ids[0], &["--args", &k8s_args(&ids[0])]);
    cni.del(&pods[0], &ids[0], &[]);
    assert_gone(&host, &pods[0], ips[0], &store, &ids[0]);
}

#[test]
fn status_through_libcni_answers_and_fails_without_a_datastore() {
    if !ready("status_through_libcni_answers_and_fails_without_a_datastore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("tcf-st-host");
    let cidr = format!("10.{}.0.0/16", unique_octet());
    let list = conflist("1.1.0", vec![tabby_plugin(dir.path(), &cidr)]);
    let cni = Driver::new(&host, dir.path(), &list, &[&release_dir()]);
    let ok = cni.status();
    assert!(
        ok.status.success(),
        "STATUS failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // The datastore path taken by a plain file: the datastore is unusable.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("datastore"), "not a datastore").unwrap();
    let list = conflist("1.1.0", vec![tabby_plugin(&broken, &cidr)]);
    let cni = Driver::new(&host, &broken, &list, &[&release_dir()]);
    let failed = cni.status();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        !failed.status.success(),
        "STATUS succeeded with a broken datastore"
    );
    assert!(
        stderr.contains("datastore"),
        "STATUS's error does not name the datastore: {stderr}"
    );
}
