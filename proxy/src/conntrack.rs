//! Stale UDP conntrack entries.
//!
//! A UDP "connection" lives in conntrack for as long as packets keep coming,
//! so a client keeps talking to a removed endpoint (or keeps being rejected
//! after endpoints appear) until its entry is deleted. After each sync the
//! proxier deletes, like kube-proxy:
//! - entries DNATed to an endpoint that no longer serves the service port,
//!   for each service address (`-D -p udp --orig-dst SVC --dst-nat EP`) and
//!   for the node port (`-D -p udp --dport NP --dst-nat EP`);
//! - entries to a service address whose port went from no endpoint to some
//!   (`-D -p udp --orig-dst SVC`), and of the node port (`-D -p udp --dport NP`).

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use super::backend::{DesiredState, PortPlan};
use super::error::{Error, Result};
use super::iptables::run;
use super::model::Protocol;

/// One `conntrack -D` invocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConntrackDelete {
    /// Entries to `orig_dst` NATed to `dst_nat` (a removed endpoint).
    ServiceEndpoint {
        /// A service address (cluster IP, external IP, LB IP).
        orig_dst: Ipv4Addr,
        /// The endpoint's address.
        dst_nat: Ipv4Addr,
    },
    /// Entries to a node port NATed to `dst_nat`.
    NodePortEndpoint {
        /// The node port.
        port: u16,
        /// The endpoint's address.
        dst_nat: Ipv4Addr,
    },
    /// Every entry to a service address.
    ServiceIp(Ipv4Addr),
    /// Every entry to a node port.
    NodePort(u16),
}

impl ConntrackDelete {
    /// Arguments of `conntrack`.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["-D", "-p", "udp"].map(String::from).to_vec();
        match self {
            Self::ServiceEndpoint { orig_dst, dst_nat } => a.extend([
                "--orig-dst".into(),
                orig_dst.to_string(),
                "--dst-nat".into(),
                dst_nat.to_string(),
            ]),
            Self::NodePortEndpoint { port, dst_nat } => a.extend([
                "--dport".into(),
                port.to_string(),
                "--dst-nat".into(),
                dst_nat.to_string(),
            ]),
            Self::ServiceIp(ip) => a.extend(["--orig-dst".into(), ip.to_string()]),
            Self::NodePort(port) => a.extend(["--dport".into(), port.to_string()]),
        }
        a
    }
}

fn service_ips<P: PortPlan>(r: &P) -> impl Iterator<Item = Ipv4Addr> + '_ {
    let info = r.info();
    std::iter::once(info.cluster_ip)
        .chain(info.external_ips.iter().copied())
        .chain(info.load_balancer_ips.iter().copied())
}

/// The deletions needed after moving from `previous` to `current` (plans
/// of either backend).
pub fn stale_udp_flows<S: DesiredState>(previous: &S, current: &S) -> Vec<ConntrackDelete> {
    let mut out = BTreeSet::new();
    for (key, prev) in previous
        .ports()
        .iter()
        .filter(|(k, _)| k.2 == Protocol::Udp)
    {
        let cur = current.ports().get(key);
        if cur.is_some_and(|c| std::sync::Arc::ptr_eq(c, prev)) {
            continue;
        }
        let still: HashSet<(Ipv4Addr, u16)> = cur
            .map(|c| c.reachable().iter().map(|e| (e.ip, e.port)).collect())
            .unwrap_or_default();
        for ep in prev
            .reachable()
            .iter()
            .filter(|e| !still.contains(&(e.ip, e.port)))
        {
            out.extend(
                service_ips(prev.as_ref()).map(|ip| ConntrackDelete::ServiceEndpoint {
                    orig_dst: ip,
                    dst_nat: ep.ip,
                }),
            );
            if let Some(port) = prev.info().node_port {
                out.insert(ConntrackDelete::NodePortEndpoint {
                    port,
                    dst_nat: ep.ip,
                });
            }
        }
    }
    for (key, cur) in current.ports().iter().filter(|(k, _)| k.2 == Protocol::Udp) {
        let had = previous
            .ports()
            .get(key)
            .is_some_and(|p| !p.reachable().is_empty());
        if !had && !cur.reachable().is_empty() {
            out.extend(service_ips(cur.as_ref()).map(ConntrackDelete::ServiceIp));
            if let Some(port) = cur.info().node_port {
                out.insert(ConntrackDelete::NodePort(port));
            }
        }
    }
    out.into_iter().collect()
}

/// Deletes conntrack entries.
pub trait Conntrack {
    /// Run one deletion; finding nothing to delete is success.
    fn delete(&mut self, what: &ConntrackDelete) -> Result<()>;
}

/// The `conntrack` command line tool, optionally inside a namespace.
#[derive(Debug, Clone, Default)]
pub struct ConntrackCli {
    /// Network namespace file to enter, if any.
    pub netns: Option<PathBuf>,
}

impl Conntrack for ConntrackCli {
    fn delete(&mut self, what: &ConntrackDelete) -> Result<()> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .args(["--", "conntrack"]);
                c
            }
            None => Command::new("conntrack"),
        };
        cmd.args(what.args());
        match run(cmd, "conntrack", None) {
            // conntrack exits 1 when no entry matched.
            Err(Error::Failed { stderr, .. }) if stderr.contains("0 flow entries") => Ok(()),
            other => other.map(drop),
        }
    }
}

/// A conntrack that does nothing (for tests and nodes without the tool).
#[derive(Debug, Clone, Default)]
pub struct NoConntrack {
    /// The deletions asked for, in order.
    pub asked: Vec<ConntrackDelete>,
}

impl Conntrack for NoConntrack {
    fn delete(&mut self, what: &ConntrackDelete) -> Result<()> {
        self.asked.push(what.clone());
        Ok(())
    }
}
