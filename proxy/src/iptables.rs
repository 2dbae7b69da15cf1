//! The executor: applies payloads with `iptables-restore --noflush`.
//!
//! One sync is one `iptables-restore` run (one transaction for both tables).
//! Before a full sync the executor reads the tables once (`iptables-save`)
//! to find stale Tabby chains and the jump rules missing from the built-in
//! chains; the missing jumps are inserted by the same restore (`-I`), so the
//! built-in chains are never flushed.
//!
//! The backend is `iptables-legacy` or `iptables-nft`; [`detect_backend`]
//! picks the one that already holds more rules, as kube-proxy's
//! iptables-wrapper does, and nft when neither holds any.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::error::{Error, Result};
use super::names;
use super::payload::Extras;

/// Which iptables implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-legacy-*` (x_tables).
    Legacy,
    /// `iptables-nft-*` (nf_tables with the iptables compatibility layer).
    Nft,
}

impl Backend {
    /// Parse `legacy` or `nft`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "legacy" | "iptables-legacy" => Some(Self::Legacy),
            "nft" | "iptables-nft" => Some(Self::Nft),
            _ => None,
        }
    }

    /// `iptables-legacy` or `iptables-nft`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Legacy => "iptables-legacy",
            Self::Nft => "iptables-nft",
        }
    }

    /// The restore program.
    pub fn restore_program(self) -> String {
        format!("{}-restore", self.name())
    }

    /// The save program.
    pub fn save_program(self) -> String {
        format!("{}-save", self.name())
    }
}

/// A jump from a built-in chain to one of Tabby's chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jump {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// Built-in chain.
    pub from: &'static str,
    /// Tabby chain.
    pub to: &'static str,
    /// Matches before the comment (`-m conntrack --ctstate NEW`), may be empty.
    pub matches: &'static str,
    /// The rule's comment.
    pub comment: &'static str,
}

const NEW: &str = "-m conntrack --ctstate NEW";

/// The jump rules Tabby needs (kube-proxy's `iptablesJumpChains`).
pub const JUMPS: [Jump; 12] = [
    Jump {
        table: "filter",
        from: "INPUT",
        to: names::EXTERNAL_SERVICES,
        matches: NEW,
        comment: "kubernetes externally-visible service portals",
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: names::EXTERNAL_SERVICES,
        matches: NEW,
        comment: "kubernetes externally-visible service portals",
    },
    Jump {
        table: "filter",
        from: "INPUT",
        to: names::NODEPORTS,
        matches: "",
        comment: "kubernetes health check service ports",
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: names::SERVICES,
        matches: NEW,
        comment: "kubernetes service portals",
    },
    Jump {
        table: "filter",
        from: "OUTPUT",
        to: names::SERVICES,
        matches: NEW,
        comment: "kubernetes service portals",
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: names::FORWARD,
        matches: "",
        comment: "kubernetes forwarding rules",
    },
    Jump {
        table: "filter",
        from: "INPUT",
        to: names::PROXY_FIREWALL,
        matches: NEW,
        comment: "kubernetes load balancer firewall",
    },
    Jump {
        table: "filter",
        from: "OUTPUT",
        to: names::PROXY_FIREWALL,
        matches: NEW,
        comment: "kubernetes load balancer firewall",
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: names::PROXY_FIREWALL,
        matches: NEW,
        comment: "kubernetes load balancer firewall",
    },
    Jump {
        table: "nat",
        from: "OUTPUT",
        to: names::SERVICES,
        matches: "",
        comment: "kubernetes service portals",
    },
    Jump {
        table: "nat",
        from: "PREROUTING",
        to: names::SERVICES,
        matches: "",
        comment: "kubernetes service portals",
    },
    Jump {
        table: "nat",
        from: "POSTROUTING",
        to: names::POSTROUTING,
        matches: "",
        comment: "kubernetes postrouting rules",
    },
];

impl Jump {
    /// The rule as `iptables-save` prints it, without `-A CHAIN`.
    pub fn spec(&self) -> String {
        let m = if self.matches.is_empty() {
            String::new()
        } else {
            format!("{} ", self.matches)
        };
        format!(
            "{m}-m comment --comment \"{}\" -j {}",
            self.comment, self.to
        )
    }
}

/// What `iptables-save` showed of the nat and filter tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Chains of the nat table.
    pub nat_chains: Vec<String>,
    /// Chains of the filter table.
    pub filter_chains: Vec<String>,
    /// `(table, rule line)` of every `-A` rule.
    pub rules: Vec<(String, String)>,
}

impl KernelState {
    /// Parse `iptables-save` output.
    pub fn parse(text: &str) -> Self {
        let mut st = KernelState::default();
        let mut table = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.trim().to_string();
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                match table.as_str() {
                    "nat" => st.nat_chains.push(name),
                    "filter" => st.filter_chains.push(name),
                    _ => {}
                }
            } else if line.starts_with("-A ") {
                st.rules.push((table.clone(), line.to_string()));
            }
        }
        st
    }

    /// Whether a rule in `table`/`from` jumps to `to`.
    pub fn has_jump(&self, table: &str, from: &str, to: &str) -> bool {
        let prefix = format!("-A {from} ");
        let suffix = format!("-j {to}");
        self.rules
            .iter()
            .any(|(t, r)| t == table && r.starts_with(&prefix) && r.trim_end().ends_with(&suffix))
    }

    /// Number of rules in the tables shown.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

/// `-I` lines for the jump rules `state` lacks.
pub fn missing_jumps(state: &KernelState) -> Extras {
    let mut extras = Extras::default();
    for j in JUMPS
        .iter()
        .filter(|j| !state.has_jump(j.table, j.from, j.to))
    {
        let line = format!("-I {} {}", j.from, j.spec());
        if j.table == "nat" {
            extras.nat_jumps.push(line)
        } else {
            extras.filter_jumps.push(line)
        }
    }
    extras
}

/// The side effects the proxier needs: read the tables, apply a payload.
pub trait Dataplane {
    /// `iptables-save` of the nat and filter tables.
    fn save(&mut self) -> Result<String>;
    /// Apply a payload with `iptables-restore --noflush` in one transaction.
    fn restore(&mut self, payload: &str) -> Result<()>;
}

/// The real executor: runs the backend's programs, optionally inside a
/// network namespace (`nsenter --net=PATH`), as the lab and tests need.
#[derive(Debug, Clone)]
pub struct Iptables {
    /// The backend.
    pub backend: Backend,
    /// Network namespace file to enter (e.g. `/run/netns/NAME`), if any.
    pub netns: Option<PathBuf>,
}

impl Iptables {
    /// An executor for `backend` in the current network namespace.
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            netns: None,
        }
    }

    /// The same executor inside the namespace at `path`.
    pub fn in_netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }

    /// `program` as a command in this executor's namespace (through
    /// `nsenter`) or in the current one.
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

/// Run `cmd`, feeding `stdin`, and return its stdout.
pub(crate) fn run(mut cmd: Command, program: &str, stdin: Option<&[u8]>) -> Result<String> {
    let program_path = PathBuf::from(program);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        program: program_path.clone(),
        source,
    })?;
    // A write error (EPIPE) means the program exited early: its status says why.
    let write_error = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => pipe.write_all(data).err(),
        _ => None,
    };
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        program: program_path.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Failed {
            program: program_path,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    if let Some(source) = write_error {
        return Err(Error::Stdin {
            program: program_path,
            source,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Dataplane for Iptables {
    fn save(&mut self) -> Result<String> {
        let prog = self.backend.save_program();
        let mut text = String::new();
        for table in ["nat", "filter"] {
            let mut cmd = self.command(&prog);
            cmd.args(["-t", table]);
            text.push_str(&run(cmd, &prog, None)?);
        }
        Ok(text)
    }

    fn restore(&mut self, payload: &str) -> Result<()> {
        let prog = self.backend.restore_program();
        let mut cmd = self.command(&prog);
        cmd.args(["--noflush", "--wait=5"]);
        run(cmd, &prog, Some(payload.as_bytes())).map(drop)
    }
}

/// Pick the backend that already holds more rules (nft on a tie).
pub fn detect_backend(netns: Option<&std::path::Path>) -> Backend {
    let count = |b: Backend| {
        let mut ipt = Iptables::new(b);
        ipt.netns = netns.map(PathBuf::from);
        let prog = b.save_program();
        run(ipt.command(&prog), &prog, None)
            .map(|t| KernelState::parse(&t).rule_count())
            .unwrap_or(0)
    };
    if count(Backend::Legacy) > count(Backend::Nft) {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:TABBY-SERVICES - [0:0]\n\
        -A PREROUTING -m comment --comment \"kubernetes service portals\" -j TABBY-SERVICES\nCOMMIT\n\
        *filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";

    #[test]
    fn only_missing_jumps_are_inserted() {
        let st = KernelState::parse(SAVED);
        assert_eq!(st.nat_chains, ["PREROUTING", "TABBY-SERVICES"]);
        let extras = missing_jumps(&st);
        assert_eq!(extras.nat_jumps.len(), 2, "{extras:?}");
        assert!(extras
            .nat_jumps
            .iter()
            .all(|l| !l.starts_with("-I PREROUTING")));
        assert_eq!(extras.filter_jumps.len(), 9);
        assert_eq!(
            extras.filter_jumps[0],
            "-I INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j TABBY-EXTERNAL-SERVICES"
        );
    }

    #[test]
    fn backend_names_parse() {
        assert_eq!(Backend::from_name("legacy"), Some(Backend::Legacy));
        assert_eq!(Backend::Nft.restore_program(), "iptables-nft-restore");
        assert_eq!(Backend::from_name("ipvs"), None);
    }
}
