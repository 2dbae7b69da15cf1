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
