//! Graceful restart (RFC 4724) in the FSM, both sides, driven by hand.

use super::*;
use crate::message::{Origin, PathAttributes};
use std::net::Ipv4Addr;

const PEER_ID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn config() -> FsmConfig {
    FsmConfig {
        local_asn: 64512,
        router_id: Ipv4Addr::new(10, 0, 0, 2),
        peer_asn: 64512,
        hold_time: 9,
        keepalive: 3,
        connect_retry: Duration::from_secs(1),
        connect_retry_max: Duration::from_secs(8),
        max_prefix: None,
        restart_time: 120,
        stale_time: Duration::from_secs(360),
    }
}

/// The peer's OPEN: graceful restart with `restart_time` and IPv4 unicast
/// with F = `forwarding`, or no such capability.
fn peer_open(gr: Option<(u16, bool)>) -> Message {
    let mut capabilities = vec![Capability::FourOctetAs(64512)];
    if let Some((restart_time, forwarding)) = gr {
        capabilities.push(Capability::GracefulRestart(GracefulRestart {
            restarted: false,
            restart_time,
            families: vec![GrFamily {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
                forwarding,
            }],
        }));
    }
    Message::Open(Open {
        asn: 64512,
        hold_time: 9,
        router_id: PEER_ID,
        capabilities,
    })
}

/// Brings `fsm` to Established on connection `conn`; returns the last actions.
fn establish(fsm: &mut Fsm, conn: ConnId, gr: Option<(u16, bool)>) -> Vec<Action> {
    fsm.handle(Event::Start);
    fsm.handle(Event::Connected {
        conn,
        outbound: true,
    });
    fsm.handle(Event::Received {
        conn,
        msg: peer_open(gr),
    });
    let actions = fsm.handle(Event::Received {
        conn,
        msg: Message::Keepalive,
    });
    assert_eq!(fsm.state(), State::Established);
    actions
}

fn route_actions(actions: &[Action]) -> Vec<&Action> {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Down | Action::Stale | Action::PurgeStale))
        .collect()
}

fn end_of_rib() -> Message {
    Message::Update(Update::default())
}

#[test]
fn our_open_advertises_a_restart_time_with_forwarding_kept_and_the_r_bit_only_at_first() {
    let mut fsm = Fsm::new(config());
    let Message::Open(open) = fsm.open_message() else {
        panic!()
    };
    let gr = open.graceful_restart().expect("the capability");
    assert_eq!((gr.restart_time, gr.restarted), (120, true));
    assert_eq!(
        gr.families,
        vec![GrFamily {
            afi: 1,
            safi: 1,
            forwarding: true
        }]
    );
    establish(&mut fsm, 0, Some((120, true)));
    let Message::Open(open) = fsm.open_message() else {
        panic!()
    };
    assert!(!open.graceful_restart().unwrap().restarted);
    let mut off = config();
    off.restart_time = 0;
    let Message::Open(open) = Fsm::new(off).open_message() else {
        panic!()
    };
    assert!(open.graceful_restart().is_none());
}

#[test]
fn a_peer_that_understands_it_gets_end_of_rib_after_the_initial_routes() {
    let mut fsm = Fsm::new(config());
    let actions = establish(&mut fsm, 0, Some((120, true)));
    let all = actions
        .iter()
        .position(|a| *a == Action::AdvertiseAll)
        .unwrap();
    let eor = actions
        .iter()
        .position(|a| matches!(a, Action::Send { msg, .. } if *msg == end_of_rib()))
        .expect("End-of-RIB");
    assert!(all < eor, "{actions:?}");
    let mut plain = Fsm::new(config());
    let actions = establish(&mut plain, 0, None);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Send { msg, .. } if *msg == end_of_rib())),
        "no End-of-RIB to a peer without the capability"
    );
}

#[test]
fn a_restarting_peer_keeps_its_routes_until_its_end_of_rib_purges_the_stale_ones() {
    let mut fsm = Fsm::new(config());
    establish(&mut fsm, 0, Some((90, true)));
    let lost = fsm.handle(Event::Closed { conn: 0 });
    assert_eq!(route_actions(&lost), [&Action::Stale], "no Down: {lost:?}");
    assert!(lost.contains(&Action::StartTimer(Timer::Restart, Duration::from_secs(90))));
    assert!(fsm.is_stale());
    assert_eq!(fsm.state(), State::Idle);
    // A failed attempt in between does not end the restart.
    fsm.handle(Event::TimerExpired(Timer::ConnectRetry));
    fsm.handle(Event::ConnectFailed);
    assert!(fsm.is_stale());
    // It is back, forwarding kept: the stale routes wait for its End-of-RIB.
    fsm.handle(Event::TimerExpired(Timer::ConnectRetry));
    fsm.handle(Event::Connected {
        conn: 1,
        outbound: true,
    });
    fsm.handle(Event::Received {
        conn: 1,
        msg: peer_open(Some((90, true))),
    });
    let up = fsm.handle(Event::Received {
        conn: 1,
        msg: Message::Keepalive,
    });
    assert!(route_actions(&up).is_empty(), "{up:?}");
    assert!(up.contains(&Action::StopTimer(Timer::Restart)));
    assert!(up.contains(&Action::StartTimer(Timer::Stale, Duration::from_secs(360))));
    let attrs = PathAttributes {
        origin: Origin::Igp,
        as_path: vec![],
        next_hop: PEER_ID,
        local_pref: Some(100),
        med: None,
    };
    let update = Message::Update(Update {
        withdrawn: vec![],
        attributes: Some(attrs),
        nlri: vec!["10.244.1.0/26".parse().unwrap()],
    });
    let learned = fsm.handle(Event::Received {
        conn: 1,
        msg: update,
    });
    assert!(matches!(learned.last(), Some(Action::Learned { .. })));
    let done = fsm.handle(Event::Received {
        conn: 1,
        msg: end_of_rib(),
    });
    assert_eq!(route_actions(&done), [&Action::PurgeStale]);
    assert!(done.contains(&Action::StopTimer(Timer::Stale)));
    assert!(!fsm.is_stale());
    let again = fsm.handle(Event::Received {
        conn: 1,
        msg: end_of_rib(),
    });
    assert!(route_actions(&again).is_empty(), "{again:?}");
}

#[test]
fn a_peer_that_does_not_come_back_in_its_restart_time_loses_its_routes() {
    let mut fsm = Fsm::new(config());
    establish(&mut fsm, 0, Some((90, true)));
    fsm.handle(Event::Closed { conn: 0 });
    let expired = fsm.handle(Event::TimerExpired(Timer::Restart));
    assert_eq!(route_actions(&expired), [&Action::Down]);
    assert!(!fsm.is_stale());
    assert_eq!(
        fsm.last_error(),
        Some("the restarting peer did not come back in time")
    );
}

#[test]
fn back_without_forwarding_or_without_end_of_rib_in_time_the_stale_routes_go() {
    let mut fsm = Fsm::new(config());
    establish(&mut fsm, 0, Some((90, true)));
    fsm.handle(Event::Closed { conn: 0 });
    let no_f = establish(&mut fsm, 1, Some((90, false)));
    assert_eq!(route_actions(&no_f), [&Action::PurgeStale], "{no_f:?}");

    let mut slow = Fsm::new(config());
    establish(&mut slow, 0, Some((90, true)));
    slow.handle(Event::Closed { conn: 0 });
    establish(&mut slow, 1, Some((90, true)));
    let expired = slow.handle(Event::TimerExpired(Timer::Stale));
    assert_eq!(route_actions(&expired), [&Action::PurgeStale]);
}

#[test]
fn a_notification_a_hold_expiry_or_a_peer_without_the_capability_drop_routes_at_once() {
    let mut fsm = Fsm::new(config());
    establish(&mut fsm, 0, Some((90, true)));
    let n = Message::Notification(Notification::new(code::CEASE, code::ADMIN_SHUTDOWN));
    let cease = fsm.handle(Event::Received { conn: 0, msg: n });
    assert_eq!(route_actions(&cease), [&Action::Down]);

    let mut hold = Fsm::new(config());
    establish(&mut hold, 0, Some((90, true)));
    let expired = hold.handle(Event::TimerExpired(Timer::Hold));
    assert_eq!(route_actions(&expired), [&Action::Down]);

    let mut plain = Fsm::new(config());
    establish(&mut plain, 0, None);
    let closed = plain.handle(Event::Closed { conn: 0 });
    assert_eq!(route_actions(&closed), [&Action::Down]);

    // Removing a peer while it restarts drops its stale routes.
    let mut removed = Fsm::new(config());
    establish(&mut removed, 0, Some((90, true)));
    removed.handle(Event::Closed { conn: 0 });
    let stop = removed.handle(Event::Stop);
    assert_eq!(route_actions(&stop), [&Action::Down]);
}

#[test]
fn a_peer_that_stops_reading_is_reset_with_cease_out_of_resources() {
    let mut fsm = Fsm::new(config());
    establish(&mut fsm, 0, Some((90, true)));
    let blocked = fsm.handle(Event::SendBlocked { conn: 0 });
    assert!(blocked.contains(&Action::Send {
        conn: 0,
        msg: Message::Notification(Notification::new(6, 8)),
    }));
    assert_eq!(
        route_actions(&blocked),
        [&Action::Down],
        "not a graceful restart"
    );
    assert_eq!(
        fsm.last_error(),
        Some("the peer does not read: send queue full")
    );
}
