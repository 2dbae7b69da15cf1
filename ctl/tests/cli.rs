//! `tabbyctl` end to end: pools through the binary, allocations through the
//! library (as the CNI plugin makes them), then show / check / release.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use tabby_ipam::{AssignArgs, FileDatastore, Ipam};

fn tabbyctl(datastore: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tabbyctl"))
        .arg("--datastore")
        .arg(datastore)
        .args(args)
        .env_remove("TABBY_DATASTORE")
        .output()
        .expect("run tabbyctl")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "tabbyctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assign(ipam: &Ipam<FileDatastore>, pod: &str, node: &str, netns: &str) -> String {
    let attrs = BTreeMap::from([
        ("namespace".to_string(), "default".to_string()),
        ("pod".to_string(), pod.to_string()),
        ("netns".to_string(), netns.to_string()),
        ("node".to_string(), node.to_string()),
    ]);
    let args = AssignArgs {
        handle: format!("k8s-pod-network.{pod}"),
        node: node.to_string(),
        attrs,
        num_v4: 1,
        num_v6: 0,
        pools: Vec::new(),
    };
    ipam.assign(&args).expect("assign")[0].ip().to_string()
}

#[test]
fn operators_can_create_a_pool_see_usage_check_and_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("ds");
    stdout(&tabbyctl(
        &ds,
        &[
            "pool",
            "create",
            "--name",
            "default-ipv4-ippool",
            "--cidr",
            "10.244.0.0/16",
        ],
    ));
    assert!(stdout(&tabbyctl(&ds, &["pool", "list"]))
        .contains("default-ipv4-ippool   10.244.0.0/16   26"));

    let ipam = Ipam::new(FileDatastore::open(&ds).expect("open"));
    let live_netns = dir.path().display().to_string();
    let a = assign(&ipam, "web-1", "node-a", &live_netns);
    assign(&ipam, "web-2", "node-a", "/nonexistent/netns");
    assign(&ipam, "db-1", "node-b", "/whatever");

    let show = stdout(&tabbyctl(&ds, &["ipam", "show"]));
    assert!(
        show.contains("| GROUPING |     CIDR      | IPS TOTAL | IPS IN USE |   IPS FREE   |"),
        "{show}"
    );
    assert!(
        show.contains("| IP Pool  | 10.244.0.0/16 |     65536 | 3 (0%)     | 65533 (100%) |"),
        "{show}"
    );

    let blocks = stdout(&tabbyctl(&ds, &["ipam", "show", "--show-blocks"]));
    assert!(
        blocks.contains(
            "| Block    | 10.244.0.0/26  | host:node-a |        64 | 2 (3%)     | 62 (97%)     |"
        ),
        "{blocks}"
    );
    assert!(
        blocks.contains(
            "| Block    | 10.244.0.64/26 | host:node-b |        64 | 1 (2%)     | 63 (98%)     |"
        ),
        "{blocks}"
    );

    let ip = stdout(&tabbyctl(&ds, &["ipam", "show", "--ip", &a]));
    assert!(ip.starts_with(&format!("IP {a} is in use\n")), "{ip}");
    assert!(
        ip.contains("Handle: k8s-pod-network.web-1") && ip.contains("  pod: web-1"),
        "{ip}"
    );

    let check = stdout(&tabbyctl(&ds, &["ipam", "check", "--node", "node-a"]));
    assert!(
        check.contains("1 live on this node (node-a), 1 not checkable from here"),
        "{check}"
    );
    assert!(check.contains("(pod default/web-2)"), "{check}");
    assert!(check.contains("Found 1 problems"), "{check}");

    let released = stdout(&tabbyctl(&ds, &["ipam", "release", "--ip", &a]));
    assert!(released.contains("k8s-pod-network.web-1"));
    let again = tabbyctl(&ds, &["ipam", "release", "--ip", &a]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not assigned"));

    let refused = tabbyctl(&ds, &["pool", "delete", "default-ipv4-ippool"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("still has 2 allocated addresses"));
}

#[test]
fn a_missing_datastore_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tabbyctl(&dir.path().join("nope"), &["ipam", "show"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: no datastore at"));
    assert!(!dir.path().join("nope").exists());
}

fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "tabbyctl succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `tabbyctl bgp peer create` of peer `tor` (10.98.0.254) in AS `asn`,
/// with the flags `more`.
fn create_tor(datastore: &Path, asn: &str, more: &[&str]) -> Output {
    let mut args = vec![
        "bgp",
        "peer",
        "create",
        "--name",
        "tor",
        "--peer-ip",
        "10.98.0.254",
        "--as-number",
        asn,
    ];
    args.extend_from_slice(more);
    tabbyctl(datastore, &args)
}

#[test]
fn bgp_peer_create_refuses_as_0_and_as_trans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("ds");
    for asn in ["0", "23456"] {
        let err = fails(&create_tor(&ds, asn, &[]));
        assert!(err.contains(&format!("AS {asn}")), "{err}");
    }
    let err = fails(&tabbyctl(
        &ds,
        &["bgp", "config", "set", "--as-number", "0"],
    ));
    assert!(err.contains("AS 0"), "{err}");
    let list = stdout(&tabbyctl(&ds, &["bgp", "peer", "list"]));
    assert!(!list.contains("tor"), "{list}");
}

#[test]
fn operators_create_list_and_delete_bgp_filters_that_peers_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("ds");
    stdout(&tabbyctl(
        &ds,
        &[
            "bgp",
            "filter",
            "create",
            "--name",
            "allow-default",
            "--import-v4",
            "Accept Equal 0.0.0.0/0",
            "--export-v4",
            "Reject In 10.244.0.0/16 min=32",
        ],
    ));
    let file = dir.path().join("filter.yaml");
    std::fs::write(
        &file,
        "apiVersion: projectcalico.org/v3\nkind: BGPFilter\nmetadata:\n  name: from-yaml\nspec:\n  importV4:\n    - action: Reject\n      matchOperator: NotIn\n      cidr: 44.0.0.0/16\n",
    )
    .unwrap();
    stdout(&tabbyctl(
        &ds,
        &["bgp", "filter", "create", "--file", file.to_str().unwrap()],
    ));
    let err = fails(&tabbyctl(
        &ds,
        &[
            "bgp",
            "filter",
            "create",
            "--name",
            "bad",
            "--import-v4",
            "Accept In 10.0.0.0/8 min=4",
        ],
    ));
    assert!(err.contains("within 8..32"), "{err}");
    let list = stdout(&tabbyctl(&ds, &["bgp", "filter", "list"]));
    assert!(
        list.contains("allow-default") && list.contains("Accept Equal 0.0.0.0/0"),
        "{list}"
    );
    assert!(list.contains("Reject In 10.244.0.0/16 min=32"), "{list}");
    assert!(
        list.contains("from-yaml") && list.contains("Reject NotIn 44.0.0.0/16"),
        "{list}"
    );
    assert!(!list.contains("bad"), "{list}");

    let err = fails(&create_tor(&ds, "65000", &["--filter", "nope"]));
    assert!(err.contains("BGP filter nope does not exist"), "{err}");
    stdout(&create_tor(
        &ds,
        "65000",
        &[
            "--filter",
            "allow-default",
            "--filter",
            "from-yaml",
            "--max-prefix",
            "1000",
        ],
    ));
    let peers = stdout(&tabbyctl(&ds, &["bgp", "peer", "list"]));
    assert!(
        peers.contains("allow-default,from-yaml") && peers.contains("1000"),
        "{peers}"
    );
    let err = fails(&tabbyctl(
        &ds,
        &["bgp", "filter", "delete", "allow-default"],
    ));
    assert!(err.contains("used by BGP peer tor"), "{err}");
    stdout(&tabbyctl(&ds, &["bgp", "peer", "delete", "tor"]));
    stdout(&tabbyctl(
        &ds,
        &["bgp", "filter", "delete", "allow-default"],
    ));
    let err = fails(&tabbyctl(
        &ds,
        &["bgp", "filter", "delete", "allow-default"],
    ));
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn pool_update_changes_the_modes_in_place_and_refuses_both_encapsulations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = dir.path().join("ds");
    let pool = "default-ipv4-ippool";
    stdout(&tabbyctl(
        &ds,
        &["pool", "create", "--name", pool, "--cidr", "10.244.0.0/16"],
    ));
    let updated = stdout(&tabbyctl(
        &ds,
        &[
            "pool",
            "update",
            pool,
            "--vxlan-mode",
            "crosssubnet",
            "--nat-outgoing",
            "true",
        ],
    ));
    assert!(
        updated.contains("Successfully updated IP pool"),
        "{updated}"
    );
    let list = stdout(&tabbyctl(&ds, &["pool", "list"]));
    let row = list
        .lines()
        .find(|l| l.starts_with(pool))
        .expect("the pool");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[..6],
        [pool, "10.244.0.0/16", "26", "true", "Never", "CrossSubnet"],
        "{list}"
    );

    let refused = fails(&tabbyctl(
        &ds,
        &["pool", "update", pool, "--ipip-mode", "Always"],
    ));
    assert!(refused.contains("not both"), "{refused}");
    assert_eq!(stdout(&tabbyctl(&ds, &["pool", "list"])), list, "unchanged");
    let again = stdout(&tabbyctl(
        &ds,
        &["pool", "update", pool, "--vxlan-mode", "CrossSubnet"],
    ));
    assert!(again.starts_with("Unchanged:"), "{again}");
    let missing = fails(&tabbyctl(
        &ds,
        &["pool", "update", "nope", "--disabled", "true"],
    ));
    assert!(missing.contains("no IP pool nope"), "{missing}");
}
