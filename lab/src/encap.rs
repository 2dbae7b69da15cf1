//! The default pool's encapsulation (`tabby-up --encap`, `--nat-outgoing`):
//! what it asks of the pool and of the kernel.

use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::sh;

/// The default pool's encapsulation between nodes, as `--encap` spells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Encap {
    /// Native routing: BGP routes via the node (needs one L2 subnet, or a
    /// router that knows the blocks).
    #[default]
    None,
    /// VXLAN to every node (`vxlanMode: Always`).
    Vxlan,
    /// VXLAN only to nodes on another subnet (`vxlanMode: CrossSubnet`).
    VxlanCrosssubnet,
    /// IPIP to every node (`ipipMode: Always`); the kernel needs ipip.
    Ipip,
    /// IPIP only to nodes on another subnet (`ipipMode: CrossSubnet`).
    IpipCrosssubnet,
}

impl Encap {
    /// The pool's `(ipipMode, vxlanMode)`, as `tabbyctl pool create` takes them.
    pub fn pool_modes(self) -> (&'static str, &'static str) {
        match self {
            Encap::None => ("Never", "Never"),
            Encap::Vxlan => ("Never", "Always"),
            Encap::VxlanCrosssubnet => ("Never", "CrossSubnet"),
            Encap::Ipip => ("Always", "Never"),
            Encap::IpipCrosssubnet => ("CrossSubnet", "Never"),
        }
    }

    /// Whether the mode needs the kernel's ipip.
    pub fn needs_ipip(self) -> bool {
        matches!(self, Encap::Ipip | Encap::IpipCrosssubnet)
    }

    /// The name `--encap` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Encap::None => "none",
            Encap::Vxlan => "vxlan",
            Encap::VxlanCrosssubnet => "vxlan-crosssubnet",
            Encap::Ipip => "ipip",
            Encap::IpipCrosssubnet => "ipip-crosssubnet",
        }
    }

    /// Fails, before the lab makes anything, when the kernel cannot carry
    /// this mode (ipip is often missing: it is a module, and some kernels
    /// neither have it built in nor load modules).
    pub fn check_kernel(self) -> anyhow::Result<()> {
        if !self.needs_ipip() {
            return Ok(());
        }
        let probe = probe_ipip();
        anyhow::ensure!(
            probe.is_ok(),
            "--encap {} needs IPIP, and this kernel has no ipip ({:#}): use --encap vxlan or vxlan-crosssubnet, or a kernel with ipip (the qemu guests of the IPIP test)",
            self.as_str(),
            probe.unwrap_err()
        );
        Ok(())
    }
}

/// Whether an `ipip` link can be made: built in (`/sys/module/ipip`) or
/// made in a throwaway network namespace (`unshare --net`, gone with the
/// process, so nothing is left to clean up).
fn probe_ipip() -> anyhow::Result<()> {
    if std::path::Path::new("/sys/module/ipip").exists() {
        return Ok(());
    }
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "ip",
        "link",
        "add",
        "probe0",
        "type",
        "ipip",
        "local",
        "192.0.2.1",
        "remote",
        "192.0.2.2",
    ]);
    sh::run(cmd).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_sets_at_most_one_encapsulation_on_the_pool() {
        for encap in [
            Encap::None,
            Encap::Vxlan,
            Encap::VxlanCrosssubnet,
            Encap::Ipip,
            Encap::IpipCrosssubnet,
        ] {
            let (ipip, vxlan) = encap.pool_modes();
            assert!(ipip == "Never" || vxlan == "Never", "{encap:?}");
            assert_eq!(encap.needs_ipip(), ipip != "Never");
            let parsed = <Encap as clap::ValueEnum>::from_str(encap.as_str(), false).unwrap();
            assert_eq!(parsed, encap);
        }
        assert_eq!(Encap::VxlanCrosssubnet.pool_modes().1, "CrossSubnet");
    }
}
