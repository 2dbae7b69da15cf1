//! Which namespace a Netlink socket acts in (root only).

mod common;

use common::thread_netns_inode;
use tabby_dataplane::Netlink;
use tabby_testkit::{require_root, Netns};

fn link_names(netlink: &Netlink) -> Vec<String> {
    netlink
        .links()
        .unwrap()
        .into_iter()
        .map(|link| link.name)
        .collect()
}

#[test]
fn a_socket_opened_in_a_namespace_acts_there_from_any_thread() {
    if !require_root("a_socket_opened_in_a_namespace_acts_there_from_any_thread") {
        return;
    }
    let ns = Netns::new("tdp");
    let before = thread_netns_inode();
    let netlink = Netlink::in_netns(&ns.open()).unwrap();
    assert_eq!(thread_netns_inode(), before, "in_netns did not come back");
    assert_eq!(netlink.netns(), ns.path());

    let names = std::thread::spawn(move || link_names(&netlink))
        .join()
        .unwrap();
    assert_eq!(names, ["lo"]);
}

#[test]
fn a_host_socket_belongs_to_the_calling_threads_namespace() {
    if !require_root("a_host_socket_belongs_to_the_calling_threads_namespace") {
        return;
    }
    let ns = Netns::new("tdp");
    ns.ip(&["link", "set", "lo", "down"]);
    let netlink = ns.open().run(Netlink::host).unwrap().unwrap();
    assert_eq!(link_names(&netlink), ["lo"]);
    assert!(!netlink.link("lo").unwrap().unwrap().up);
    netlink.set_up(1).unwrap();
    assert!(netlink.link("lo").unwrap().unwrap().up);
}

#[test]
fn one_socket_serves_many_requests() {
    if !require_root("one_socket_serves_many_requests") {
        return;
    }
    let ns = Netns::new("tdp");
    let netlink = ns.netlink();
    for _ in 0..100 {
        assert!(netlink.link("lo").unwrap().is_some());
        assert!(netlink.link("tdp-missing").unwrap().is_none());
    }
}
