//! What the dataplane's root tests share beyond `tabby-testkit` (which
//! gives them their namespaces and polling).
#![allow(dead_code)]

/// The MAC of every host-side veth.
pub const HOST_MAC: [u8; 6] = [0xee; 6];

/// A link name unique to this test process, at most 15 characters.
pub fn veth_name() -> String {
    tabby_testkit::unique("tdpv")
}

/// The inode of the calling thread's network namespace.
pub fn thread_netns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}
