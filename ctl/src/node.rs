//! `tabbyctl node status`: the BGP sessions of the local agent, in
//! calicoctl's layout, read from the agent's unix socket.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::table::{Align, Table};

/// Where the agent listens by default.
pub const DEFAULT_SOCKET: &str = "/run/tabby/node.sock";

/// The agent's answer (see node-agent/src/status.rs for the contract).
#[derive(Debug, Deserialize)]
struct NodeStatus {
    node: String,
    peers: Vec<PeerRow>,
    #[serde(default)]
    encap: Encap,
}

/// The encapsulation part (absent from older agents).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Encap {
    pools: Vec<PoolEncap>,
    tunnels: Vec<Tunnel>,
    pod_mtu: u32,
    errors: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolEncap {
    name: String,
    cidr: String,
    encapsulation: String,
    nat_outgoing: bool,
}

#[derive(Debug, Deserialize)]
struct Tunnel {
    device: String,
    address: Option<String>,
    mac: Option<String>,
    mtu: u32,
    state: String,
}

fn render_encap(e: &Encap) -> String {
    let mut out = format!("\nEncapsulation (pod MTU {})\n", e.pod_mtu);
    for p in &e.pools {
        let nat = if p.nat_outgoing { ", natOutgoing" } else { "" };
        out.push_str(&format!(
            "pool {} {}: {}{nat}\n",
            p.name, p.cidr, p.encapsulation
        ));
    }
    for t in &e.tunnels {
        let addr = t.address.as_deref().unwrap_or("no address yet");
        let mac = t
            .mac
            .as_deref()
            .map(|m| format!(" mac {m}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "{} {addr}{mac} mtu {} {}\n",
            t.device, t.mtu, t.state
        ));
    }
    for err in &e.errors {
        out.push_str(&format!("error: {err}\n"));
    }
    out
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerRow {
    peer_address: String,
    peer_type: String,
    state: String,
    since: String,
    info: String,
}

pub fn status(socket: &Path) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!("Tabby process is not running: cannot reach tabby-node at {} (is the agent up? pass --socket)", socket.display())
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)
        .context("read the agent's answer")?;
    let st: NodeStatus =
        serde_json::from_slice(&body).context("the agent's answer is not node status JSON")?;
    print!("{}", render(&st));
    Ok(())
}

fn render(st: &NodeStatus) -> String {
    let mut out = format!("Tabby process is running on {}.\n", st.node);
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let rows: Vec<&PeerRow> = st
            .peers
            .iter()
            .filter(|p| p.peer_address.contains(':') == v6)
            .collect();
        out.push_str(&format!("\n{family} BGP status\n"));
        if rows.is_empty() {
            out.push_str(&format!("No {family} peers found.\n"));
            continue;
        }
        let mut t = Table::new(&[
            ("PEER ADDRESS", Align::Left),
            ("PEER TYPE", Align::Left),
            ("STATE", Align::Left),
            ("SINCE", Align::Left),
            ("INFO", Align::Left),
        ]);
        for p in rows {
            t.row(vec![
                p.peer_address.clone(),
                p.peer_type.clone(),
                p.state.clone(),
                p.since.clone(),
                p.info.clone(),
            ]);
        }
        out.push_str(&t.boxed());
    }
    if !st.encap.pools.is_empty() {
        out.push_str(&render_encap(&st.encap));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_calicoctls_table_per_family() {
        let st: NodeStatus = serde_json::from_str(
            r#"{"node":"node-1","asn":64512,"address":"10.98.0.1","peers":[
            {"peerAddress":"10.98.0.2","peerType":"node-to-node mesh","state":"up","since":"17:40:02","info":"Established"}]}"#,
        )
        .unwrap();
        let out = render(&st);
        assert!(out.contains("| PEER ADDRESS |"), "{out}");
        assert!(
            out.contains("| 10.98.0.2    | node-to-node mesh | up    | 17:40:02 | Established |"),
            "{out}"
        );
        assert!(out.contains("No IPv6 peers found."));
        assert!(
            !out.contains("Encapsulation"),
            "an older agent's answer has none"
        );
    }

    #[test]
    fn renders_the_encapsulation_per_pool_and_the_tunnels() {
        let st: NodeStatus = serde_json::from_str(
            r#"{"node":"node-1","peers":[],"encap":{"pools":[{"name":"p","cidr":"10.244.0.0/16",
            "encapsulation":"vxlan Always","natOutgoing":true}],"tunnels":[{"device":"vxlan.tabby",
            "address":"10.244.0.1","mac":"66:00:00:00:00:01","mtu":1450,"state":"up"}],"podMtu":1450,"errors":[]}}"#,
        )
        .unwrap();
        let out = render(&st);
        assert!(
            out.contains("pool p 10.244.0.0/16: vxlan Always, natOutgoing"),
            "{out}"
        );
        assert!(
            out.contains("vxlan.tabby 10.244.0.1 mac 66:00:00:00:00:01 mtu 1450 up"),
            "{out}"
        );
    }
}
