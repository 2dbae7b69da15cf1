//! The IPAM that `tabby` uses for a network: `tabby-ipam` in-process, or
//! any other IPAM plugin (host-local, ...) exec'd from CNI_PATH.

use std::collections::BTreeMap;
use std::net::IpAddr;

use tabby_ipam::Unsynced;

use crate::env::{Command, Invocation};
use crate::error::{CniError, Code, Result};
use crate::exec::run_plugin;
use crate::tabby_ipam::{Kept, StaleAttachment, TabbyIpam};
use crate::types::{CniResult, NetConf};

/// What an IPAM ADD printed.
pub enum IpamOutput {
    /// `tabby-ipam` in-process: already a result, with the writes that
    /// [`IpamBackend::sync`] must make durable before it is handed out.
    Parsed(CniResult, Unsynced),
    /// A delegated plugin's stdout.
    Raw {
        /// The plugin, for error messages.
        plugin: String,
        /// Its stdout.
        out: Vec<u8>,
    },
}

impl IpamOutput {
    /// The result, and what is left to sync (nothing for a delegated
    /// plugin, which answered only once its own writes were done).
    pub fn parse(self) -> Result<(CniResult, Unsynced)> {
        match self {
            Self::Parsed(r, unsynced) => Ok((r, unsynced)),
            Self::Raw { plugin, out } => {
                CniResult::from_plugin_output(&out, &plugin).map(|r| (r, Unsynced::default()))
            }
        }
    }
}

/// Name of Tabby's own IPAM plugin.
pub const TABBY_IPAM: &str = "tabby-ipam";

/// The IPAM of one invocation.
pub enum IpamBackend<'a> {
    /// `tabby-ipam`, called as a library.
    InProcess(TabbyIpam),
    /// Another IPAM plugin, exec'd with the same config.
    Delegate {
        /// Its type (binary name).
        plugin: String,
        /// The raw config to pass on stdin.
        stdin: &'a [u8],
    },
}

impl<'a> IpamBackend<'a> {
    /// Chooses and validates the IPAM from `ipam.type`.
    pub fn from_conf(conf: &NetConf, stdin: &'a [u8]) -> Result<Self> {
        match conf.ipam_type() {
            None => Err(CniError::new(
                Code::InvalidConfig,
                "network config has no ipam.type",
            )),
            Some(TABBY_IPAM) => Ok(Self::InProcess(TabbyIpam::open(conf)?)),
            Some(other) => Ok(Self::Delegate {
                plugin: other.to_string(),
                stdin,
            }),
        }
    }

    /// Assigns addresses for the invocation's container. The output is
    /// parsed separately so that the caller can register the release first.
    /// The assignment is visible at once but may not be durable before
    /// [`IpamBackend::sync`] returned: no result may name it before.
    pub fn add(
        &self,
        inv: &Invocation,
        conf: &NetConf,
        attrs: BTreeMap<String, String>,
    ) -> Result<IpamOutput> {
        match self {
            Self::InProcess(t) => t
                .add(&conf.handle(&inv.container_id, &inv.ifname), attrs)
                .map(|(r, unsynced)| IpamOutput::Parsed(r, unsynced)),
            Self::Delegate { plugin, stdin } => {
                run_plugin(plugin, Command::Add, inv, stdin).map(|out| IpamOutput::Raw {
                    plugin: plugin.clone(),
                    out,
                })
            }
        }
    }

    /// Makes an assignment durable (see [`IpamBackend::add`]).
    pub fn sync(&self, unsynced: Unsynced) -> Result<()> {
        match self {
            Self::InProcess(t) => t.sync(unsynced),
            Self::Delegate { .. } => Ok(()),
        }
    }

    /// The addresses the container holds, when this IPAM can tell.
    pub fn addresses(&self, inv: &Invocation, conf: &NetConf) -> Result<Vec<IpAddr>> {
        match self {
            Self::InProcess(t) => t.addresses(&conf.handle(&inv.container_id, &inv.ifname)),
            Self::Delegate { .. } => Ok(Vec::new()),
        }
    }

    /// Releases the container's addresses; returns the ones released when known.
    pub fn del(&self, inv: &Invocation, conf: &NetConf) -> Result<Vec<IpAddr>> {
        match self {
            Self::InProcess(t) => Ok(t
                .del(&conf.handle(&inv.container_id, &inv.ifname))?
                .into_iter()
                .map(|r| r.ip)
                .collect()),
            Self::Delegate { plugin, stdin } => {
                run_plugin(plugin, Command::Del, inv, stdin).map(|_| Vec::new())
            }
        }
    }

    /// Verifies the container still holds `ips`.
    pub fn check(&self, inv: &Invocation, conf: &NetConf, ips: &[IpAddr]) -> Result<()> {
        match self {
            Self::InProcess(t) => t.check(&conf.handle(&inv.container_id, &inv.ifname), ips),
            Self::Delegate { plugin, stdin } => {
                run_plugin(plugin, Command::Check, inv, stdin).map(drop)
            }
        }
    }

    /// Releases what is not in the valid attachments, each attachment after
    /// `teardown` removed its interfaces (known only to `tabby-ipam`; a
    /// delegated IPAM just releases). Returns released addresses when known.
    pub fn gc(
        &self,
        inv: &Invocation,
        conf: &NetConf,
        teardown: impl FnMut(&StaleAttachment, &Kept) -> Result<()>,
    ) -> Result<Vec<IpAddr>> {
        match self {
            Self::InProcess(t) => Ok(t.gc(conf, teardown)?.into_iter().map(|r| r.ip).collect()),
            Self::Delegate { plugin, stdin } => {
                run_plugin(plugin, Command::Gc, inv, stdin).map(|_| Vec::new())
            }
        }
    }

    /// Whether ADD can be served.
    pub fn status(&self, inv: &Invocation) -> Result<()> {
        match self {
            Self::InProcess(t) => t.status(),
            Self::Delegate { plugin, stdin } => {
                run_plugin(plugin, Command::Status, inv, stdin).map(drop)
            }
        }
    }
}
