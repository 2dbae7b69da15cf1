//! The FSM driven by hand: no sockets, no clock.

use super::*;
use crate::message::{Origin, PathAttributes, RouteRefresh};
use std::net::Ipv4Addr;

const LOCAL_ID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn config(peer_asn: u32) -> FsmConfig {
    FsmConfig {
        local_asn: 64512,
        router_id: LOCAL_ID,
        peer_asn,
        hold_time: 90,
        keepalive: 30,
        connect_retry: Duration::from_secs(5),
        connect_retry_max: Duration::from_secs(120),
        max_prefix: None,
        restart_time: 0,
        stale_time: Duration::from_secs(360),
    }
}

fn peer_open(asn: u32, hold_time: u16, id: Ipv4Addr) -> Message {
    Message::Open(Open {
        asn,
        hold_time,
        router_id: id,
        capabilities: vec![Capability::FourOctetAs(asn), Capability::RouteRefresh],
    })
}

fn notification(actions: &[Action]) -> Option<(ConnId, u8, u8)> {
    actions.iter().find_map(|a| match a {
        Action::Send {
            conn,
            msg: Message::Notification(n),
        } => Some((*conn, n.code, n.subcode)),
        _ => None,
    })
}

/// An FSM in OpenSent on connection 0.
fn open_sent(peer_asn: u32) -> Fsm {
    let mut fsm = Fsm::new(config(peer_asn));
    fsm.handle(Event::Start);
    let actions = fsm.handle(Event::Connected {
        conn: 0,
        outbound: true,
    });
    assert!(matches!(
        &actions[1],
        Action::Send {
            conn: 0,
            msg: Message::Open(_)
        }
    ));
    assert!(actions.contains(&Action::StartTimer(Timer::Hold, OPEN_HOLD_TIME)));
    assert_eq!(fsm.state(), State::OpenSent);
    fsm
}

fn established(peer_asn: u32) -> Fsm {
    let mut fsm = open_sent(peer_asn);
    fsm.handle(Event::Received {
        conn: 0,
        msg: peer_open(peer_asn, 9, Ipv4Addr::new(10, 0, 0, 1)),
    });
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: Message::Keepalive,
    });
    assert_eq!(fsm.state(), State::Established);
    assert!(actions.contains(&Action::AdvertiseAll));
    fsm
}

fn attrs(as_path: Vec<u32>) -> Option<PathAttributes> {
    Some(PathAttributes {
        origin: Origin::Igp,
        as_path,
        next_hop: Ipv4Addr::new(10, 0, 0, 1),
        local_pref: None,
        med: None,
    })
}

#[test]
fn start_connects_and_arms_the_retry_timer() {
    let mut fsm = Fsm::new(config(64512));
    let actions = fsm.handle(Event::Start);
    assert_eq!(
        actions,
        vec![
            Action::Connect,
            Action::StartTimer(Timer::ConnectRetry, Duration::from_secs(5))
        ]
    );
    assert_eq!(fsm.state(), State::Connect);
}

#[test]
fn connect_retry_back_off_doubles_up_to_the_cap() {
    let mut fsm = Fsm::new(config(64512));
    fsm.handle(Event::Start);
    let mut delays = Vec::new();
    for _ in 0..7 {
        fsm.handle(Event::ConnectFailed);
        assert_eq!(fsm.state(), State::Active);
        let actions = fsm.handle(Event::TimerExpired(Timer::ConnectRetry));
        assert_eq!(actions[0], Action::Connect);
        let Action::StartTimer(Timer::ConnectRetry, d) = actions[1] else {
            panic!("{actions:?}")
        };
        delays.push(d.as_secs());
    }
    assert_eq!(delays, vec![10, 20, 40, 80, 120, 120, 120]);
}

#[test]
fn back_off_resets_once_established() {
    let mut fsm = established(64512);
    let actions = fsm.handle(Event::TimerExpired(Timer::Hold));
    assert!(actions.contains(&Action::StartTimer(
        Timer::ConnectRetry,
        Duration::from_secs(5)
    )));
}

#[test]
fn open_exchange_reaches_established_with_negotiated_timers() {
    let mut fsm = open_sent(64512);
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: peer_open(64512, 9, Ipv4Addr::new(10, 0, 0, 1)),
    });
    assert_eq!(
        actions,
        vec![
            Action::Send {
                conn: 0,
                msg: Message::Keepalive
            },
            Action::StartTimer(Timer::Hold, Duration::from_secs(9)),
            Action::StartTimer(Timer::Keepalive, Duration::from_secs(3)),
        ]
    );
    assert_eq!(fsm.state(), State::OpenConfirm);
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: Message::Keepalive,
    });
    let Some(Action::Up(n)) = actions.iter().find(|a| matches!(a, Action::Up(_))) else {
        panic!()
    };
    assert_eq!(
        (n.hold_time, n.keepalive, n.asn4, n.route_refresh),
        (9, 3, true, true)
    );
}

#[test]
fn hold_time_is_the_smaller_and_zero_disables_timers() {
    let fsm = open_sent(64512);
    let peer = Ipv4Addr::new(10, 0, 0, 1);
    let Message::Open(open) = peer_open(64512, 30, peer) else {
        panic!()
    };
    let n = fsm.validate_open(0, &open).unwrap();
    assert_eq!((n.hold_time, n.keepalive), (30, 10));
    let Message::Open(open) = peer_open(64512, 0, peer) else {
        panic!()
    };
    assert_eq!(fsm.validate_open(0, &open).unwrap().hold_time, 0);
    let mut fsm = open_sent(64512);
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: peer_open(64512, 0, peer),
    });
    assert!(actions.contains(&Action::StopTimer(Timer::Hold)));
    assert!(actions.contains(&Action::StopTimer(Timer::Keepalive)));
}

#[test]
fn open_validation_errors_have_their_subcodes() {
    let cases = [
        (peer_open(65000, 90, Ipv4Addr::new(10, 0, 0, 1)), (2, 2)),
        (peer_open(64512, 90, Ipv4Addr::UNSPECIFIED), (2, 3)),
        (peer_open(64512, 90, LOCAL_ID), (2, 3)),
        (peer_open(64512, 2, Ipv4Addr::new(10, 0, 0, 1)), (2, 6)),
    ];
    for (open, (code, subcode)) in cases {
        let mut fsm = open_sent(64512);
        let actions = fsm.handle(Event::Received { conn: 0, msg: open });
        assert_eq!(notification(&actions), Some((0, code, subcode)));
        assert!(actions.contains(&Action::Close { conn: 0 }));
        assert_eq!(fsm.state(), State::Idle);
    }
}

#[test]
fn hold_timer_expiry_sends_notification_4_0_and_reports_down() {
    let mut fsm = established(64512);
    let actions = fsm.handle(Event::TimerExpired(Timer::Hold));
    assert_eq!(notification(&actions), Some((0, 4, 0)));
    assert!(actions.contains(&Action::Down));
    assert_eq!(fsm.state(), State::Idle);
    assert_eq!(fsm.last_error(), Some("hold timer expired"));
}

#[test]
fn keepalive_timer_sends_keepalive_and_rearms() {
    let mut fsm = established(64512);
    let actions = fsm.handle(Event::TimerExpired(Timer::Keepalive));
    assert_eq!(
        actions,
        vec![
            Action::Send {
                conn: 0,
                msg: Message::Keepalive
            },
            Action::StartTimer(Timer::Keepalive, Duration::from_secs(3)),
        ]
    );
}

#[test]
fn unexpected_messages_are_fsm_errors() {
    let mut fsm = open_sent(64512);
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: Message::Keepalive,
    });
    assert_eq!(notification(&actions), Some((0, 5, 1)));
    let mut fsm = established(64512);
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: peer_open(64512, 9, Ipv4Addr::new(10, 0, 0, 1)),
    });
    assert_eq!(notification(&actions), Some((0, 5, 3)));
}

#[test]
fn malformed_message_resets_the_session_with_its_notification() {
    let mut fsm = established(64512);
    let actions = fsm.handle(Event::Malformed {
        conn: 0,
        notification: Notification::new(3, 1),
    });
    assert_eq!(notification(&actions), Some((0, 3, 1)));
    assert!(actions.contains(&Action::Down));
    assert!(matches!(
        actions.last(),
        Some(Action::StartTimer(Timer::ConnectRetry, _))
    ));
}

#[test]
fn stop_sends_cease_and_does_not_restart() {
    let mut fsm = established(64512);
    let actions = fsm.handle(Event::Stop);
    assert_eq!(notification(&actions), Some((0, 6, 2)));
    assert!(!actions.iter().any(|a| matches!(a, Action::StartTimer(..))));
    assert!(fsm
        .handle(Event::TimerExpired(Timer::ConnectRetry))
        .is_empty());
}

#[test]
fn route_refresh_re_advertises_everything() {
    let mut fsm = established(64512);
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: Message::RouteRefresh(RouteRefresh { afi: 1, safi: 1 }),
    });
    assert_eq!(actions, vec![Action::AdvertiseAll]);
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: Message::RouteRefresh(RouteRefresh { afi: 2, safi: 1 }),
    });
    assert!(actions.is_empty(), "IPv6 was not negotiated");
}

#[test]
fn updates_become_learned_and_withdrawn_routes() {
    let mut fsm = established(64512);
    let update = Update {
        withdrawn: vec!["10.244.9.0/26".parse().unwrap()],
        attributes: attrs(vec![]),
        nlri: vec!["10.244.1.0/26".parse().unwrap()],
    };
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: Message::Update(update),
    });
    assert_eq!(
        actions,
        vec![
            Action::StartTimer(Timer::Hold, Duration::from_secs(9)),
            Action::Learned {
                next_hop: Ipv4Addr::new(10, 0, 0, 1),
                prefixes: vec!["10.244.1.0/26".parse().unwrap()],
            },
            Action::Withdrawn(vec!["10.244.9.0/26".parse().unwrap()]),
        ]
    );
}

#[test]
fn ebgp_update_must_start_with_the_peer_as_and_loops_are_dropped() {
    let mut fsm = established(65001);
    let looped = Update {
        withdrawn: vec![],
        attributes: attrs(vec![65001, 64512]),
        nlri: vec!["10.1.0.0/16".parse().unwrap()],
    };
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: Message::Update(looped),
    });
    assert_eq!(
        actions[1],
        Action::Withdrawn(vec!["10.1.0.0/16".parse().unwrap()])
    );
    let wrong = Update {
        withdrawn: vec![],
        attributes: attrs(vec![65002]),
        nlri: vec!["10.1.0.0/16".parse().unwrap()],
    };
    let actions = fsm.handle(Event::Received {
        conn: 0,
        msg: Message::Update(wrong),
    });
    // RFC 7606 §3 e: treat-as-withdraw, not 3/11 (see update_tests).
    assert_eq!(notification(&actions), None);
}

/// Primary inbound connection 0, then our outbound connection 1 collides.
fn collide(local_id_wins: bool) -> (Fsm, Vec<Action>) {
    let mut fsm = Fsm::new(config(64512));
    fsm.handle(Event::Start);
    fsm.handle(Event::Connected {
        conn: 0,
        outbound: false,
    });
    let actions = fsm.handle(Event::Connected {
        conn: 1,
        outbound: true,
    });
    assert!(matches!(
        &actions[..],
        [Action::Send {
            conn: 1,
            msg: Message::Open(_)
        }]
    ));
    let remote = if local_id_wins {
        Ipv4Addr::new(10, 0, 0, 1)
    } else {
        Ipv4Addr::new(10, 0, 0, 3)
    };
    let actions = fsm.handle(Event::Received {
        conn: 1,
        msg: peer_open(64512, 90, remote),
    });
    (fsm, actions)
}

#[test]
fn collision_keeps_our_connection_when_our_id_is_higher() {
    let (fsm, actions) = collide(true);
    assert_eq!(notification(&actions), Some((0, 6, 7)));
    assert!(actions.contains(&Action::Close { conn: 0 }));
    assert!(actions.contains(&Action::Send {
        conn: 1,
        msg: Message::Keepalive
    }));
    assert_eq!(fsm.state(), State::OpenConfirm);
    assert_eq!(fsm.negotiated().map(|n| n.conn), Some(1));
}

#[test]
fn collision_keeps_the_peer_connection_when_its_id_is_higher() {
    let (fsm, actions) = collide(false);
    assert_eq!(notification(&actions), Some((1, 6, 7)));
    assert_eq!(actions.last(), Some(&Action::Close { conn: 1 }));
    assert_eq!(fsm.state(), State::OpenSent);
}

#[test]
fn a_connection_while_established_is_rejected() {
    let mut fsm = established(64512);
    let actions = fsm.handle(Event::Connected {
        conn: 7,
        outbound: false,
    });
    assert_eq!(notification(&actions), Some((7, 6, 7)));
    assert_eq!(fsm.state(), State::Established);
}

#[test]
fn peer_closing_in_open_sent_goes_active_and_retries() {
    let mut fsm = open_sent(64512);
    let actions = fsm.handle(Event::Closed { conn: 0 });
    assert_eq!(fsm.state(), State::Active);
    assert!(actions.contains(&Action::StartTimer(
        Timer::ConnectRetry,
        Duration::from_secs(5)
    )));
    assert_eq!(
        fsm.handle(Event::TimerExpired(Timer::ConnectRetry))[0],
        Action::Connect
    );
}

mod update_tests;
