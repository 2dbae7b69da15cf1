//! The [`Speaker`] handle: peers, local routes, the listener, status.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnetwork::Ipv4Network;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::adj_out::LocalRib;
use super::config::{Error, PeerConfig, PeerStatus, Result, SpeakerConfig, SpeakerEvent};
use super::md5::set_md5_key;
use super::session::{Inputs, PeerCommand, Session, StatusTable, INBOUND_QUEUE};
use tabby_errors::chain;

/// Capacity of the event channel; peer tasks wait when it is full, which
/// slows their readers and so the peers (TCP flow control). Each event
/// holds at most one UPDATE's prefixes.
const EVENT_CAPACITY: usize = 128;

struct Peer {
    /// Local route changes: only the speaker's own calls fill it.
    commands: mpsc::UnboundedSender<PeerCommand>,
    /// Accepted connections: bounded, the peer can open many.
    inbound: mpsc::Sender<tokio::net::TcpStream>,
    task: JoinHandle<()>,
}

struct Inner {
    config: SpeakerConfig,
    peers: HashMap<Ipv4Addr, Peer>,
    rib: LocalRib,
    events: mpsc::Sender<SpeakerEvent>,
}

/// A running BGP speaker. Dropping it aborts every session.
///
/// ```no_run
/// # async fn f() -> tabby_bgp::Result<()> {
/// use tabby_bgp::{PeerConfig, PeerType, Speaker, SpeakerConfig};
/// let (speaker, mut events) = Speaker::start(SpeakerConfig {
///     router_id: "10.0.0.1".parse().unwrap(),
///     asn: 64512,
///     listen_addr: "10.0.0.1".parse().unwrap(),
///     listen_port: 179,
/// })
/// .await?;
/// speaker.add_peer(PeerConfig::new("10.0.0.2".parse().unwrap(), 64512, PeerType::NodeMesh))?;
/// speaker.announce("10.244.1.0/26".parse().unwrap(), None);
/// while let Some(event) = events.recv().await { println!("{event:?}") }
/// # Ok(()) }
/// ```
pub struct Speaker {
    inner: Arc<Mutex<Inner>>,
    status: StatusTable,
    listener: Arc<TcpListener>,
    accept_task: JoinHandle<()>,
}

impl Speaker {
    /// Binds the listener and starts accepting connections. Returns the
    /// handle and the stream of route and session events.
    pub async fn start(config: SpeakerConfig) -> Result<(Speaker, mpsc::Receiver<SpeakerEvent>)> {
        if !crate::is_valid_asn(config.asn) {
            return Err(Error::ReservedAs(config.asn));
        }
        let listen_err = |source| Error::Listen {
            addr: config.listen_addr,
            port: config.listen_port,
            source,
        };
        let socket = TcpSocket::new_v4().map_err(listen_err)?;
        socket.set_reuseaddr(true).map_err(listen_err)?;
        socket
            .bind(SocketAddrV4::new(config.listen_addr, config.listen_port).into())
            .map_err(listen_err)?;
        let listener = Arc::new(socket.listen(128).map_err(listen_err)?);
        let (events, rx) = mpsc::channel(EVENT_CAPACITY);
        let inner = Arc::new(Mutex::new(Inner {
            config: config.clone(),
            peers: HashMap::new(),
            rib: LocalRib::new(),
            events,
        }));
        let accept_task = tokio::spawn(accept_loop(listener.clone(), Arc::downgrade(&inner)));
        info!(router_id = %config.router_id, asn = config.asn, port = config.listen_port, "BGP speaker started");
        Ok((
            Speaker {
                inner,
                status: StatusTable::default(),
                listener,
                accept_task,
            },
            rx,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a peer and starts connecting to it.
    pub fn add_peer(&self, peer: PeerConfig) -> Result<()> {
        if peer.hold_time == 1 || peer.hold_time == 2 {
            return Err(Error::HoldTime(peer.hold_time));
        }
        if !crate::is_valid_asn(peer.asn) {
            return Err(Error::ReservedAs(peer.asn));
        }
        let mut inner = self.lock();
        if inner.peers.contains_key(&peer.addr) {
            return Err(Error::DuplicatePeer(peer.addr));
        }
        if let Some(password) = &peer.password {
            set_md5_key(self.listener.as_raw_fd(), peer.addr, password.as_bytes()).map_err(
                |source| Error::Md5 {
                    peer: peer.addr,
                    source,
                },
            )?;
        }
        info!(peer = %peer.addr, asn = peer.asn, peer_type = %peer.peer_type, "adding BGP peer");
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (inbound, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let addr = peer.addr;
        let task = Session::spawn(
            peer,
            inner.config.clone(),
            inner.rib.clone(),
            inner.events.clone(),
            self.status.clone(),
            Inputs {
                commands: commands_rx,
                inbound: inbound_rx,
            },
        );
        inner.peers.insert(
            addr,
            Peer {
                commands,
                inbound,
                task,
            },
        );
        Ok(())
    }

    /// Removes a peer: sends Cease, closes its session (a `PeerDown` follows
    /// if it was up). Returns whether it existed.
    pub async fn remove_peer(&self, addr: Ipv4Addr) -> bool {
        let peer = self.lock().peers.remove(&addr);
        let Some(peer) = peer else {
            return false;
        };
        info!(peer = %addr, "removing BGP peer");
        drop((peer.commands, peer.inbound));
        if let Err(err) = peer.task.await {
            warn!(peer = %addr, error = %chain(&err), "peer task failed");
        }
        if let Ok(mut table) = self.status.lock() {
            table.remove(&addr);
        }
        let _ = set_md5_key(self.listener.as_raw_fd(), addr, &[]);
        true
    }

    /// Announces `prefix` to every peer, with next hop `next_hop` (ourselves
    /// when `None`; always ourselves towards eBGP peers).
    pub fn announce(&self, prefix: Ipv4Network, next_hop: Option<Ipv4Addr>) {
        self.announce_many(vec![(prefix, next_hop)]);
    }

    /// Announces many prefixes at once, packed into as few UPDATEs as fit.
    pub fn announce_many(&self, routes: Vec<(Ipv4Network, Option<Ipv4Addr>)>) {
        let mut inner = self.lock();
        for (prefix, next_hop) in &routes {
            inner.rib.insert(*prefix, *next_hop);
        }
        for peer in inner.peers.values() {
            let _ = peer.commands.send(PeerCommand::Announce(routes.clone()));
        }
    }

    /// Withdraws `prefix` from every peer.
    pub fn withdraw(&self, prefix: Ipv4Network) {
        self.withdraw_many(vec![prefix]);
    }

    /// Withdraws many prefixes at once.
    pub fn withdraw_many(&self, prefixes: Vec<Ipv4Network>) {
        let mut inner = self.lock();
        for prefix in &prefixes {
            inner.rib.remove(prefix);
        }
        for peer in inner.peers.values() {
            let _ = peer.commands.send(PeerCommand::Withdraw(prefixes.clone()));
        }
    }

    /// The routes announced locally.
    pub fn local_routes(&self) -> Vec<(Ipv4Network, Option<Ipv4Addr>)> {
        self.lock().rib.iter().map(|(p, nh)| (*p, *nh)).collect()
    }

    /// One row per peer, sorted by address, for `tabbyctl node status`.
    pub fn status(&self) -> Vec<PeerStatus> {
        let mut rows: Vec<PeerStatus> = match self.status.lock() {
            Ok(table) => table.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        rows.sort_by_key(|r| r.addr);
        rows
    }

    /// Stops every session with Cease and stops listening.
    pub async fn shutdown(self) {
        let addrs: Vec<Ipv4Addr> = self.lock().peers.keys().copied().collect();
        for addr in addrs {
            self.remove_peer(addr).await;
        }
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.accept_task.abort();
        for peer in self.lock().peers.values() {
            peer.task.abort();
        }
    }
}

/// Accepts connections and hands each to the peer it comes from; closes
/// connections from unknown addresses.
async fn accept_loop(listener: Arc<TcpListener>, inner: std::sync::Weak<Mutex<Inner>>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %chain(&err), "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let SocketAddr::V4(from) = from else {
            continue;
        };
        let inner = inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.peers.get(from.ip()) {
            Some(peer) => match peer.inbound.try_send(stream) {
                Ok(()) => debug!(peer = %from.ip(), "inbound connection"),
                Err(_) => {
                    debug!(peer = %from.ip(), "inbound connection closed: others are waiting")
                }
            },
            None => debug!(from = %from, "connection from unknown peer closed"),
        }
    }
}
