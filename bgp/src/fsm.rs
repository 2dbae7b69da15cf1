//! The RFC 4271 §8 finite state machine of one peer, as a pure function of
//! events to actions.
//!
//! It owns no socket and no clock: the session runtime
//! ([`session`](super::session)) feeds it [`Event`]s (timer expiries,
//! connections made and lost, decoded messages) and carries out the
//! [`Action`]s it returns (send, close, connect, arm a timer, report
//! routes). Unit tests drive it directly.
//!
//! A peer may have two connections at once (one we opened, one the peer
//! opened): the *primary* carries the session and a second one, the
//! *candidate*, is kept only until its OPEN names the remote BGP identifier,
//! when collision detection (RFC 4271 §6.8) keeps one and closes the other
//! with Cease 6/7.
//!
//! Graceful restart (RFC 4724), both sides: our OPEN advertises the
//! capability (restart time, IPv4 unicast with the F bit: the kernel keeps
//! Tabby's routes across a restart) and we send End-of-RIB after the
//! initial advertisement. When the TCP connection of a peer that advertised
//! IPv4 unicast in its capability drops (not a NOTIFICATION, not a hold
//! timer expiry), its routes are kept and marked stale ([`Action::Stale`])
//! for its restart time; once it is back with the F bit they stay until its
//! End-of-RIB or `stale_time`, then those not re-sent go
//! ([`Action::PurgeStale`]); if it does not come back, [`Action::Down`].

use std::collections::HashSet;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use super::message::{
    code, Capability, GrFamily, GracefulRestart, Message, Notification, Open, Update, AFI_IPV4,
    SAFI_UNICAST,
};

mod types;

pub use types::{
    Action, ConnId, Event, FsmConfig, Negotiated, PeerRestart, State, Timer, OPEN_HOLD_TIME,
};

#[derive(Debug, Clone, Copy)]
struct Conn {
    id: ConnId,
    outbound: bool,
}

/// The state machine of one peer.
#[derive(Debug)]
pub struct Fsm {
    config: FsmConfig,
    state: State,
    stopped: bool,
    retry_delay: Duration,
    primary: Option<Conn>,
    candidate: Option<Conn>,
    negotiated: Option<Negotiated>,
    last_error: Option<String>,
    /// The prefixes the peer announces now (its Adj-RIB-In), for max-prefix.
    received: HashSet<Ipv4Network>,
    /// Routes of a gracefully restarting peer are kept, marked stale.
    stale: bool,
    /// No session reached Established yet (the R bit of our OPEN).
    restarted: bool,
}

impl Fsm {
    /// A stopped FSM in Idle; send [`Event::Start`] to bring it up.
    pub fn new(config: FsmConfig) -> Self {
        let retry_delay = config.connect_retry;
        Fsm {
            config,
            state: State::Idle,
            stopped: true,
            retry_delay,
            primary: None,
            candidate: None,
            negotiated: None,
            last_error: None,
            received: HashSet::new(),
            stale: false,
            restarted: true,
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The negotiated parameters while OpenConfirm or Established.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// The last error, for `node status`'s INFO column.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Whether the peer's routes are kept as stale (it is restarting).
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// The OPEN we send: IPv4 unicast, route refresh, 4-octet AS, and
    /// graceful restart unless its restart time is 0.
    pub fn open_message(&self) -> Message {
        let mut capabilities = vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::RouteRefresh,
            Capability::FourOctetAs(self.config.local_asn),
        ];
        if self.config.restart_time > 0 {
            capabilities.push(Capability::GracefulRestart(GracefulRestart {
                restarted: self.restarted,
                restart_time: self.config.restart_time,
                families: vec![GrFamily {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                    forwarding: true,
                }],
            }));
        }
        Message::Open(Open {
            asn: self.config.local_asn,
            hold_time: self.config.hold_time,
            router_id: self.config.router_id,
            capabilities,
        })
    }

    /// Feeds one event and returns the actions to carry out.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => {
                if self.state == State::Idle {
                    self.stopped = false;
                    self.start_connect(&mut out);
                }
            }
            Event::Stop => {
                self.stopped = true;
                let cease = Notification::new(code::CEASE, code::ADMIN_SHUTDOWN);
                self.reset(&mut out, Some(cease), "stopped");
                out.push(Action::StopTimer(Timer::ConnectRetry));
                self.last_error = None;
            }
            Event::TimerExpired(timer) => self.on_timer(timer, &mut out),
            Event::Connected { conn, outbound } => {
                self.on_connected(Conn { id: conn, outbound }, &mut out)
            }
            Event::ConnectFailed => {
                if self.state == State::Connect {
                    // The retry timer keeps running; the next one waits longer.
                    self.state = State::Active;
                    self.back_off();
                }
            }
            Event::Closed { conn } => {
                if self.is_candidate(conn) {
                    self.candidate = None;
                } else if self.is_primary(conn) {
                    self.primary = None;
                    if let (State::OpenSent, Some(candidate)) = (self.state, self.candidate.take())
                    {
                        // The other connection already has our OPEN: carry on there.
                        self.primary = Some(candidate);
                    } else if self.state == State::OpenSent {
                        // RFC 4271 §8.2.2: back to Active, retry later.
                        self.state = State::Active;
                        out.push(Action::StopTimer(Timer::Hold));
                        self.arm_retry(&mut out);
                        self.back_off();
                    } else {
                        self.connection_lost(&mut out);
                    }
                }
            }
            Event::SendBlocked { conn } => {
                if self.is_candidate(conn) {
                    self.drop_candidate(&mut out, None);
                } else if self.is_primary(conn) {
                    let n = Notification::new(code::CEASE, code::OUT_OF_RESOURCES);
                    self.reset(&mut out, Some(n), "the peer does not read: send queue full");
                }
            }
            Event::Malformed { conn, notification } => {
                if self.is_candidate(conn) {
                    self.drop_candidate(&mut out, Some(notification));
                } else if self.is_primary(conn) {
                    let reason = format!("sent {notification}");
                    self.reset(&mut out, Some(notification), &reason);
                }
            }
            Event::Received { conn, msg } => {
                if self.is_candidate(conn) {
                    self.on_candidate_message(msg, &mut out);
                } else if self.is_primary(conn) {
                    self.on_message(conn, msg, &mut out);
                }
            }
        }
        out
    }

    fn is_primary(&self, conn: ConnId) -> bool {
        self.primary.is_some_and(|c| c.id == conn)
    }

    fn is_candidate(&self, conn: ConnId) -> bool {
        self.candidate.is_some_and(|c| c.id == conn)
    }

    /// Doubles the connect-retry delay after a failure, up to the cap.
    fn back_off(&mut self) {
        self.retry_delay = (self.retry_delay * 2).min(self.config.connect_retry_max);
    }

    /// Arms the connect-retry timer with the current delay.
    fn arm_retry(&mut self, out: &mut Vec<Action>) {
        out.push(Action::StartTimer(Timer::ConnectRetry, self.retry_delay));
    }

    /// The current connect-retry delay.
    pub fn retry_delay(&self) -> Duration {
        self.retry_delay
    }

    fn start_connect(&mut self, out: &mut Vec<Action>) {
        self.state = State::Connect;
        out.push(Action::Connect);
        self.arm_retry(out);
    }

    fn on_timer(&mut self, timer: Timer, out: &mut Vec<Action>) {
        match (timer, self.state) {
            (Timer::ConnectRetry, State::Idle) if !self.stopped => self.start_connect(out),
            (Timer::ConnectRetry, State::Connect) => {
                // The attempt hung for a whole delay: a failure.
                self.back_off();
                self.start_connect(out);
            }
            (Timer::ConnectRetry, State::Active) => self.start_connect(out),
            (Timer::Hold, State::OpenSent | State::OpenConfirm | State::Established) => {
                let n = Notification::new(code::HOLD_TIMER_EXPIRED, 0);
                self.reset(out, Some(n), "hold timer expired");
            }
            (Timer::Restart, state) if self.stale && state != State::Established => {
                // The restarting peer did not come back in time.
                self.stale = false;
                self.last_error = Some("the restarting peer did not come back in time".into());
                out.push(Action::StopTimer(Timer::Stale));
                out.push(Action::Down);
            }
            (Timer::Stale, _) if self.stale => {
                // Back, but no End-of-RIB in time: what it did not re-send goes.
                self.stale = false;
                out.push(Action::PurgeStale);
            }
            (Timer::Keepalive, State::OpenConfirm | State::Established) => {
                if let (Some(conn), Some(n)) = (self.primary, &self.negotiated) {
                    out.push(Action::Send {
                        conn: conn.id,
                        msg: Message::Keepalive,
                    });
                    out.push(Action::StartTimer(Timer::Keepalive, secs(n.keepalive)));
                }
            }
            _ => {}
        }
    }

    fn on_connected(&mut self, conn: Conn, out: &mut Vec<Action>) {
        match self.state {
            State::Connect | State::Active => self.use_connection(conn, out),
            State::Idle if !self.stopped => self.use_connection(conn, out),
            State::OpenSent | State::OpenConfirm if self.candidate.is_none() => {
                self.candidate = Some(conn);
                out.push(Action::Send {
                    conn: conn.id,
                    msg: self.open_message(),
                });
            }
            State::Established => {
                let n = Notification::new(code::CEASE, code::COLLISION_RESOLUTION);
                out.push(Action::Send {
                    conn: conn.id,
                    msg: Message::Notification(n),
                });
                out.push(Action::Close { conn: conn.id });
            }
            _ => out.push(Action::Close { conn: conn.id }),
        }
    }

    fn use_connection(&mut self, conn: Conn, out: &mut Vec<Action>) {
        self.primary = Some(conn);
        self.state = State::OpenSent;
        out.push(Action::StopTimer(Timer::ConnectRetry));
        out.push(Action::Send {
            conn: conn.id,
            msg: self.open_message(),
        });
        out.push(Action::StartTimer(Timer::Hold, OPEN_HOLD_TIME));
    }

    /// Checks the peer's OPEN (RFC 4271 §6.2) and negotiates timers.
    pub fn validate_open(&self, conn: ConnId, open: &Open) -> Result<Negotiated, Notification> {
        if open.asn != self.config.peer_asn {
            return Err(Notification::new(code::OPEN, code::BAD_PEER_AS));
        }
        let id = open.router_id;
        let ibgp = self.config.peer_asn == self.config.local_asn;
        if id.is_unspecified()
            || id.is_multicast()
            || id.is_broadcast()
            || (ibgp && id == self.config.router_id)
        {
            return Err(Notification::with_data(
                code::OPEN,
                code::BAD_BGP_IDENTIFIER,
                id.octets(),
            ));
        }
        if open.hold_time == 1 || open.hold_time == 2 {
            return Err(Notification::with_data(
                code::OPEN,
                code::UNACCEPTABLE_HOLD_TIME,
                open.hold_time.to_be_bytes(),
            ));
        }
        let hold_time = self.config.hold_time.min(open.hold_time);
        let keepalive = if hold_time == 0 {
            0
        } else {
            self.config.keepalive.min(hold_time / 3).max(1)
        };
        let gr = open.graceful_restart();
        let peer_restart = gr.filter(|_| self.config.restart_time > 0).and_then(|gr| {
            gr.families
                .iter()
                .find(|f| f.afi == AFI_IPV4 && f.safi == SAFI_UNICAST)
                .map(|f| PeerRestart {
                    restart_time: gr.restart_time,
                    forwarding: f.forwarding,
                })
        });
        Ok(Negotiated {
            conn,
            hold_time,
            keepalive,
            asn4: open.four_octet_as(),
            route_refresh: open.route_refresh(),
            remote_id: id,
            peer_restart,
            end_of_rib: gr.is_some(),
        })
    }

    fn on_candidate_message(&mut self, msg: Message, out: &mut Vec<Action>) {
        let (Some(candidate), Some(primary)) = (self.candidate, self.primary) else {
            return;
        };
        let Message::Open(open) = msg else {
            // Anything but an OPEN on a connection still in collision: drop it.
            self.drop_candidate(out, None);
            return;
        };
        let negotiated = match self.validate_open(candidate.id, &open) {
            Ok(n) => n,
            Err(n) => return self.drop_candidate(out, Some(n)),
        };
        // RFC 4271 §6.8: keep the connection opened by the higher identifier.
        let keep_outbound = u32::from(self.config.router_id) > u32::from(open.router_id);
        if candidate.outbound == keep_outbound && primary.outbound != keep_outbound {
            let cease = Notification::new(code::CEASE, code::COLLISION_RESOLUTION);
            out.push(Action::Send {
                conn: primary.id,
                msg: Message::Notification(cease),
            });
            out.push(Action::Close { conn: primary.id });
            self.primary = Some(candidate);
            self.candidate = None;
            self.open_confirm(negotiated, out);
        } else {
            let cease = Notification::new(code::CEASE, code::COLLISION_RESOLUTION);
            self.drop_candidate(out, Some(cease));
        }
    }

    fn drop_candidate(&mut self, out: &mut Vec<Action>, notification: Option<Notification>) {
        if let Some(c) = self.candidate.take() {
            if let Some(n) = notification {
                out.push(Action::Send {
                    conn: c.id,
                    msg: Message::Notification(n),
                });
            }
            out.push(Action::Close { conn: c.id });
        }
    }

    fn open_confirm(&mut self, n: Negotiated, out: &mut Vec<Action>) {
        out.push(Action::Send {
            conn: n.conn,
            msg: Message::Keepalive,
        });
        if n.hold_time == 0 {
            out.push(Action::StopTimer(Timer::Hold));
            out.push(Action::StopTimer(Timer::Keepalive));
        } else {
            out.push(Action::StartTimer(Timer::Hold, secs(n.hold_time)));
            out.push(Action::StartTimer(Timer::Keepalive, secs(n.keepalive)));
        }
        self.negotiated = Some(n);
        self.state = State::OpenConfirm;
    }

    fn restart_hold(&self, out: &mut Vec<Action>) {
        if let Some(n) = self.negotiated.as_ref().filter(|n| n.hold_time > 0) {
            out.push(Action::StartTimer(Timer::Hold, secs(n.hold_time)));
        }
    }

    fn on_message(&mut self, conn: ConnId, msg: Message, out: &mut Vec<Action>) {
        let unexpected = |subcode| Some(Notification::new(code::FSM, subcode));
        match (self.state, msg) {
            (_, Message::Notification(n)) => {
                let reason = format!("received {n}");
                self.reset(out, None, &reason);
            }
            (State::OpenSent, Message::Open(open)) => match self.validate_open(conn, &open) {
                Ok(n) => self.open_confirm(n, out),
                Err(n) => {
                    let reason = format!("sent {n}");
                    self.reset(out, Some(n), &reason);
                }
            },
            (State::OpenSent, _) => self.reset(
                out,
                unexpected(code::FSM_OPEN_SENT),
                "unexpected message in OpenSent",
            ),
            (State::OpenConfirm, Message::Keepalive) => self.established(conn, out),
            (State::OpenConfirm, _) => self.reset(
                out,
                unexpected(code::FSM_OPEN_CONFIRM),
                "unexpected message in OpenConfirm",
            ),
            (State::Established, Message::Keepalive) => self.restart_hold(out),
            (State::Established, Message::Update(update)) => {
                self.restart_hold(out);
                if let Err(n) = self.on_update(update, out) {
                    let reason = format!("sent {n}");
                    self.reset(out, Some(n), &reason);
                }
            }
            (State::Established, Message::RouteRefresh(rr))
                if rr.afi == AFI_IPV4 && rr.safi == SAFI_UNICAST =>
            {
                out.push(Action::AdvertiseAll);
            }
            (State::Established, Message::Open(_)) => self.reset(
                out,
                unexpected(code::FSM_ESTABLISHED),
                "unexpected OPEN in Established",
            ),
            _ => {}
        }
    }

    fn established(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        self.state = State::Established;
        self.retry_delay = self.config.connect_retry;
        self.last_error = None;
        self.restarted = false;
        self.restart_hold(out);
        let Some(n) = self.negotiated.clone() else {
            return;
        };
        out.push(Action::Up(n.clone()));
        out.push(Action::AdvertiseAll);
        if n.end_of_rib {
            out.push(Action::Send {
                conn,
                msg: Message::Update(Update::default()),
            });
        }
        if self.stale {
            out.push(Action::StopTimer(Timer::Restart));
            if n.peer_restart.is_some_and(|r| r.forwarding) {
                out.push(Action::StartTimer(Timer::Stale, self.config.stale_time));
            } else {
                // It did not keep forwarding: its old routes are no good.
                self.stale = false;
                out.push(Action::PurgeStale);
            }
        }
    }

    /// The TCP connection of the session is gone without a NOTIFICATION:
    /// a restarting peer keeps its routes (stale), others lose them.
    fn connection_lost(&mut self, out: &mut Vec<Action>) {
        let restart = self
            .negotiated
            .as_ref()
            .and_then(|n| n.peer_restart)
            .filter(|r| r.restart_time > 0 && self.state == State::Established);
        let Some(restart) = restart else {
            return self.reset(out, None, "connection closed by peer");
        };
        let reason = format!(
            "connection closed by peer; keeping its routes for {} s (graceful restart)",
            restart.restart_time
        );
        self.teardown(out, None, &reason, true);
        out.push(Action::StopTimer(Timer::Stale));
        out.push(Action::StartTimer(
            Timer::Restart,
            secs(restart.restart_time),
        ));
    }

    /// Turns an UPDATE into route actions. Routes the peer may not give us
    /// are withdrawn instead (RFC 7606 §3 e): an eBGP path that does not start
    /// with the peer's AS (RFC 4271 §6.3, 3/11), a next hop that is no host
    /// address or is our own (§6.3: log, ignore the route, no NOTIFICATION;
    /// 3/8 in the log); paths holding our AS are loops. More prefixes than
    /// `max_prefix` is an error: Cease 6/1 (RFC 4486).
    fn on_update(&mut self, update: Update, out: &mut Vec<Action>) -> Result<(), Notification> {
        if update.is_end_of_rib() {
            if std::mem::take(&mut self.stale) {
                out.push(Action::StopTimer(Timer::Stale));
                out.push(Action::PurgeStale);
            }
            return Ok(());
        }
        let Update {
            mut withdrawn,
            attributes,
            nlri,
        } = update;
        let mut learned = None;
        if let (Some(attrs), false) = (attributes, nlri.is_empty()) {
            let ebgp = self.config.peer_asn != self.config.local_asn;
            let problem = if ebgp && attrs.as_path.first() != Some(&self.config.peer_asn) {
                Some(Notification::new(code::UPDATE, code::MALFORMED_AS_PATH))
            } else if is_martian_next_hop(attrs.next_hop) || attrs.next_hop == self.config.router_id
            {
                let mut data = vec![0x40, 3, 4];
                data.extend_from_slice(&attrs.next_hop.octets());
                Some(Notification::with_data(
                    code::UPDATE,
                    code::INVALID_NEXT_HOP,
                    data,
                ))
            } else {
                None
            };
            if let Some(n) = problem {
                out.push(Action::TreatedAsWithdraw(n));
                withdrawn.extend(nlri);
            } else if attrs.as_path.contains(&self.config.local_asn) {
                // A loop: the peer's route replaces nothing we may use.
                withdrawn.extend(nlri);
            } else {
                learned = Some((attrs.next_hop, nlri));
            }
        }
        if let Some(max) = self.config.max_prefix {
            // Only a limited peer pays for counting.
            if let Some((_, prefixes)) = &learned {
                self.received.extend(prefixes.iter().copied());
            }
            for p in &withdrawn {
                self.received.remove(p);
            }
            if self.received.len() > max as usize {
                let mut data = vec![0, 1, 1]; // AFI IPv4, SAFI unicast
                data.extend_from_slice(&max.to_be_bytes());
                return Err(Notification::with_data(
                    code::CEASE,
                    code::MAX_PREFIXES,
                    data,
                ));
            }
        }
        if let Some((next_hop, prefixes)) = learned {
            out.push(Action::Learned { next_hop, prefixes });
        }
        if !withdrawn.is_empty() {
            out.push(Action::Withdrawn(withdrawn));
        }
        Ok(())
    }

    /// Closes every connection (sending `notification` on the primary), goes
    /// to Idle and arms the automatic restart unless stopped. The routes go
    /// with an Established session, and stale ones when stopped.
    fn reset(&mut self, out: &mut Vec<Action>, notification: Option<Notification>, reason: &str) {
        self.teardown(out, notification, reason, false);
    }

    /// [`Self::reset`]; `graceful` keeps the routes, marked stale.
    fn teardown(
        &mut self,
        out: &mut Vec<Action>,
        notification: Option<Notification>,
        reason: &str,
        graceful: bool,
    ) {
        if let Some(conn) = self.primary.take() {
            if let Some(n) = notification {
                out.push(Action::Send {
                    conn: conn.id,
                    msg: Message::Notification(n),
                });
            }
            out.push(Action::Close { conn: conn.id });
        }
        self.drop_candidate(out, None);
        out.push(Action::StopTimer(Timer::Hold));
        out.push(Action::StopTimer(Timer::Keepalive));
        if graceful {
            self.stale = true;
            out.push(Action::Stale);
        } else if self.state == State::Established || (self.stale && self.stopped) {
            if std::mem::take(&mut self.stale) {
                out.push(Action::StopTimer(Timer::Restart));
                out.push(Action::StopTimer(Timer::Stale));
            }
            out.push(Action::Down);
        }
        self.negotiated = None;
        self.received.clear();
        self.state = State::Idle;
        self.last_error = Some(reason.to_string());
        if !self.stopped {
            self.arm_retry(out);
            self.back_off();
        }
    }
}

/// Whether `ip` cannot be a next hop: "this network" 0/8, loopback 127/8,
/// multicast 224/4, class E 240/4 and the limited broadcast address.
pub fn is_martian_next_hop(ip: std::net::Ipv4Addr) -> bool {
    let first = ip.octets()[0];
    first == 0 || first == 127 || first >= 224
}

fn secs(s: u16) -> Duration {
    Duration::from_secs(u64::from(s))
}

#[cfg(test)]
mod restart_tests;
#[cfg(test)]
mod tests;
