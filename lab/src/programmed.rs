//! `apply` and `delete` return once every node's proxy has programmed the
//! change: each applied Service's cluster IP and ports (and node ports)
//! show up in every node's nat or filter table (a Service without
//! endpoints is a REJECT in filter), and a deleted one's are gone.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::poll_until;
use crate::resources::Object;
use crate::sh::in_netns;
use crate::state::LabState;

/// How long `apply` waits for the agents.
const DEADLINE: Duration = Duration::from_secs(20);

/// What a Service's rules must mention: `-d <clusterIP>/32` with
/// `--dport <port>`, and `--dport <nodePort>` for node ports.
pub fn expected_rules(objects: &[Object]) -> Vec<(Option<String>, u64)> {
    let mut rules = Vec::new();
    let services = objects.iter().filter_map(|o| match o {
        Object::Service(svc) => Some(svc),
        Object::Slice(_) => None,
    });
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let ip = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty() && *ip != "None");
        for port in spec.ports.iter().flatten() {
            if let Some(ip) = ip {
                rules.push((Some(format!("-d {ip}/32")), port.port as u64));
            }
            if let Some(np) = port.node_port {
                rules.push((None, np as u64));
            }
        }
    }
    rules
}

/// Whether `tables` (iptables-save output) has a rule for `(dst, port)`.
pub fn has_rule(tables: &str, (dst, port): &(Option<String>, u64)) -> bool {
    let dport = format!("--dport {port} ");
    tables
        .lines()
        .filter(|l| l.starts_with("-A TABBY-"))
        .any(|l| {
            let line = format!("{l} ");
            line.contains(&dport) && dst.as_ref().is_none_or(|d| line.contains(d.as_str()))
        })
}

/// The nat and filter rules of namespace `ns`, from both iptables backends.
fn tables(ns: &str) -> String {
    let mut all = String::new();
    for tool in ["iptables-save", "iptables-legacy-save"] {
        for table in ["nat", "filter"] {
            let mut cmd: Command = in_netns(ns, tool);
            cmd.args(["-t", table]);
            if let Ok(out) = crate::sh::run(cmd) {
                all.push_str(&out);
            }
        }
    }
    all
}

/// Waits until every node with a running agent shows (`present`) or no
/// longer shows the rules of `objects`; prints how long it took.
pub fn wait(state: &LabState, objects: &[Object], present: bool) {
    wait_rules(state, &expected_rules(objects), present);
}

/// Waits until every node with a running agent shows (`present`) or no
/// longer shows `rules`; prints how long it took. Whether they all did.
pub fn wait_rules(state: &LabState, rules: &[(Option<String>, u64)], present: bool) -> bool {
    let nodes: Vec<&str> = state
        .nodes
        .iter()
        .filter(|n| n.agent.as_ref().is_some_and(|p| p.alive()))
        .map(|n| n.netns.as_str())
        .collect();
    if rules.is_empty() || nodes.is_empty() {
        return true;
    }
    let start = Instant::now();
    let done = |ns: &&str| {
        let t = tables(ns);
        rules.iter().all(|r| has_rule(&t, r) == present)
    };
    let all = poll_until(DEADLINE, Duration::from_millis(50), || {
        nodes.iter().all(done)
    });
    if all {
        println!(
            "programmed on {} nodes in {:.1?}",
            nodes.len(),
            start.elapsed()
        );
    } else {
        println!("WARNING: after {DEADLINE:?} not every node's proxy has programmed the change: see `tabby-lab status` and the agent logs");
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_ports_and_node_ports_are_expected_and_found() {
        let service = |spec: serde_json::Value| {
            let json = serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": spec});
            Object::Service(Box::new(serde_json::from_value(json).unwrap()))
        };
        let svc = service(
            serde_json::json!({"type": "NodePort", "clusterIP": "10.96.0.11",
            "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]}),
        );
        let headless = service(serde_json::json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        let rules = expected_rules(&[svc, headless]);
        assert_eq!(
            rules,
            vec![(Some("-d 10.96.0.11/32".to_string()), 80), (None, 30080)]
        );
        let nat = "-A TABBY-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment \"default/x:http cluster IP\" -m tcp --dport 80 -j TABBY-SVC-AB\n\
                   -A TABBY-NODEPORTS -p tcp -m comment --comment \"default/x:http\" -m tcp --dport 30080 -j TABBY-EXT-AB\n";
        assert!(rules.iter().all(|r| has_rule(nat, r)));
        assert!(!has_rule(nat, &(Some("-d 10.96.0.12/32".into()), 80)));
        assert!(!has_rule(nat, &(None, 8)), "--dport 8 is not --dport 80");
    }
}
