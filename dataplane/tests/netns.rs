//! NetNs: opening namespaces and running code inside them (root only).

mod common;

use std::panic;

use common::thread_netns_inode;
use tabby_dataplane::{sysctl, Error, NetNs};
use tabby_testkit::{require_root, Netns};

#[test]
fn opening_a_missing_namespace_is_not_found() {
    let err = NetNs::open("/run/netns/tdp-does-not-exist").unwrap_err();
    assert!(matches!(err, Error::NetnsNotFound { .. }), "{err:?}");
    assert!(err.is_not_found());
    assert_eq!(
        err.to_string(),
        "network namespace /run/netns/tdp-does-not-exist not found"
    );
}

#[test]
fn opening_a_file_that_is_not_a_namespace_fails() {
    let err = NetNs::open("/proc/version").unwrap_err();
    assert!(matches!(err, Error::NotANetns { .. }), "{err:?}");
}

#[test]
fn run_enters_the_namespace_and_comes_back() {
    if !require_root("run_enters_the_namespace_and_comes_back") {
        return;
    }
    let guard = Netns::new("tdp");
    let ns = guard.open();
    let before = thread_netns_inode();
    let inside = ns.run(thread_netns_inode).unwrap();
    assert_ne!(inside, before);
    assert_eq!(thread_netns_inode(), before);
    // A second handle on the same namespace enters the same namespace.
    let again = NetNs::open(ns.path()).unwrap();
    assert_eq!(again.run(thread_netns_inode).unwrap(), inside);
}

#[test]
fn run_restores_the_namespace_when_the_closure_panics() {
    if !require_root("run_restores_the_namespace_when_the_closure_panics") {
        return;
    }
    let guard = Netns::new("tdp");
    let ns = guard.open();
    let before = thread_netns_inode();
    let result = panic::catch_unwind(|| ns.run(|| panic!("boom")));
    assert!(result.is_err());
    assert_eq!(thread_netns_inode(), before);
}

#[test]
fn runs_nest() {
    if !require_root("runs_nest") {
        return;
    }
    let guards = (Netns::new("tdp"), Netns::new("tdp"));
    let (outer, inner) = (guards.0.open(), guards.1.open());
    let before = thread_netns_inode();
    let (in_outer, in_inner, back_in_outer) = outer
        .run(|| {
            let in_outer = thread_netns_inode();
            let in_inner = inner.run(thread_netns_inode).unwrap();
            (in_outer, in_inner, thread_netns_inode())
        })
        .unwrap();
    assert_ne!(in_outer, in_inner);
    assert_eq!(in_outer, back_in_outer);
    assert_eq!(thread_netns_inode(), before);
}

#[test]
fn current_names_the_calling_threads_namespace() {
    if !require_root("current_names_the_calling_threads_namespace") {
        return;
    }
    let guard = Netns::new("tdp");
    let ns = guard.open();
    let inside = ns
        .run(|| {
            let current = NetNs::current().unwrap();
            // Entering "current" from inside is a no-op.
            current.run(thread_netns_inode).unwrap()
        })
        .unwrap();
    assert_eq!(inside, ns.run(thread_netns_inode).unwrap());
}

#[test]
fn sysctls_are_per_namespace() {
    if !require_root("sysctls_are_per_namespace") {
        return;
    }
    let guards = (Netns::new("tdp"), Netns::new("tdp"));
    let (a, b) = (guards.0.open(), guards.1.open());
    let key = "net/ipv4/ip_forward";
    a.run(|| sysctl::set(key, "1")).unwrap().unwrap();
    assert_eq!(a.run(|| sysctl::get(key)).unwrap().unwrap(), "1");
    assert_eq!(b.run(|| sysctl::get(key)).unwrap().unwrap(), "0");
}

#[test]
fn a_missing_sysctl_is_not_found() {
    if !require_root("a_missing_sysctl_is_not_found") {
        return;
    }
    let guard = Netns::new("tdp");
    let ns = guard.open();
    let err = ns
        .run(|| sysctl::get("net/ipv4/conf/tdp-no-such-link/proxy_arp"))
        .unwrap()
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(err
        .to_string()
        .contains("net/ipv4/conf/tdp-no-such-link/proxy_arp"));
}
