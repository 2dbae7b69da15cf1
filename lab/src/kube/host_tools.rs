//! The netfilter tools of the `tabby` image, taken from this host's Debian
//! packages: the agent's proxy and natOutgoing run `iptables-legacy-*` or
//! `iptables-nft-*` (whichever the node uses), `nft`, `ipset` and
//! `conntrack`, as Calico's and kube-proxy's images carry them. The lab
//! builds images without a registry or a Debian rootfs, so it copies each
//! program, the shared libraries `ldd` names for it, the iptables
//! extensions (dlopened, so `ldd` cannot see them) and `ld.so.cache`, at
//! their paths on this host. The iptables names are links to the
//! `xtables-*-multi` programs, as in the packages.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use super::oci;
use crate::sh;

/// The programs, from `/usr/sbin`.
const PROGRAMS: [&str; 5] = [
    "xtables-legacy-multi",
    "xtables-nft-multi",
    "nft",
    "ipset",
    "conntrack",
];
/// The names the multi programs answer to, per program.
const MULTI_NAMES: [(&str, &str); 2] = [
    ("xtables-legacy-multi", "legacy"),
    ("xtables-nft-multi", "nft"),
];
/// Where Debian keeps the iptables extensions.
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// The files and links of the tools, with paths relative to the image root.
pub fn tools() -> anyhow::Result<(Vec<oci::File>, Vec<oci::Link>)> {
    let mut objects: Vec<PathBuf> = PROGRAMS
        .iter()
        .map(|p| Path::new("/usr/sbin").join(p))
        .collect();
    for program in &objects {
        anyhow::ensure!(
            program.is_file(),
            "{} is missing: bash scripts/setup.sh installs iptables, nftables, ipset and conntrack",
            program.display()
        );
    }
    let extensions = std::fs::read_dir(XTABLES_DIR)
        .with_context(|| format!("reading {XTABLES_DIR} (iptables' extensions)"))?;
    for entry in extensions {
        let path = entry
            .with_context(|| format!("reading {XTABLES_DIR}"))?
            .path();
        if path.extension().is_some_and(|e| e == "so") {
            objects.push(path);
        }
    }
    let mut libraries = BTreeSet::new();
    for object in &objects {
        let mut cmd = Command::new("ldd");
        cmd.arg(object);
        let out = sh::run(cmd).with_context(|| format!("ldd {}", object.display()))?;
        libraries.extend(libraries_of(&out));
    }
    let mut paths: BTreeSet<PathBuf> = objects.into_iter().collect();
    paths.extend(libraries);
    paths.insert(PathBuf::from("/etc/ld.so.cache"));
    let mut files = Vec::new();
    for path in paths {
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        // The host's mode: the kernel execs the loader only with its x bits.
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o7777)
            .with_context(|| format!("reading {}", path.display()))?;
        files.push(oci::File {
            path: path
                .display()
                .to_string()
                .trim_start_matches('/')
                .to_string(),
            mode,
            data,
        });
    }
    Ok((files, links()))
}

/// `usr/sbin/iptables-legacy-save -> xtables-legacy-multi` and so on.
fn links() -> Vec<oci::Link> {
    let mut links = Vec::new();
    for (program, flavour) in MULTI_NAMES {
        for family in ["iptables", "ip6tables"] {
            for suffix in ["", "-save", "-restore"] {
                links.push((
                    format!("usr/sbin/{family}-{flavour}{suffix}"),
                    program.to_string(),
                ));
            }
        }
    }
    links
}

/// The absolute paths in `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x…)`
/// and the loader's own line `/lib64/ld-linux-x86-64.so.2 (0x…)`.
fn libraries_of(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_the_libraries_and_the_loader_but_not_the_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibxtables.so.12 => /lib/x86_64-linux-gnu/libxtables.so.12 (0x00007f1)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            libraries_of(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libxtables.so.12"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn every_iptables_name_the_proxy_runs_is_a_link_to_a_multi_program() {
        let links = links();
        for name in [
            "iptables-legacy-save",
            "iptables-legacy-restore",
            "iptables-nft-save",
            "iptables-nft-restore",
        ] {
            let target = links
                .iter()
                .find(|(path, _)| *path == format!("usr/sbin/{name}"))
                .map(|(_, t)| t.as_str());
            assert!(
                matches!(target, Some("xtables-legacy-multi" | "xtables-nft-multi")),
                "{name}: {target:?}"
            );
        }
    }
}
