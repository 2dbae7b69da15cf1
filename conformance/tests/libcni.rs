//! CNI conformance through libcni (the runtime library of containerd and
//! CRI-O), with Debian's reference plugins as peers:
//! - `tabby` chained with Debian's `portmap`: ADD, CHECK, DEL, DEL again;
//! - `tabby` delegating to Debian's `host-local` IPAM;
//! - Debian's `ptp` using `tabby-ipam`;
//! - every supported cniVersion gets a result in that version.
//!
//! Each test runs in its own "host" and pod namespaces (deleted on drop) with
//! its own temp datastore, so tests run in parallel and never touch the host.

use std::net::Ipv4Addr;
use std::path::Path;

use serde_json::{json, Value};
use tabby_conformance::{
    conflist, files_mentioning, ready, release_dir, result_ipv4, tabby_ipam, tabby_plugin,
    unique_octet, Driver, DEBIAN_CNI_DIR,
};
use tabby_testkit::{run_ok, unique, Netns};

/// Asserts the Tabby data path for a pod with address `ip`; returns the name
/// of the host-side veth.
fn assert_tabby_pod(host: &Netns, pod: &Netns, ip: Ipv4Addr) -> String {
    let addrs = pod.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains(&format!("inet {ip}/32 ")),
        "pod eth0 lacks {ip}/32: {addrs}"
    );
    let routes = pod.ip(&["-4", "route", "show"]);
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("default via 169.254.1.1 dev eth0")),
        "no default route via 169.254.1.1 in the pod: {routes}"
    );
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("169.254.1.1 dev eth0") && l.contains("scope link")),
        "no scope-link route to 169.254.1.1 in the pod: {routes}"
    );

    let host_routes = host.ip(&["-4", "route", "show"]);
    let route = host_routes
        .lines()
        .find(|l| l.starts_with(&format!("{ip} dev tabby")))
        .unwrap_or_else(|| panic!("no host route {ip}/32 dev tabby*: {host_routes}"));
    assert!(
        route.contains("scope link"),
        "host route is not scope link: {route}"
    );
    let veth = route
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string();
    assert!(
        veth.len() == 15 && veth[5..].chars().all(|c| c.is_ascii_hexdigit()),
        "host veth {veth} is not tabby + 10 hex chars"
    );
    let link = host.ip(&["-o", "link", "show", "dev", &veth]);
    assert!(
        link.contains("link/ether ee:ee:ee:ee:ee:ee"),
        "host veth MAC is not ee:ee:ee:ee:ee:ee: {link}"
    );
    veth
}

/// Asserts nothing of the attachment is left: no veth in either namespace,
/// no host route to `ip`, and no file of `store` mentions container `id`.
fn assert_gone(host: &Netns, pod: &Netns, ip: Ipv4Addr, store: &Path, id: &str) {
    let host_links = host.links();
    assert!(
        host_links.iter().all(|l| l == "lo"),
        "host namespace still has links: {host_links:?}"
    );
    let pod_links = pod.links();
    assert!(
        !pod_links.iter().any(|l| l == "eth0"),
        "pod still has eth0: {pod_links:?}"
    );
    let host_routes = host.ip(&["-4", "route", "show"]);
    assert!(
        !host_routes.contains(&ip.to_string()),
        "host still routes {ip}: {host_routes}"
    );
    let left = files_mentioning(store, id);
    assert!(
        left.is_empty(),
        "allocation for {id} still recorded in {left:?}"
    );
}

/// The pod identity passed as CNI_ARGS, as kubelet does.
fn k8s_args(pod: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=conformance;K8S_POD_NAME={pod}")
}

/// A PATH directory in which `iptables*` is the legacy backend and
/// `ip6tables` is unusable, for Debian's portmap 1.1.1. With the nft backend
/// its DEL leaves the CNI-HOSTPORT-DNAT jump behind (it cannot match its own
/// comment), and whenever ip6tables works its CHECK fails for an IPv4-only
/// pod ("could not check ipv6 dnat": it checks the IPv4 chain in ip6tables),
/// whatever the main plugin; a Debian ptp + portmap chain fails the same way.
fn legacy_ipv4_only_iptables(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let shim = dir.join("iptables-legacy-ipv4");
    std::fs::create_dir_all(&shim).unwrap();
    for tool in ["iptables", "iptables-save", "iptables-restore"] {
        symlink(
            format!(
                "/usr/sbin/{}",
                tool.replacen("iptables", "iptables-legacy", 1)
            ),
            shim.join(tool),
        )
        .unwrap();
    }
    let ip6 = shim.join("ip6tables");
    std::fs::write(
        &ip6,
        "#!/bin/sh\necho 'ip6tables: IPv6 is off for this IPv4-only test' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&ip6, std::fs::Permissions::from_mode(0o755)).unwrap();
    shim
}

#[test]
fn tabby_chained_with_debian_portmap_survives_add_check_del_del() {
    if !ready("tabby_chained_with_debian_portmap_survives_add_check_del_del") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (host, pod) = (Netns::new("tcf-pm-host"), Netns::new("tcf-pm-pod"));
    let cidr = format!("10.{}.0.0/16", unique_octet());
    // Debian's portmap speaks CNI up to 1.0.0.
    let list = conflist(
        "1.0.0",
        vec![
            tabby_plugin(dir.path(), &cidr),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ],
    );
    let cni = Driver::new(
        &host,
        dir.path(),
        &list,
        &[&release_dir(), Path::new(DEBIAN_CNI_DIR)],
    )
    .with_path_prefix(&legacy_ipv4_only_iptables(dir.path()));
    let id = unique("portmap");
    let args = k8s_args(&id);
    let caps =
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]})
            .to_string();
    let extra = ["--args", args.as_str(), "--capability-args", caps.as_str()];

    let result = cni.add(&pod, &id, &extra);
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 address in {result}"));
    assert_tabby_pod(&host, &pod, ip);
    let nat = || -> String {
        let out = run_ok(host.command("iptables-legacy-save").args(["-t", "nat"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rules = nat();
    assert!(
        rules.contains(&format!("--to-destination {ip}:80")),
        "portmap did not DNAT 18080 to {ip}:80: {rules}"
    );

    cni.check(&pod, &id, &extra);
    cni.del(&pod, &id, &extra);
    assert_gone(&host, &pod, ip, &dir.path().join("datastore"), &id);
    let rules = nat();
    assert!(
        !rules.contains(&id) && !rules.contains(&ip.to_string()),
        "portmap rules left after DEL: {rules}"
    );
    // A second DEL must succeed too.
    cni.del(&pod, &id, &extra);
}

#[test]
fn tabby_uses_debian_host_local_as_its_ipam() {
    if !ready("tabby_uses_debian_host_local_as_its_ipam") {
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
    // Debian's host-local speaks CNI up to 1.0.0.
    let cni = Driver::new(
        &host,
        dir.path(),
        &conflist("1.0.0", vec![plugin]),
        &[&release_dir(), Path::new(DEBIAN_CNI_DIR)],
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
fn debian_ptp_uses_tabby_ipam() {
    if !ready("debian_ptp_uses_tabby_ipam") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (host, pod) = (Netns::new("tcf-ptp-host"), Netns::new("tcf-ptp-pod"));
    let cidr = format!("10.{}.0.0/16", unique_octet());
    let plugin = json!({"type": "ptp", "mtu": 1450, "ipam": tabby_ipam(dir.path(), &cidr)});
    // Debian's ptp speaks CNI up to 1.0.0.
    let cni = Driver::new(
        &host,
        dir.path(),
        &conflist("1.0.0", vec![plugin]),
        &[&release_dir(), Path::new(DEBIAN_CNI_DIR)],
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
