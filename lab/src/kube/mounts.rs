//! A node's file system view: its own mount and UTS namespaces, kept alive
//! by bind mounts of their nsfs files under `<state>/ns` (as `ip netns` does
//! for network namespaces), and inside them private directories.
//!
//! Inside a node's mount namespace (everything else is the host's):
//!
//! | path              | what                                                   |
//! |-------------------|--------------------------------------------------------|
//! | `/etc`, `/opt`, `/var/lib` | overlays: the host's files below, the node's writes in `<node>/overlay/` |
//! | `/etc/cni/net.d`, `/opt/cni/bin`, `/var/lib/kubelet`, `/var/lib/tabby`, `/var/lib/cni`, `/var/log` | bind mounts of empty dirs in `<node>/` |
//! | `/run`            | a tmpfs (with the state dir bound back when it is under /run) |
//!
//! The overlays give the private directories their mount points without
//! creating anything on the host's file system (`/etc/cni`, `/opt/cni` and
//! `/var/lib/kubelet` do not exist there). Every command is an `nsenter ...
//! mount ...` line an operator can replay.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::sh;

/// The host directories a node sees through an overlay, and the overlay's name.
const OVERLAYS: [(&str, &str); 3] = [("/etc", "etc"), ("/opt", "opt"), ("/var/lib", "var-lib")];

/// A node's private directories (inside the node) and their sources in the node's dir.
pub const PRIVATE_DIRS: [(&str, &str); 6] = [
    ("/etc/cni/net.d", "etc-cni-net.d"),
    ("/opt/cni/bin", "opt-cni-bin"),
    ("/var/lib/kubelet", "var-lib-kubelet"),
    ("/var/lib/tabby", "var-lib-tabby"),
    ("/var/lib/cni", "var-lib-cni"),
    ("/var/log", "var-log"),
];

/// The host-side source of a node's private directory `inside` (e.g. `/etc/cni/net.d`).
pub fn private_dir(node_dir: &Path, inside: &str) -> Option<PathBuf> {
    PRIVATE_DIRS
        .iter()
        .find(|(path, _)| *path == inside)
        .map(|(_, name)| node_dir.join(name))
}

/// Makes `dir` a mount point of its own with private propagation, so that
/// namespace files bind-mounted into it do not propagate (a mount
/// namespace's file must not appear inside that namespace). Idempotent.
pub fn private_mount_point(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !mounts_under(dir).iter().any(|m| m == dir) {
        mount(&["--bind", &s(dir), &s(dir)])?;
    }
    mount(&["--make-private", &s(dir)])
}

/// Creates the persistent mount and UTS namespaces `mnt` and `uts` (files
/// in a [`private_mount_point`]) with private propagation.
pub fn new_namespaces(mnt: &Path, uts: &Path) -> anyhow::Result<()> {
    for file in [mnt, uts] {
        fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
    }
    let mut cmd = Command::new("unshare");
    cmd.arg(format!("--mount={}", mnt.display()))
        .arg(format!("--uts={}", uts.display()))
        .args(["--propagation", "private", "true"]);
    sh::run(cmd).map(|_| ())
}

/// `nsenter --mount=MNT [--uts=UTS] -- PROGRAM`, ready for arguments.
pub fn in_node(mnt: &Path, uts: Option<&Path>, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--mount={}", mnt.display()));
    if let Some(uts) = uts {
        cmd.arg(format!("--uts={}", uts.display()));
    }
    cmd.arg("--").arg(program);
    cmd
}

/// Where a node's file system view comes from.
#[derive(Debug, Clone)]
pub struct NodeFs<'a> {
    /// The node's name, its host name.
    pub name: &'a str,
    /// Its directory (sources of the private dirs, overlay layers).
    pub dir: &'a Path,
    /// The lab's state dir, which the node must see at the same path.
    pub state_root: &'a Path,
    /// The node's mount namespace file.
    pub mnt: &'a Path,
    /// The node's UTS namespace file.
    pub uts: &'a Path,
    /// Where every node's namespace files are: unmounted inside the node,
    /// so that no node's namespace holds another's.
    pub ns_dir: &'a Path,
}

/// Sets the node's host name and mounts its view (see the module docs).
pub fn setup(node: &NodeFs<'_>) -> anyhow::Result<()> {
    // `mount -n`: no userspace mount table (/run/mount/utab) to update,
    // which fails once /run is the node's own.
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let mut cmd = in_node(node.mnt, None, args[0]);
        if args[0] == "mount" {
            cmd.arg("-n");
        }
        cmd.args(&args[1..]);
        sh::run(cmd).map(|_| ())
    };
    let mut hostname = in_node(node.mnt, Some(node.uts), "hostname");
    hostname.arg(node.name);
    sh::run(hostname)?;
    run(&["umount", "--recursive", &s(node.ns_dir)])?;

    for (target, name) in OVERLAYS {
        let (upper, work) = (
            node.dir.join("overlay").join(name),
            node.dir.join("overlay").join(format!("{name}.work")),
        );
        mkdirs(&[&upper, &work])?;
        let options = format!(
            "lowerdir={target},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        run(&["mount", "-t", "overlay", "-o", &options, "overlay", target])?;
    }
    for (target, name) in PRIVATE_DIRS {
        let source = node.dir.join(name);
        mkdirs(&[&source])?;
        run(&["mkdir", "-p", target])?;
        run(&["mount", "--bind", &s(&source), target])?;
    }

    // /run: a tmpfs, populated while the host's /run is still visible,
    // then moved into place.
    let stage = node.dir.join("run");
    mkdirs(&[&stage])?;
    run(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "mode=0755",
        "tmpfs",
        &s(&stage),
    ])?;
    if let Ok(rel) = node.state_root.strip_prefix("/run") {
        let back = stage.join(rel);
        run(&["mkdir", "-p", &s(&back)])?;
        run(&["mount", "--bind", &s(node.state_root), &s(&back)])?;
    }
    run(&[
        "mkdir",
        "-p",
        &format!("{}/lock", s(&stage)),
        &format!("{}/netns", s(&stage)),
    ])?;
    run(&["mount", "--move", &s(&stage), "/run"])
}

fn mkdirs(dirs: &[&Path]) -> anyhow::Result<()> {
    for dir in dirs {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

fn mount(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("mount");
    cmd.args(args);
    sh::run(cmd).map(|_| ())
}

/// The host's mount points at `dir` or below, deepest first (from
/// /proc/self/mountinfo; octal escapes decoded).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Decodes mountinfo's `\040`-style escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts every mount at `dir` or below, deepest first (namespace files
/// first: that ends a namespace no process holds). Returns how many went.
pub fn unmount_all(dir: &Path) -> anyhow::Result<usize> {
    let mut count = 0;
    let mut errors = Vec::new();
    for point in mounts_under(dir) {
        let mut cmd = Command::new("umount");
        cmd.arg(&point);
        match sh::run(cmd) {
            Ok(_) => count += 1,
            Err(e) => {
                // Busy: detach it now, the kernel frees it when unused.
                let mut lazy = Command::new("umount");
                lazy.arg("--lazy").arg(&point);
                match sh::run(lazy) {
                    Ok(_) => count += 1,
                    Err(_) => errors.push(format!("{e:#}")),
                }
            }
        }
    }
    match errors.is_empty() {
        true => Ok(count),
        false => Err(anyhow::anyhow!(errors.join("; "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/x\\y"), r"/x\\y");
    }

    #[test]
    fn every_private_dir_has_a_source() {
        let dir = Path::new("/s/nodes/node-1");
        assert_eq!(
            private_dir(dir, "/etc/cni/net.d").unwrap(),
            Path::new("/s/nodes/node-1/etc-cni-net.d")
        );
        assert!(private_dir(dir, "/etc").is_none());
    }
}
