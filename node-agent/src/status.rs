//! `tabbyctl node status` asks the agent over a unix socket; the agent
//! answers one JSON document and closes.
//!
//! The JSON is the contract between the two binaries:
//! `{"node":"node-1","asn":64512,"address":"10.98.0.1","peers":[{"peerAddress":"10.98.0.2",
//! "peerType":"node-to-node mesh","state":"up","since":"2026-11-23T17:40:02Z","info":"Established"}]}`

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use crate::error::{AgentError, Result};

/// One row of `node status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRow {
    /// The peer's address.
    pub peer_address: String,
    /// node-to-node mesh, global, node specific.
    pub peer_type: String,
    /// up, start, ... (BIRD's protocol state words, as calicoctl shows).
    pub state: String,
    /// When the state was entered (RFC 3339, UTC).
    pub since: String,
    /// The FSM state and the last error.
    pub info: String,
}

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeStatus {
    /// The node's name.
    pub node: String,
    /// Its AS.
    pub asn: u32,
    /// Its BGP address.
    pub address: String,
    /// Its peers.
    pub peers: Vec<PeerRow>,
    /// Encapsulation per pool and the tunnel devices (absent from older agents).
    #[serde(default)]
    pub encap: crate::encap::EncapStatus,
}

/// `rows` from the speaker, plus a `start`/`Idle` row for each configured
/// peer the speaker does not show yet (its session task starts
/// asynchronously): the status lists the agent's peer set as soon as it changes.
pub fn with_configured<'a>(
    mut rows: Vec<PeerRow>,
    configured: impl IntoIterator<Item = &'a crate::desired::PeerSpec>,
) -> Vec<PeerRow> {
    let known: std::collections::BTreeSet<String> =
        rows.iter().map(|r| r.peer_address.clone()).collect();
    let now = std::time::SystemTime::now();
    for spec in configured {
        let addr = spec.addr.to_string();
        if !known.contains(&addr) {
            rows.push(PeerRow {
                peer_address: addr,
                peer_type: spec.peer_type.to_string(),
                state: "start".into(),
                since: crate::speaker_control::since(now, now),
                info: "Idle".into(),
            });
        }
    }
    rows.sort_by(|a, b| a.peer_address.cmp(&b.peer_address));
    rows
}

/// Serves `status()` on a unix socket at `path` (replacing a stale socket file).
pub async fn serve(path: PathBuf, status: Arc<dyn Fn() -> NodeStatus + Send + Sync>) -> Result<()> {
    let listener = bind(&path)?;
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %tabby_errors::chain(&e), "accept on the status socket");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let body = serde_json::to_vec(&status()).unwrap_or_default();
        tokio::spawn(async move {
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        });
    }
}

fn bind(path: &Path) -> Result<UnixListener> {
    let io = |context: String| move |source| AgentError::Io { context, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("remove stale socket {}", path.display()))(e)),
    }
    UnixListener::bind(path).map_err(io(format!("listen on {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{PeerSpec, PeerType};

    #[test]
    fn configured_peers_the_speaker_does_not_show_yet_are_listed_as_starting() {
        let spec = |addr: &str| PeerSpec {
            addr: addr.parse().unwrap(),
            asn: 64512,
            peer_type: PeerType::NodeMesh,
            password: None,
            export: Vec::new(),
            max_prefix: None,
        };
        let up = PeerRow {
            peer_address: "10.0.0.2".into(),
            peer_type: "node-to-node mesh".into(),
            state: "up".into(),
            since: "18:00:00".into(),
            info: "Established".into(),
        };
        let rows = with_configured(vec![up.clone()], &[spec("10.0.0.3"), spec("10.0.0.2")]);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], up, "the speaker's row wins");
        assert_eq!(
            (
                rows[1].peer_address.as_str(),
                rows[1].state.as_str(),
                rows[1].info.as_str()
            ),
            ("10.0.0.3", "start", "Idle")
        );
    }
}
