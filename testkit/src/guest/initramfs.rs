//! A guest's root filesystem: a staging directory packed by `busybox cpio`
//! into a newc archive (uncompressed: unpacking it is a copy, the fastest
//! under emulation). Archives concatenate: a test packs the files its
//! guests share once and a small archive per guest on top.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::Kernel;

/// Where the harness's init finds what the test put there.
pub const GUEST_DIR: &str = "etc/tabby-guest";

/// The guest's `/init`: mounts, busybox applets, the modules, then the
/// test's script (`/etc/tabby-guest/run`, sourced in a subshell so that it
/// sees the helpers), `TABBY-EXIT <status>` and power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /var /usr/bin /usr/sbin /sbin
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ln -sfn /run /var/run
# Debian's busybox-static prefers its applets to PATH: functions win over
# both, so the host programs (ip) are functions here; `sh -c` strings
# name them by path (/usr/local/sbin/ip).
for p in /usr/local/sbin/*; do
    [ -x "$p" ] && eval "${p##*/}() { $p \"\$@\"; }"
done
result() { k=$1; shift; echo "TABBY-RESULT $k=$*"; }
fail() { echo "TABBY-FAIL $*"; return 1; }
# wait_for N WHAT CMD...: CMD every 50 ms until it succeeds, N times at most.
wait_for() {
    n=$1 what=$2 i=0
    shift 2
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -lt "$n" ] || { fail "timed out waiting for $what"; return 1; }
        usleep 50000
    done
}
while read -r m; do
    insmod "/lib/modules/$(uname -r)/$m" || echo "TABBY-FAIL insmod $m"
done </etc/tabby-guest/modules
ip link set lo up
[ -f /etc/tabby-guest/hostname ] && hostname "$(cat /etc/tabby-guest/hostname)"
echo "TABBY-BOOTED $(cut -d' ' -f1 /proc/uptime)"
(. /etc/tabby-guest/run)
echo "TABBY-EXIT $?"
poweroff -f
"#;

/// A staging directory that becomes one initramfs archive.
pub struct Initramfs {
    stage: tempfile::TempDir,
}

impl Default for Initramfs {
    fn default() -> Self {
        Self::empty()
    }
}

impl Initramfs {
    /// An archive with nothing in it (the per-guest layer).
    pub fn empty() -> Self {
        Initramfs {
            stage: tempfile::Builder::new()
                .prefix("tabby-initramfs-")
                .tempdir()
                .expect("a staging directory"),
        }
    }

    /// The base layer: busybox, the harness's `/init` and the modules
    /// `modules` need (with the list `/init` loads, in order).
    pub fn base(kernel: &Kernel, modules: &[&str]) -> Self {
        let mut fs = Self::empty();
        fs.copy("bin/busybox", Path::new("/bin/busybox"), 0o755);
        fs.bytes("init", INIT.as_bytes(), 0o755);
        let order = kernel.load_order(modules).unwrap_or_else(|e| panic!("{e}"));
        let lib = format!("lib/modules/{}", kernel.release());
        for m in &order {
            fs.copy(
                &format!("{lib}/{m}"),
                &kernel.root().join(&lib).join(m),
                0o644,
            );
        }
        let mut list = order.join("\n");
        list.push('\n');
        fs.bytes(&format!("{GUEST_DIR}/modules"), list.as_bytes(), 0o644);
        fs
    }

    fn path(&self, dest: &str) -> PathBuf {
        let dest = dest.trim_start_matches('/');
        assert!(
            !dest.split('/').any(|c| c == ".."),
            "{dest}: no `..` in a guest path"
        );
        self.stage.path().join(dest)
    }

    /// Writes `data` at `dest` (a path in the guest).
    pub fn bytes(&mut self, dest: &str, data: &[u8], mode: u32) -> &mut Self {
        let p = self.path(dest);
        fs::create_dir_all(p.parent().expect("a path under the stage"))
            .unwrap_or_else(|e| panic!("mkdir for {}: {e}", p.display()));
        fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        self
    }

    /// Copies the host file `src` (following links) to `dest`.
    pub fn copy(&mut self, dest: &str, src: &Path, mode: u32) -> &mut Self {
        let data = fs::read(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
        self.bytes(dest, &data, mode)
    }

    /// Copies the directory tree `src` to `dest`.
    pub fn tree(&mut self, dest: &str, src: &Path) -> &mut Self {
        let entries =
            fs::read_dir(src).unwrap_or_else(|e| panic!("read dir {}: {e}", src.display()));
        fs::create_dir_all(self.path(dest)).expect("mkdir in the stage");
        for entry in entries {
            let entry = entry.expect("a directory entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = format!("{}/{name}", dest.trim_end_matches('/'));
            if entry.file_type().expect("a file type").is_dir() {
                self.tree(&child, &entry.path());
            } else {
                let mode = entry.metadata().expect("metadata").permissions().mode() & 0o7777;
                self.copy(&child, &entry.path(), mode);
            }
        }
        self
    }

    /// A host program (an ELF linked with glibc, like `/usr/sbin/ip`) as
    /// `/usr/local/sbin/<name>` (before busybox's applets on PATH), with
    /// every library `ldd` names at its own path.
    pub fn host_program(&mut self, program: &str) -> &mut Self {
        let path = which(program);
        let out = Command::new("ldd")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("run ldd {}: {e}", path.display()));
        let text = String::from_utf8_lossy(&out.stdout);
        for lib in text.split_whitespace().filter(|w| w.starts_with('/')) {
            self.copy(lib, Path::new(lib), 0o755);
        }
        let name = path.file_name().expect("a file name").to_string_lossy();
        self.copy(&format!("usr/local/sbin/{name}"), &path, 0o755)
    }

    /// The test's script, sourced by `/init` after boot with its helpers
    /// `result KEY VALUE...`, `fail WHAT` and `wait_for N WHAT CMD...`.
    pub fn script(&mut self, text: &str) -> &mut Self {
        self.bytes(&format!("{GUEST_DIR}/run"), text.as_bytes(), 0o755)
    }

    /// Packs the stage into a newc archive at `out`.
    pub fn pack(&self, out: &Path) {
        let mut list = Vec::new();
        walk(self.stage.path(), Path::new("."), &mut list);
        let archive = fs::File::create(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        let mut child = Command::new("busybox")
            .args(["cpio", "-o", "-H", "newc"])
            .current_dir(self.stage.path())
            .stdin(Stdio::piped())
            .stdout(archive)
            .stderr(Stdio::piped())
            .spawn()
            .expect("run busybox cpio");
        std::io::Write::write_all(
            child.stdin.as_mut().expect("piped"),
            list.join("\n").as_bytes(),
        )
        .expect("write the file list to cpio");
        drop(child.stdin.take());
        let done = child.wait_with_output().expect("wait for busybox cpio");
        assert!(
            done.status.success(),
            "busybox cpio failed: {}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
}

/// Every path under `dir`, parents before children, relative (`./bin`).
fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry"))
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = rel.join(e.file_name());
        out.push(p.to_string_lossy().into_owned());
        if e.file_type().expect("a file type").is_dir() {
            walk(root, &p, out);
        }
    }
}

/// `program` as a path: itself when it has a `/`, else looked up on PATH
/// and in the sbin directories.
fn which(program: &str) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("{program} is not installed on the host"))
}
