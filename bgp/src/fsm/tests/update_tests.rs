//! UPDATEs in Established: routes the FSM ignores (RFC 4271 §6.3, RFC 7606
//! treat-as-withdraw) and the per-peer prefix limit (RFC 4486 Cease 6/1).

use super::*;
use ipnetwork::Ipv4Network;

fn nets(v: &[&str]) -> Vec<Ipv4Network> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

/// An established FSM with `max_prefix`.
fn limited(peer_asn: u32, max_prefix: Option<u32>) -> Fsm {
    let mut fsm = Fsm::new(FsmConfig {
        max_prefix,
        ..config(peer_asn)
    });
    fsm.handle(Event::Start);
    fsm.handle(Event::Connected {
        conn: 0,
        outbound: true,
    });
    fsm.handle(Event::Received {
        conn: 0,
        msg: peer_open(peer_asn, 9, Ipv4Addr::new(10, 0, 0, 1)),
    });
    fsm.handle(Event::Received {
        conn: 0,
        msg: Message::Keepalive,
    });
    assert_eq!(fsm.state(), State::Established);
    fsm
}

fn announce(fsm: &mut Fsm, as_path: Vec<u32>, next_hop: Ipv4Addr, nlri: &[&str]) -> Vec<Action> {
    let mut a = attrs(as_path);
    if let Some(a) = a.as_mut() {
        a.next_hop = next_hop;
    }
    fsm.handle(Event::Received {
        conn: 0,
        msg: Message::Update(Update {
            withdrawn: vec![],
            attributes: a,
            nlri: nets(nlri),
        }),
    })
}

fn withdraw(fsm: &mut Fsm, prefixes: &[&str]) -> Vec<Action> {
    fsm.handle(Event::Received {
        conn: 0,
        msg: Message::Update(Update {
            withdrawn: nets(prefixes),
            attributes: None,
            nlri: vec![],
        }),
    })
}

fn learned(actions: &[Action]) -> Vec<Ipv4Network> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Learned { prefixes, .. } => Some(prefixes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

const PEER_NH: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

#[test]
fn a_route_whose_next_hop_is_our_own_address_is_withdrawn_not_learned() {
    let mut fsm = limited(65001, None);
    let actions = announce(&mut fsm, vec![65001], LOCAL_ID, &["10.7.0.0/16"]);
    assert!(learned(&actions).is_empty(), "{actions:?}");
    assert!(actions.contains(&Action::Withdrawn(nets(&["10.7.0.0/16"]))));
    assert!(
        actions.contains(&Action::TreatedAsWithdraw(Notification::with_data(
            3,
            8,
            [0x40, 3, 4, 10, 0, 0, 2]
        )))
    );
    assert_eq!(notification(&actions), None);
    assert_eq!(fsm.state(), State::Established);
}

#[test]
fn a_next_hop_that_is_no_host_address_is_invalid_next_hop_treated_as_withdraw() {
    let mut fsm = limited(64512, None);
    for nh in [
        [224, 0, 0, 1],
        [239, 255, 255, 250],
        [0, 0, 0, 0],
        [0, 1, 2, 3],
        [255, 255, 255, 255],
        [240, 0, 0, 1],
        [127, 0, 0, 1],
    ] {
        let actions = announce(&mut fsm, vec![], Ipv4Addr::from(nh), &["10.7.0.0/16"]);
        assert!(learned(&actions).is_empty(), "{nh:?}: {actions:?}");
        assert!(actions.contains(&Action::Withdrawn(nets(&["10.7.0.0/16"]))));
        let data = [&[0x40, 3, 4][..], &nh].concat();
        assert!(
            actions.contains(&Action::TreatedAsWithdraw(Notification::with_data(
                3, 8, data
            )))
        );
        assert_eq!(notification(&actions), None);
    }
    assert_eq!(fsm.state(), State::Established);
    let ok = announce(
        &mut fsm,
        vec![],
        Ipv4Addr::new(169, 254, 3, 1),
        &["10.7.0.0/16"],
    );
    assert_eq!(learned(&ok), nets(&["10.7.0.0/16"]));
}

#[test]
fn an_ebgp_path_not_starting_with_the_peer_as_is_treated_as_withdraw() {
    let mut fsm = limited(65001, None);
    let actions = announce(&mut fsm, vec![65002], PEER_NH, &["10.1.0.0/16"]);
    assert_eq!(notification(&actions), None);
    assert!(actions.contains(&Action::Withdrawn(nets(&["10.1.0.0/16"]))));
    assert!(actions.contains(&Action::TreatedAsWithdraw(Notification::new(3, 11))));
    assert_eq!(fsm.state(), State::Established);
}

#[test]
fn exceeding_max_prefix_resets_the_session_with_cease_6_1() {
    let mut fsm = limited(64512, Some(3));
    let a = announce(&mut fsm, vec![], PEER_NH, &["10.1.0.0/24", "10.1.1.0/24"]);
    assert_eq!(learned(&a).len(), 2);
    // Re-announcing a prefix does not count it twice; a withdraw frees room.
    announce(&mut fsm, vec![], PEER_NH, &["10.1.1.0/24", "10.1.2.0/24"]);
    withdraw(&mut fsm, &["10.1.0.0/24"]);
    let a = announce(&mut fsm, vec![], PEER_NH, &["10.1.3.0/24"]);
    assert_eq!(notification(&a), None, "3 prefixes are allowed");
    let a = announce(&mut fsm, vec![], PEER_NH, &["10.1.4.0/24"]);
    assert!(
        learned(&a).is_empty(),
        "the prefix over the limit is not learned"
    );
    assert!(a.contains(&Action::Send {
        conn: 0,
        msg: Message::Notification(Notification::with_data(6, 1, [0, 1, 1, 0, 0, 0, 3])),
    }));
    assert!(a.contains(&Action::Down));
    assert_eq!(fsm.state(), State::Idle);
    assert_eq!(
        fsm.last_error(),
        Some("sent 6/1 (maximum number of prefixes reached)")
    );
}

#[test]
fn the_prefix_count_starts_again_with_each_session() {
    let mut fsm = limited(64512, Some(2));
    announce(&mut fsm, vec![], PEER_NH, &["10.1.0.0/24", "10.1.1.0/24"]);
    fsm.handle(Event::TimerExpired(Timer::Hold));
    fsm.handle(Event::TimerExpired(Timer::ConnectRetry));
    fsm.handle(Event::Connected {
        conn: 1,
        outbound: true,
    });
    fsm.handle(Event::Received {
        conn: 1,
        msg: peer_open(64512, 9, PEER_NH),
    });
    fsm.handle(Event::Received {
        conn: 1,
        msg: Message::Keepalive,
    });
    assert_eq!(fsm.state(), State::Established);
    let a = fsm.handle(Event::Received {
        conn: 1,
        msg: Message::Update(Update {
            withdrawn: vec![],
            attributes: attrs(vec![]),
            nlri: nets(&["10.2.0.0/24", "10.2.1.0/24"]),
        }),
    });
    assert_eq!(learned(&a).len(), 2);
    assert_eq!(fsm.state(), State::Established);
}
