//! The runtime of one peer: a tokio task that owns its [`Fsm`], its
//! connections and its timers, and carries out the FSM's actions.
//!
//! ```text
//!  Speaker ──PeerCommand──► peer task ◄──Internal (256)── reader task (per conn)
//!  listener ─TcpStream (2)─►  │  ▲      ◄──Internal────── connect task
//!                             │  └── timers (tokio::time)
//!                             ├──Bytes (WRITE_QUEUE)──► writer task (per conn) ──► TCP
//!                             └──SpeakerEvent (bounded)──► consumer
//! ```
//!
//! Readers decode on their own task, so a large table is parsed in
//! parallel with the FSM. Every queue a peer can fill is bounded: the
//! readers wait on the peer task (TCP flow control slows the peer down),
//! connections beyond two waiting ones are closed, and the writer queue
//! never blocks the peer task: a peer that does not read what we send (the
//! queue is full, or one write makes no progress for [`WRITE_STALL`]) is
//! reset with Cease 6/8, out of resources. The command queue is filled only
//! by the local speaker's own calls.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use ipnetwork::Ipv4Network;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::{sleep_until, Duration, Instant};
use tracing::{debug, info, warn};

use super::adj_out::{self, LocalRib, OutPolicy};
use super::codec;
use super::config::{PeerConfig, PeerStatus, SpeakerConfig, SpeakerEvent};
use super::fsm::{Action, ConnId, Event, Fsm, FsmConfig, State, Timer};
use super::md5::set_md5_key;
use super::message::{Message, Update};
use super::policy;
use tabby_errors::chain;

/// Messages (each at most 4096 octets) waiting for a connection's writer.
pub(crate) const WRITE_QUEUE: usize = 1024;
/// How long one write may wait for the peer to read before it is reset.
pub(crate) const WRITE_STALL: Duration = Duration::from_secs(60);
/// Accepted connections waiting for their peer task; more are closed.
pub(crate) const INBOUND_QUEUE: usize = 2;

/// Commands from the speaker to a peer task.
#[derive(Debug)]
pub(crate) enum PeerCommand {
    /// Announce (or re-announce) local routes.
    Announce(Vec<(Ipv4Network, Option<Ipv4Addr>)>),
    /// Withdraw local routes.
    Withdraw(Vec<Ipv4Network>),
}

/// What connection tasks report to their peer task.
#[derive(Debug)]
enum Internal {
    Connected(ConnId, TcpStream),
    ConnectFailed(ConnId, std::io::Error),
    Message(ConnId, Message),
    Malformed(ConnId, super::message::Notification),
    Closed(ConnId),
    /// The writer made no progress for [`WRITE_STALL`].
    Stalled(ConnId),
}

/// Shared status table, read by [`Speaker::status`](super::Speaker::status).
pub(crate) type StatusTable = Arc<Mutex<HashMap<Ipv4Addr, PeerStatus>>>;

struct Conn {
    writer: mpsc::Sender<Bytes>,
    reader: AbortHandle,
    local_addr: Ipv4Addr,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The writer drains its queue (a NOTIFICATION, say) and shuts the
        // socket down once its sender is gone, or gives up after WRITE_STALL.
        self.reader.abort();
    }
}

/// What a peer task receives.
pub(crate) struct Inputs {
    /// From the speaker.
    pub commands: mpsc::UnboundedReceiver<PeerCommand>,
    /// Connections the listener accepted from this peer.
    pub inbound: mpsc::Receiver<TcpStream>,
}

/// The state of one peer task.
pub(crate) struct Session {
    peer: PeerConfig,
    local: SpeakerConfig,
    fsm: Fsm,
    conns: HashMap<ConnId, Conn>,
    next_conn: ConnId,
    connecting: Option<(ConnId, AbortHandle)>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    timers: HashMap<Timer, Instant>,
    rib: LocalRib,
    events: mpsc::Sender<SpeakerEvent>,
    status: StatusTable,
    scratch: BytesMut,
    /// Connections whose send queue overflowed, reported after each event.
    blocked: Vec<ConnId>,
}

impl Session {
    /// Spawns the task of `peer`, starts its FSM, and returns the task.
    pub(crate) fn spawn(
        peer: PeerConfig,
        local: SpeakerConfig,
        rib: LocalRib,
        events: mpsc::Sender<SpeakerEvent>,
        status: StatusTable,
        inputs: Inputs,
    ) -> JoinHandle<()> {
        let fsm = Fsm::new(FsmConfig {
            local_asn: local.asn,
            router_id: local.router_id,
            peer_asn: peer.asn,
            hold_time: peer.hold_time,
            keepalive: peer.keepalive,
            connect_retry: peer.connect_retry,
            connect_retry_max: peer.connect_retry_max,
            max_prefix: peer.max_prefix,
            restart_time: peer.restart_time,
            stale_time: peer.stale_time,
        });
        let (internal_tx, internal_rx) = mpsc::channel(256);
        let mut session = Session {
            peer,
            local,
            fsm,
            conns: HashMap::new(),
            next_conn: 0,
            connecting: None,
            internal_tx,
            internal_rx,
            timers: HashMap::new(),
            rib,
            events,
            status,
            scratch: BytesMut::with_capacity(codec::MAX_MESSAGE_LEN),
            blocked: Vec::new(),
        };
        tokio::spawn(async move { session.run(inputs).await })
    }

    async fn run(&mut self, mut inputs: Inputs) {
        self.set_status();
        self.feed(Event::Start).await;
        loop {
            let deadline = self.timers.values().min().copied();
            tokio::select! {
                cmd = inputs.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                Some(stream) = inputs.inbound.recv() => {
                    let conn = self.add_conn(stream);
                    self.feed(Event::Connected { conn, outbound: false }).await;
                }
                Some(internal) = self.internal_rx.recv() => self.on_internal(internal).await,
                () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let now = Instant::now();
                    let due: Vec<Timer> = self.timers.iter().filter(|(_, at)| **at <= now).map(|(t, _)| *t).collect();
                    for timer in due {
                        self.timers.remove(&timer);
                        self.feed(Event::TimerExpired(timer)).await;
                    }
                }
            }
        }
        // Removed from the speaker: Cease, and report the session down.
        self.feed(Event::Stop).await;
        if let Some((_, handle)) = self.connecting.take() {
            handle.abort();
        }
    }

    fn on_command(&mut self, cmd: PeerCommand) {
        match cmd {
            PeerCommand::Announce(routes) => {
                for (prefix, next_hop) in &routes {
                    self.rib.insert(*prefix, *next_hop);
                }
                if self.fsm.state() == State::Established {
                    let updates = self.announcements(routes.iter().map(|(p, nh)| (p, nh)));
                    self.send_updates(updates);
                }
            }
            PeerCommand::Withdraw(prefixes) => {
                let mut gone: Vec<Ipv4Network> = prefixes
                    .into_iter()
                    .filter(|p| self.rib.remove(p).is_some())
                    .collect();
                gone.retain(|p| policy::accepts(&self.peer.export, p));
                if self.fsm.state() == State::Established && !gone.is_empty() {
                    self.send_updates(adj_out::withdrawals(&gone));
                }
            }
        }
    }

    async fn on_internal(&mut self, internal: Internal) {
        let event = match internal {
            Internal::Connected(conn, stream) => {
                if self.connecting.as_ref().is_some_and(|(id, _)| *id == conn) {
                    self.connecting = None;
                }
                self.add_conn_with_id(conn, stream);
                Event::Connected {
                    conn,
                    outbound: true,
                }
            }
            Internal::ConnectFailed(conn, err) => {
                debug!(peer = %self.peer.addr, error = %chain(&err), "connect failed");
                if self.connecting.as_ref().is_none_or(|(id, _)| *id != conn) {
                    return;
                }
                self.connecting = None;
                Event::ConnectFailed
            }
            Internal::Message(conn, msg) => Event::Received { conn, msg },
            Internal::Malformed(conn, notification) => {
                warn!(peer = %self.peer.addr, %notification, "malformed message");
                Event::Malformed { conn, notification }
            }
            Internal::Closed(conn) => Event::Closed { conn },
            Internal::Stalled(conn) => {
                warn!(peer = %self.peer.addr, stall = ?WRITE_STALL, "the peer does not read what we send");
                Event::SendBlocked { conn }
            }
        };
        self.feed(event).await;
    }

    /// Feeds the FSM one event and carries out its actions, then tells it
    /// of send queues that overflowed meanwhile.
    async fn feed(&mut self, event: Event) {
        let before = self.fsm.state();
        let mut actions = self.fsm.handle(event);
        loop {
            for action in actions {
                self.apply(action).await;
            }
            let Some(conn) = self.blocked.pop() else {
                break;
            };
            actions = self.fsm.handle(Event::SendBlocked { conn });
        }
        if self.fsm.state() != before {
            info!(peer = %self.peer.addr, from = %before, to = %self.fsm.state(), "BGP state change");
            self.set_status();
        }
    }

    async fn apply(&mut self, action: Action) {
        match action {
            Action::Connect => self.connect(),
            Action::Send { conn, msg } => self.send(conn, &msg),
            Action::Close { conn } => {
                self.conns.remove(&conn);
            }
            Action::StartTimer(timer, after) => {
                self.timers.insert(timer, Instant::now() + after);
            }
            Action::StopTimer(timer) => {
                self.timers.remove(&timer);
            }
            Action::Up(_) => {
                self.emit(SpeakerEvent::PeerUp {
                    peer: self.peer.addr,
                })
                .await
            }
            Action::Down => {
                self.emit(SpeakerEvent::PeerDown {
                    peer: self.peer.addr,
                })
                .await
            }
            Action::Stale => {
                info!(peer = %self.peer.addr, "session lost; keeping the peer's routes while it restarts");
                self.emit(SpeakerEvent::PeerStale {
                    peer: self.peer.addr,
                })
                .await
            }
            Action::PurgeStale => {
                self.emit(SpeakerEvent::PurgeStale {
                    peer: self.peer.addr,
                })
                .await
            }
            Action::AdvertiseAll => {
                let rib = std::mem::take(&mut self.rib);
                let updates = self.announcements(rib.iter());
                self.rib = rib;
                self.send_updates(updates);
            }
            Action::Learned { next_hop, prefixes } => {
                let peer = self.peer.addr;
                self.emit(SpeakerEvent::RoutesLearned {
                    peer,
                    next_hop,
                    prefixes,
                })
                .await;
            }
            Action::Withdrawn(prefixes) => {
                let peer = self.peer.addr;
                self.emit(SpeakerEvent::RoutesWithdrawn { peer, prefixes })
                    .await;
            }
            Action::TreatedAsWithdraw(notification) => {
                warn!(peer = %self.peer.addr, %notification, "UPDATE treated as withdraw");
            }
        }
    }

    async fn emit(&self, event: SpeakerEvent) {
        if self.events.send(event).await.is_err() {
            debug!(peer = %self.peer.addr, "speaker event receiver dropped");
        }
    }

    fn set_status(&self) {
        let state = self.fsm.state();
        let info = match (state, self.fsm.last_error()) {
            (State::Established, _) | (_, None) => state.to_string(),
            (_, Some(err)) => err.to_string(),
        };
        if let Ok(mut table) = self.status.lock() {
            table.insert(
                self.peer.addr,
                PeerStatus {
                    addr: self.peer.addr,
                    peer_type: self.peer.peer_type,
                    state,
                    since: SystemTime::now(),
                    info,
                },
            );
        }
    }

    fn announcements<'a>(
        &self,
        routes: impl IntoIterator<Item = (&'a Ipv4Network, &'a Option<Ipv4Addr>)>,
    ) -> Vec<Update> {
        let local_addr = self
            .fsm
            .negotiated()
            .and_then(|n| self.conns.get(&n.conn))
            .map_or(self.local.router_id, |c| c.local_addr);
        let out = OutPolicy {
            local_asn: self.local.asn,
            peer_asn: self.peer.asn,
            local_addr,
            next_hop_self: self.peer.next_hop_self,
        };
        let exported = routes
            .into_iter()
            .filter(|(p, _)| policy::accepts(&self.peer.export, p));
        adj_out::announcements(&out, exported)
    }

    fn send_updates(&mut self, updates: Vec<Update>) {
        let Some(conn) = self.fsm.negotiated().map(|n| n.conn) else {
            return;
        };
        for update in updates {
            self.send(conn, &Message::Update(update));
        }
    }

    fn send(&mut self, conn: ConnId, msg: &Message) {
        let asn4 = self.fsm.negotiated().is_some_and(|n| n.asn4);
        self.scratch.clear();
        if let Err(err) = codec::encode(msg, asn4, &mut self.scratch) {
            warn!(peer = %self.peer.addr, error = %chain(&err), kind = msg.kind(), "cannot encode message");
            return;
        }
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        match c.writer.try_send(self.scratch.split().freeze()) {
            Ok(()) => {}
            // The writer is gone; its reader reports the close.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.blocked.contains(&conn) {
                    warn!(peer = %self.peer.addr, queued = WRITE_QUEUE, "send queue full: the peer does not read");
                    self.blocked.push(conn);
                }
            }
        }
    }

    fn connect(&mut self) {
        if let Some((_, handle)) = self.connecting.take() {
            handle.abort();
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        let remote = SocketAddrV4::new(self.peer.addr, self.local.listen_port);
        let local = SocketAddrV4::new(self.local.listen_addr, 0);
        let password = self.peer.password.clone();
        let tx = self.internal_tx.clone();
        let task = tokio::spawn(async move {
            let msg = match connect(local, remote, password.as_deref()).await {
                Ok(stream) => Internal::Connected(conn, stream),
                Err(err) => Internal::ConnectFailed(conn, err),
            };
            let _ = tx.send(msg).await;
        });
        self.connecting = Some((conn, task.abort_handle()));
    }

    fn add_conn(&mut self, stream: TcpStream) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.add_conn_with_id(conn, stream);
        conn
    }

    fn add_conn_with_id(&mut self, conn: ConnId, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let local_addr = match stream.local_addr() {
            Ok(SocketAddr::V4(a)) => *a.ip(),
            _ => self.local.router_id,
        };
        let (read, write) = stream.into_split();
        let (writer, queue) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(write_loop(conn, write, queue, self.internal_tx.clone()));
        let reader = tokio::spawn(read_loop(
            conn,
            self.peer.addr,
            read,
            self.internal_tx.clone(),
        ))
        .abort_handle();
        self.conns.insert(
            conn,
            Conn {
                writer,
                reader,
                local_addr,
            },
        );
    }
}

/// Opens a TCP connection from `local` to `remote`, signed with `password`.
async fn connect(
    local: SocketAddrV4,
    remote: SocketAddrV4,
    password: Option<&str>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    if !local.ip().is_unspecified() {
        socket.bind(local.into())?;
    }
    if let Some(key) = password {
        set_md5_key(socket.as_raw_fd(), *remote.ip(), key.as_bytes())?;
    }
    socket.connect(remote.into()).await
}

/// Writes the queue to the socket; a write the peer does not take in
/// [`WRITE_STALL`] ends it (the peer task hears of it).
async fn write_loop(
    conn: ConnId,
    mut write: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Bytes>,
    tx: mpsc::Sender<Internal>,
) {
    while let Some(bytes) = queue.recv().await {
        match tokio::time::timeout(WRITE_STALL, write.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                let _ = tx.send(Internal::Stalled(conn)).await;
                return;
            }
        }
    }
    let _ = tokio::time::timeout(WRITE_STALL, write.shutdown()).await;
}

/// Reads and decodes messages until the connection closes or a message is
/// malformed (an UPDATE error RFC 7606 handles without a reset is logged
/// here). Tracks the 4-octet AS capability itself: Tabby always sends it,
/// so the peer's OPEN decides.
async fn read_loop(
    conn: ConnId,
    peer: Ipv4Addr,
    mut read: OwnedReadHalf,
    tx: mpsc::Sender<Internal>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut asn4 = false;
    loop {
        loop {
            match codec::decode_from_checked(&mut buf, asn4) {
                Ok(Some(codec::Decoded {
                    message: msg,
                    error,
                })) => {
                    if let Some(e) = error {
                        warn!(%peer, notification = %e.notification, handling = ?e.handling, "malformed UPDATE handled without a reset");
                    }
                    if let Message::Open(open) = &msg {
                        asn4 = open.four_octet_as();
                    }
                    if tx.send(Internal::Message(conn, msg)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(notification) => {
                    let _ = tx.send(Internal::Malformed(conn, notification)).await;
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < codec::MAX_MESSAGE_LEN {
            buf.reserve(64 * 1024);
        }
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = tx.send(Internal::Closed(conn)).await;
                return;
            }
            Ok(_) => {}
        }
    }
}
