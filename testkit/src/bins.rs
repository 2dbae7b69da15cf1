//! Where the binaries under test are: the workspace's release binaries and
//! the upstream components that `scripts/upstream.sh` builds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the workspace")
        .to_path_buf()
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// The binaries every root test execs.
const RELEASE_BINS: [&str; 5] = ["tabby", "tabby-ipam", "tabbyctl", "tabby-node", "tabby-lab"];

/// The directory of Tabby's release binaries: `TABBY_BIN_DIR`, else
/// `target/release`, built once per process (`cargo build --release`) when
/// one of them is missing.
pub fn release_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static BUILD: Mutex<()> = Mutex::new(());
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("TABBY_BIN_DIR") {
            return PathBuf::from(d);
        }
        let dir = target_dir().join("release");
        let missing = |d: &Path| RELEASE_BINS.iter().any(|b| !d.join(b).exists());
        let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        if missing(&dir) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "tabby-cni",
                    "-p",
                    "tabby-ctl",
                    "-p",
                    "tabby-node",
                    "-p",
                    "tabby-lab",
                ])
                .current_dir(workspace_root())
                .status()
                .expect("run cargo build --release");
            assert!(
                status.success() && !missing(&dir),
                "cargo build --release failed"
            );
        }
        dir
    })
    .clone()
}

/// The path of one release binary.
pub fn release_bin(name: &str) -> PathBuf {
    release_dir().join(name)
}

/// The directory of the upstream Go binaries: `TABBY_UPSTREAM_BIN`, else
/// `/var/cache/tabby/bin` (the symlink farm `scripts/upstream.sh` keeps).
pub fn upstream_dir() -> PathBuf {
    std::env::var_os("TABBY_UPSTREAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/tabby/bin".into())
}

/// The path of an upstream binary; fails the test, naming the command that
/// builds it, when it is missing.
pub fn upstream_bin(name: &str) -> PathBuf {
    let p = upstream_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/upstream.sh` first",
        p.display()
    );
    p
}

/// The Rust target of the static binaries (the lab's images, the qemu guests).
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// The static binaries the guests and images run, and their packages.
const MUSL_BINS: [(&str, &str); 6] = [
    ("tabby", "tabby-cni"),
    ("tabby-ipam", "tabby-cni"),
    ("tabby-node", "tabby-node"),
    ("tabbyctl", "tabby-ctl"),
    ("tabby-echo", "tabby-lab-pods"),
    ("tabby-pause", "tabby-lab-pods"),
];

/// The directory of the static (musl) release binaries: `TABBY_MUSL_BIN_DIR`
/// if set, else `target/x86_64-unknown-linux-musl/release`, built once per
/// process (`cargo build --release --target x86_64-unknown-linux-musl`)
/// when one of them is missing; `scripts/test.sh` builds them first.
pub fn musl_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("TABBY_MUSL_BIN_DIR") {
            return PathBuf::from(d);
        }
        let dir = target_dir().join(MUSL_TARGET).join("release");
        let missing = |d: &Path| MUSL_BINS.iter().any(|(b, _)| !d.join(b).is_file());
        if !missing(&dir) {
            return dir;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--release", "--target", MUSL_TARGET])
            .current_dir(workspace_root());
        let mut packages: Vec<&str> = MUSL_BINS.iter().map(|(_, p)| *p).collect();
        packages.dedup();
        for p in packages {
            cmd.args(["-p", p]);
        }
        // ring (rustls) has C and assembly: the system's gcc builds it for
        // musl, no musl-gcc needed.
        if std::env::var_os("CC_x86_64_unknown_linux_musl").is_none() {
            cmd.env("CC_x86_64_unknown_linux_musl", "gcc");
        }
        let status = cmd.status().expect("run cargo build --target musl");
        assert!(
            status.success() && !missing(&dir),
            "cargo build --release --target {MUSL_TARGET} failed (needs `rustup target add {MUSL_TARGET}`; or set TABBY_MUSL_BIN_DIR)"
        );
        dir
    })
    .clone()
}

/// The path of one static binary; fails the test when it is missing.
pub fn musl_bin(name: &str) -> PathBuf {
    let p = musl_dir().join(name);
    assert!(p.is_file(), "{} is missing", p.display());
    p
}
