//! natOutgoing: MASQUERADE what leaves every pool from a pool that asks
//! for it (felix's `cali-nat-outgoing`).
//!
//! - [`plan`]: pure, from the cluster view to the wanted sets, and the payloads;
//! - here: [`NatOutgoing`] carries a plan out through a [`NatDataplane`]
//!   (the real one, [`KernelNat`], runs `ipset` and the iptables flavour the
//!   service proxy detected) and remembers what it applied.
//!
//! Kernel ipsets with an iptables rule are used in both proxy modes: the
//! sets and the rule are what felix programs, the nat table's POSTROUTING
//! runs them alongside an nftables proxy table (each hook runs every
//! table's chain), and one code path is kept.

pub mod plan;

use std::process::{Command, Stdio};

use tabby_proxy::iptables::{Backend, Dataplane, Iptables, KernelState};
use tracing::info;

pub use plan::NatPlan;
use plan::{ipset_payload, ipset_removal, jump, removal_payload, rules_payload, CHAIN};

/// Why natOutgoing could not be programmed.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// Reading or writing the nat table failed.
    #[error("{what} the nat table")]
    Iptables {
        /// `read` or `write`.
        what: &'static str,
        /// Why.
        #[source]
        source: tabby_proxy::Error,
    },
    /// Running `ipset` failed to start.
    #[error("run ipset {args}")]
    IpsetSpawn {
        /// Its arguments.
        args: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `ipset` refused.
    #[error("ipset {args} exited with {status}: {stderr}")]
    Ipset {
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// Writing the sets worked but the rule did not; the sets were put back.
    #[error("install the {CHAIN} rule (the sets were rolled back)")]
    RolledBack(#[source] Box<NatError>),
}

impl NatError {
    /// Whether the program itself could not be started because it is not
    /// installed (an `io::Error` of kind `NotFound` in the chain).
    pub fn program_missing(&self) -> bool {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = next {
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
            {
                return true;
            }
            next = e.source();
        }
        false
    }
}

/// The side effects natOutgoing needs.
pub trait NatDataplane {
    /// `iptables-save` (the nat table at least).
    fn save(&mut self) -> Result<String, NatError>;
    /// `iptables-restore --noflush` of `payload`, one transaction.
    fn restore(&mut self, payload: &str) -> Result<(), NatError>;
    /// `ipset restore` of `payload`.
    fn ipset_restore(&mut self, payload: &str) -> Result<(), NatError>;
    /// `ipset list -n`: the names of the sets there are.
    fn ipset_names(&mut self) -> Result<Vec<String>, NatError>;
    /// Whether MASQUERADE takes `--random-fully`.
    fn random_fully(&mut self) -> bool;
}

/// The real dataplane: `ipset` and the iptables flavour of `ipt`, in the
/// namespace of `ipt` if it names one.
#[derive(Debug, Clone)]
pub struct KernelNat {
    ipt: Iptables,
    random_fully: Option<bool>,
}

impl KernelNat {
    /// Over the executor `ipt` (its backend and namespace).
    pub fn new(ipt: Iptables) -> Self {
        KernelNat {
            ipt,
            random_fully: None,
        }
    }

    /// The flavour `backend` in the current namespace.
    pub fn host(backend: Backend) -> Self {
        Self::new(Iptables::new(backend))
    }

    fn command(&self, program: &str) -> Command {
        self.ipt.command(program)
    }

    fn ipset(&self, args: &[&str], stdin: Option<&str>) -> Result<String, NatError> {
        let joined = args.join(" ");
        let spawn = |source| NatError::IpsetSpawn {
            args: joined.clone(),
            source,
        };
        let mut cmd = self.command("ipset");
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(spawn)?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            // A failed write means ipset exited early: its status says why.
            let _ = pipe.write_all(data.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn)?;
        if !out.status.success() {
            return Err(NatError::Ipset {
                args: joined,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl NatDataplane for KernelNat {
    fn save(&mut self) -> Result<String, NatError> {
        Dataplane::save(&mut self.ipt).map_err(|source| NatError::Iptables {
            what: "read",
            source,
        })
    }

    fn restore(&mut self, payload: &str) -> Result<(), NatError> {
        Dataplane::restore(&mut self.ipt, payload).map_err(|source| NatError::Iptables {
            what: "write",
            source,
        })
    }

    fn ipset_restore(&mut self, payload: &str) -> Result<(), NatError> {
        if payload.is_empty() {
            return Ok(());
        }
        self.ipset(&["restore"], Some(payload)).map(drop)
    }

    fn ipset_names(&mut self) -> Result<Vec<String>, NatError> {
        let out = self.ipset(&["list", "-n"], None)?;
        Ok(out.lines().map(|l| l.trim().to_string()).collect())
    }

    fn random_fully(&mut self) -> bool {
        if let Some(known) = self.random_fully {
            return known;
        }
        let help = self
            .command(self.ipt.backend.name())
            .args(["-t", "nat", "-j", "MASQUERADE", "--help"])
            .stdin(Stdio::null())
            .output();
        let known =
            help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--random-fully"));
        self.random_fully = Some(known);
        known
    }
}

/// The natOutgoing state of one agent: the dataplane and the plan it last
/// applied (`None` after a start or a failure: the next pass applies again).
pub struct NatOutgoing<P: NatDataplane> {
    dp: P,
    applied: Option<NatPlan>,
}

/// The POSTROUTING jumps to [`CHAIN`] and whether the chain exists.
fn present(saved: &str) -> (usize, bool) {
    let st = KernelState::parse(saved);
    let want = jump("-A");
    let jumps = st
        .rules
        .iter()
        .filter(|(t, r)| t == "nat" && r.trim_end() == want)
        .count();
    (jumps, st.nat_chains.iter().any(|c| c == CHAIN))
}

impl<P: NatDataplane> NatOutgoing<P> {
    /// Nothing applied yet.
    pub fn new(dp: P) -> Self {
        NatOutgoing { dp, applied: None }
    }

    /// The dataplane (tests read the kernel through it).
    pub fn dataplane(&mut self) -> &mut P {
        &mut self.dp
    }

    /// Makes the kernel match `want`; returns whether it had to act.
    pub fn sync(&mut self, want: &NatPlan) -> Result<bool, NatError> {
        if self.applied.as_ref() == Some(want) {
            return Ok(false);
        }
        let saved = match self.dp.save() {
            Ok(saved) => saved,
            // A host without the iptables program (the qemu guests) has
            // nothing of ours to remove: with nothing wanted, no failure.
            Err(e) if !want.wanted() && e.program_missing() => {
                self.applied = Some(want.clone());
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let previous = self.applied.take();
        let (jumps, chain) = present(&saved);
        if want.wanted() {
            self.install(want, previous.as_ref(), jumps, chain)?;
            info!(masq_pools = ?want.masq_pools, hosts = want.hosts.len(), "natOutgoing programmed");
        } else {
            if jumps > 0 || chain {
                self.dp.restore(&removal_payload(jumps, chain))?;
            }
            let names = self.dp.ipset_names()?;
            self.dp.ipset_restore(&ipset_removal(&names))?;
            if previous.as_ref().is_some_and(NatPlan::wanted) || chain {
                info!("natOutgoing removed: no pool asks for it");
            }
        }
        self.applied = Some(want.clone());
        Ok(true)
    }

    /// Sets first (the rule names them), then the rule; when the rule
    /// fails, the sets go back to what they were.
    fn install(
        &mut self,
        want: &NatPlan,
        previous: Option<&NatPlan>,
        jumps: usize,
        chain: bool,
    ) -> Result<(), NatError> {
        let before = self.dp.ipset_names()?;
        if let Err(e) = self.dp.ipset_restore(&ipset_payload(want)) {
            // `ipset restore` stops at the first bad line: drop what it made.
            self.undo(&before, previous.filter(|_| chain));
            return Err(e);
        }
        let random_fully = self.dp.random_fully();
        let Err(e) = self.dp.restore(&rules_payload(random_fully, jumps)) else {
            return Ok(());
        };
        self.undo(&before, previous.filter(|_| chain));
        Err(NatError::RolledBack(Box::new(e)))
    }

    /// Puts the sets back: refilled as `previous` (the rule in the kernel
    /// still names them), else those not in `before` destroyed.
    fn undo(&mut self, before: &[String], previous: Option<&NatPlan>) {
        let undo = match previous {
            Some(p) if p.wanted() => ipset_payload(p),
            _ => {
                let now = self.dp.ipset_names().unwrap_or_default();
                let made: Vec<String> = now.into_iter().filter(|s| !before.contains(s)).collect();
                ipset_removal(&made)
            }
        };
        if let Err(e) = self.dp.ipset_restore(&undo) {
            tracing::warn!(error = %tabby_errors::chain(&e), "rolling back the natOutgoing sets failed");
        }
    }
}
