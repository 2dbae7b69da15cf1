//! Tabby's CNI layer and plugins.
//!
//! - [`env`], [`types`], [`version`], [`error`]: the CNI protocol, typed.
//! - [`plugin`]: the `tabby` interface plugin (veth + proxy-ARP gateway): ADD, CHECK.
//! - [`teardown`]: its DEL and GC (interfaces first, then addresses).
//! - [`tabby_ipam`]: the `tabby-ipam` IPAM plugin, also called in-process by `tabby`.
//! - [`pod`]: a pod's IPAM annotations (`tabby.dev/ipv4pools`, `tabby.dev/ipAddrs`).
//! - [`ipam_backend`], [`exec`]: in-process or delegated IPAM.
//! - [`entry`]: the shared `main` of both binaries: stdin/env in, result or error object out.

pub mod entry;
pub mod env;
pub mod error;
pub mod exec;
pub mod ipam_backend;
pub mod logging;
pub mod naming;
pub mod plugin;
pub mod pod;
pub mod rollback;
pub mod tabby_ipam;
pub mod teardown;
pub mod types;
pub mod version;
