//! The executor: one `nft -f -` per sync, or a netlink batch (element-only
//! changes and full syncs).
//!
//! Why the nft tool and text: `nft -f` applies a whole file as one netlink
//! batch, so a sync is all or nothing; the payload is the plan printed in
//! the syntax `nft list` prints back (golden files and listings compare
//! line by line); and the nft tool is on every node that has nftables.
//! The Rust libraries were weighed: `rustables` (netlink, GPL-3.0: not for
//! an Apache-2.0 binary), `nftnl`/`mnl` (bindings to the C libnftnl, GPL-2.0,
//! another build dependency) and the `nftables` crate (JSON through the same
//! nft tool, so no faster). What dominates at scale was measured to be the
//! kernel, not the tool: each commit that adds a jump or a NAT rule
//! revalidates every chain reachable from the base chains.
//!
//! A full sync is the exception (`rewrite.rs`): at 10k services nft spent
//! about 2 s of CPU on its 10.9 MB file, so it goes over netlink as one
//! batch, with the file as the fallback.
//!
//! [`NftExec`] is the seam: tests wrap [`NftCli`] to make a transaction fail.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use serde_json::Value;

use super::netlink::{NftBatch, NlSocket};
use super::plan::{plan_port, NftPlan, NftPort, FAMILY, TABLE};
use super::render::{fixed_sets, render_changes, render_full_sync, Claims, NftKernel};
use super::rewrite::NftRewrite;
use super::slots::Slots;
use crate::backend::{Backend, Counts, Mode};
use crate::error::{Error, Result};
use crate::iptables::run;
use crate::model::{ServiceKey, ServicePortInfo};
use crate::payload::Payload;
use crate::rules::{Ctx, ProxyOptions};

/// Runs nft.
pub trait NftExec {
    /// `nft -f -` with `payload` on stdin: one transaction.
    fn apply(&mut self, payload: &str) -> Result<()>;
    /// `nft -j ARGS`: JSON output.
    fn json(&mut self, args: &[&str]) -> Result<String>;
    /// Element operations as one netlink transaction. `Ok(false)`: not
    /// applied (no netlink here, or an element it cannot carry); the
    /// caller applies the payload's text instead.
    fn apply_batch(&mut self, batch: &NftBatch) -> Result<bool> {
        let _ = batch;
        Ok(false)
    }
    /// A full sync: `nft -f` of its declarations, then its batch over
    /// netlink. `Ok(false)`: no netlink here; the caller applies the text.
    fn apply_rewrite(&mut self, rewrite: &NftRewrite) -> Result<bool> {
        let _ = rewrite;
        Ok(false)
    }
}

/// The `nft` command, optionally inside a network namespace, and a netlink
/// socket there for element-only changes (see `netlink.rs`).
#[derive(Debug, Default)]
pub struct NftCli {
    /// Network namespace file to enter (e.g. `/run/netns/NAME`), if any.
    pub netns: Option<PathBuf>,
    /// Apply every change with `nft -f`, element-only ones too.
    pub text_only: bool,
    socket: Option<NlSocket>,
}

impl Clone for NftCli {
    /// The same settings; the clone opens its own socket.
    fn clone(&self) -> Self {
        Self {
            netns: self.netns.clone(),
            text_only: self.text_only,
            socket: None,
        }
    }
}

impl NftCli {
    /// nft inside the namespace at `path`.
    pub fn in_netns(path: impl Into<PathBuf>) -> Self {
        Self {
            netns: Some(path.into()),
            ..Self::default()
        }
    }

    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).args(["--", "nft"]);
                c
            }
            None => Command::new("nft"),
        }
    }
}

impl NftExec for NftCli {
    fn apply(&mut self, payload: &str) -> Result<()> {
        let mut cmd = self.command();
        cmd.args(["-f", "-"]);
        run(cmd, "nft", Some(payload.as_bytes())).map(drop)
    }

    fn json(&mut self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command();
        cmd.arg("-j").args(args);
        run(cmd, "nft", None)
    }

    /// A failed batch drops the socket: the next one starts afresh.
    fn apply_batch(&mut self, batch: &NftBatch) -> Result<bool> {
        if self.text_only {
            return Ok(false);
        }
        self.with_socket(|sock| sock.apply(batch))
    }

    fn apply_rewrite(&mut self, rewrite: &NftRewrite) -> Result<bool> {
        if self.text_only {
            return Ok(false);
        }
        self.apply(&rewrite.skeleton)?;
        self.send_rewrite(rewrite).map(|()| true)
    }
}

impl NftCli {
    /// The batch of `rewrite` alone (its declarations applied before).
    /// A failed batch drops the socket.
    pub fn send_rewrite(&mut self, rewrite: &NftRewrite) -> Result<()> {
        self.with_socket(|sock| sock.apply_rewrite(rewrite))
    }

    /// `send` over the open socket (opened first if there is none); a
    /// failure drops the socket, so the next send starts afresh.
    fn with_socket<T>(&mut self, send: impl FnOnce(&mut NlSocket) -> Result<T>) -> Result<T> {
        let sock = match &mut self.socket {
            Some(s) => s,
            None => self.socket.insert(NlSocket::open(self.netns.as_deref())?),
        };
        let result = send(sock);
        if result.is_err() {
            self.socket = None;
        }
        result
    }
}

/// nftables mode over an executor.
#[derive(Debug, Default)]
pub struct Nftables<E = NftCli> {
    /// The executor.
    pub exec: E,
    /// The endpoint map ranges of the planned dispatch chains.
    slots: Mutex<Slots>,
    /// The `hairpin` claims of the last rendered plan (a failed apply is
    /// followed by a full sync, which counts them again).
    claims: Mutex<Claims>,
    /// Full syncs whose netlink batch failed and that were applied as text.
    text_fallbacks: usize,
}

impl<E> Nftables<E> {
    /// nftables mode over `exec`.
    pub fn new(exec: E) -> Self {
        Self {
            exec,
            slots: Mutex::default(),
            claims: Mutex::default(),
            text_fallbacks: 0,
        }
    }

    /// Full syncs whose netlink batch failed and that `nft -f` applied instead.
    pub fn text_fallbacks(&self) -> usize {
        self.text_fallbacks
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The objects of `kind` (`chain`, `set`) of Tabby's table in `nft -j` output.
fn objects<'a>(doc: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    doc.get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(move |o| o.get(kind))
        .filter(|o| {
            o.get("family").and_then(Value::as_str) == Some(FAMILY)
                && o.get("table").and_then(Value::as_str) == Some(TABLE)
        })
}

fn parse(what: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|source| Error::Parse {
        what: what.into(),
        source,
    })
}

/// Tabby's chains and non-fixed sets from `nft -j list chains ip` and `nft -j list sets ip`.
pub fn parse_kernel(chains: &str, sets: &str) -> Result<NftKernel> {
    let chains = parse("nft -j list chains", chains)?;
    let sets = parse("nft -j list sets", sets)?;
    let name = |o: &Value| o.get("name").and_then(Value::as_str).map(String::from);
    let fixed = |n: &str| fixed_sets().any(|(s, _)| s == n);
    Ok(NftKernel {
        chains: objects(&chains, "chain").filter_map(name).collect(),
        affinity: objects(&sets, "set")
            .filter_map(|o| {
                let n = name(o)?;
                let timeout = o
                    .get("timeout")
                    .and_then(Value::as_u64)
                    .and_then(|t| u32::try_from(t).ok());
                (!fixed(&n)).then_some((n, timeout))
            })
            .collect(),
    })
}

impl<E: NftExec> Backend for Nftables<E> {
    type Plan = NftPlan;
    type Kernel = NftKernel;

    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn empty_plan(&self, opts: &ProxyOptions) -> NftPlan {
        NftPlan::empty(opts)
    }

    fn plan_port(&self, info: ServicePortInfo, ctx: &Ctx<'_>) -> NftPort {
        plan_port(info, ctx, &mut self.slots())
    }

    fn read_kernel(&mut self) -> Result<NftKernel> {
        let chains = self.exec.json(&["list", "chains", FAMILY])?;
        // Terse: without the elements (at 10k services listing them took
        // nft 2.6 s, more than the whole full sync).
        let sets = self.exec.json(&["-t", "list", "sets", FAMILY])?;
        parse_kernel(&chains, &sets)
    }

    fn full(&self, plan: &NftPlan, kernel: &NftKernel) -> Payload {
        self.slots().retain(|k| plan.ports.contains_key(k));
        *self.claims.lock().unwrap_or_else(PoisonError::into_inner) = Claims::of(plan);
        render_full_sync(plan, kernel)
    }

    fn partial_reads_whole_previous(&self) -> bool {
        false
    }

    /// Frees the ranges of removed service ports: a range reused in a later
    /// sync is rewritten after the old elements are deleted, and a failed
    /// transaction is followed by a full sync, which rewrites every map.
    fn partial(
        &self,
        previous: &NftPlan,
        plan: &NftPlan,
        changed: &BTreeSet<ServiceKey>,
    ) -> Payload {
        let gone: Vec<_> = previous
            .ports
            .keys()
            .filter(|k| !plan.ports.contains_key(*k))
            .collect();
        if !gone.is_empty() {
            self.slots().retain(|k| !gone.contains(&k));
        }
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        render_changes(previous, plan, changed, &mut claims)
    }

    fn apply(&mut self, payload: &Payload) -> Result<()> {
        if payload.text.is_empty() {
            return Ok(());
        }
        if let Some(batch) = &payload.batch {
            if self.exec.apply_batch(batch)? {
                return Ok(());
            }
        }
        if let Some(rewrite) = &payload.rewrite {
            match self.exec.apply_rewrite(rewrite) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.text_fallbacks += 1;
                    tracing::warn!(
                        error = %crate::error::chain(&e),
                        "full sync over netlink failed; applying it with nft -f"
                    );
                }
            }
        }
        self.exec.apply(&payload.text)
    }

    fn counts(&self, plan: &NftPlan) -> Counts {
        let chains = plan.fixed.len() + plan.ports.values().map(|p| p.chains.len()).sum::<usize>();
        Counts {
            rules: plan.chains().map(|c| c.rules.len()).sum(),
            chains,
            elements: plan.ports.values().map(|p| p.elements.len()).sum(),
        }
    }
}
