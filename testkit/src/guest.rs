//! qemu guests booted from Debian's stock kernel, for what this machine's
//! kernel cannot do (it has no `ipip`): software emulation (`-accel tcg`),
//! qboot and the uncompressed PVH kernel, about 3 s a boot.
//!
//! - [`Kernel`]: the kernel and modules `scripts/guest.sh` caches in
//!   /var/cache/tabby/guest; [`require_guests`] fails the test loudly when
//!   qemu or that cache is missing.
//! - [`Initramfs`]: a root filesystem per test, built from busybox, host
//!   programs with their libraries, kernel modules in dependency order, the
//!   binaries under test and an init script.
//! - [`Guest`]: one qemu process (killed on drop, also on panic), its serial
//!   console read line by line with a deadline; [`link`] joins two guests'
//!   NICs by UDP on the loopback.
//!
//! The guest side speaks in marker lines on the console, which the harness
//! turns into a [`GuestRun`]:
//!
//! ```text
//! TABBY-RESULT key=value     `result key value` in the script
//! TABBY-FAIL what            `fail what`, or a `wait_for` that timed out
//! TABBY-EXIT status          the script's exit status, then the guest powers off
//! ```

mod initramfs;
mod qemu;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use initramfs::Initramfs;
pub use qemu::{link, Guest, GuestRun, GuestSpec, Nic};

/// The qemu binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// The firmware that boots a PVH kernel directly (qemu-system-data).
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// The guest kernel `scripts/guest.sh` cached: `TABBY_GUEST_DIR`, else
/// /var/cache/tabby/guest.
#[derive(Debug, Clone)]
pub struct Kernel {
    dir: PathBuf,
    release: String,
    /// modules.dep: a module's path -> the paths it needs (all of them).
    deps: BTreeMap<String, Vec<String>>,
}

/// The cache directory of the guest kernel.
pub fn kernel_dir() -> PathBuf {
    std::env::var_os("TABBY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/tabby/guest".into())
}

impl Kernel {
    /// The cached kernel, or why there is none.
    pub fn cached() -> Result<Kernel, String> {
        let dir = kernel_dir();
        let missing = |what: &str| {
            format!(
                "{} has no {what}: run `bash scripts/guest.sh` (Debian's kernel for the qemu guests)",
                dir.display()
            )
        };
        if !dir.join(".complete").is_file() {
            return Err(missing("complete guest kernel"));
        }
        let release = std::fs::read_to_string(dir.join("RELEASE"))
            .map_err(|_| missing("RELEASE"))?
            .trim()
            .to_string();
        let dep_file = dir.join("lib/modules").join(&release).join("modules.dep");
        let text = std::fs::read_to_string(&dep_file).map_err(|_| missing("modules.dep"))?;
        Ok(Kernel {
            dir,
            release,
            deps: parse_modules_dep(&text),
        })
    }

    /// The kernel release (`6.1.0-57-amd64`).
    pub fn release(&self) -> &str {
        &self.release
    }

    /// The uncompressed kernel qboot boots.
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    /// The directory holding `lib/modules/<release>/`.
    pub fn root(&self) -> &Path {
        &self.dir
    }

    /// The module files that loading `names` takes, each after the ones it
    /// needs (paths relative to lib/modules/<release>). `libcrc32c` asks the
    /// crypto API for crc32c when it loads: `crc32c_generic` goes first.
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<String>, String> {
        let by_name: BTreeMap<String, &String> =
            self.deps.keys().map(|p| (module_name(p), p)).collect();
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut wanted: Vec<String> = names.iter().map(|n| n.replace('-', "_")).collect();
        if wanted.iter().any(|n| self.needs(&by_name, n, "libcrc32c")) {
            wanted.insert(0, "crc32c_generic".into());
        }
        for name in &wanted {
            let path = by_name.get(name).ok_or_else(|| {
                format!(
                    "module {name} is not in {} (add it to GUEST_MODULES in scripts/guest.sh)",
                    kernel_dir().display()
                )
            })?;
            self.visit(path, &mut seen, &mut order);
        }
        Ok(order)
    }

    fn needs(&self, by_name: &BTreeMap<String, &String>, name: &str, dep: &str) -> bool {
        by_name.get(name).is_some_and(|p| {
            module_name(p) == dep || self.deps[*p].iter().any(|d| module_name(d) == dep)
        })
    }

    fn visit(&self, path: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_string()) {
            return;
        }
        for dep in self.deps.get(path).into_iter().flatten() {
            self.visit(dep, seen, order);
        }
        order.push(path.to_string());
    }
}

/// `kernel/net/ipv4/ipip.ko` -> `ipip` (dashes as underscores, as modprobe).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// Call first in a guest test: the cached kernel when qemu, qboot and the
/// kernel are all there; else [`crate::skip_or_fail`] (so: a failure,
/// unless `TABBY_ALLOW_SKIP=1`) naming what installs the missing part.
pub fn require_guests(test: &str) -> Option<Kernel> {
    if !crate::require_root(test) {
        return None;
    }
    if !crate::require_programs(test, &[QEMU, "busybox"]) {
        return None;
    }
    if !Path::new(QBOOT).is_file() {
        crate::skip_or_fail(test, &format!("needs {QBOOT} (qemu-system-data)"));
        return None;
    }
    match Kernel::cached() {
        Ok(k) if k.vmlinux().is_file() => Some(k),
        Ok(k) => {
            crate::skip_or_fail(test, &format!("{} is missing", k.vmlinux().display()));
            None
        }
        Err(why) => {
            crate::skip_or_fail(test, &why);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(dep: &str) -> Kernel {
        Kernel {
            dir: "/nowhere".into(),
            release: "r".into(),
            deps: parse_modules_dep(dep),
        }
    }

    #[test]
    fn modules_load_after_everything_they_need_and_once() {
        let k = kernel(
            "kernel/net/ipv4/ipip.ko: kernel/net/ipv4/tunnel4.ko kernel/net/ipv4/ip_tunnel.ko\n\
             kernel/net/ipv4/tunnel4.ko:\nkernel/net/ipv4/ip_tunnel.ko:\n\
             kernel/drivers/net/veth.ko:\n",
        );
        let order = k.load_order(&["veth", "ipip", "ip_tunnel"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/net/veth.ko",
                "kernel/net/ipv4/tunnel4.ko",
                "kernel/net/ipv4/ip_tunnel.ko",
                "kernel/net/ipv4/ipip.ko",
            ]
        );
        let err = k.load_order(&["vxlan"]).unwrap_err();
        assert!(err.contains("module vxlan is not in"), "{err}");
    }

    #[test]
    fn users_of_libcrc32c_get_crc32c_generic_first() {
        let k = kernel(
            "kernel/net/netfilter/nf_conntrack.ko: kernel/lib/libcrc32c.ko\n\
             kernel/lib/libcrc32c.ko:\nkernel/crypto/crc32c_generic.ko:\n",
        );
        assert_eq!(
            k.load_order(&["nf-conntrack"]).unwrap(),
            [
                "kernel/crypto/crc32c_generic.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/net/netfilter/nf_conntrack.ko",
            ]
        );
    }
}
