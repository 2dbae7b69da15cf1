//! The cluster's images, built here from static (musl) binaries and
//! imported into every node's containerd: nothing is pulled.
//!
//! | image | files | entrypoint |
//! |-------|-------|------------|
//! | [`TABBY_IMAGE`] | `/usr/local/bin/{tabby,tabby-ipam,tabby-node,tabbyctl}` | `tabby-node` |
//! | [`PAUSE_IMAGE`] | `/pause` (`tabby-pause`) | `/pause` |
//! | [`ECHO_IMAGE`] | `/usr/local/bin/tabby-echo` | `tabby-echo` (port 8080) |
//!
//! Images are cached by content in [`cache_dir`]: a key over the image's
//! definition and its files' bytes names the layout file, so a warm `up`
//! reuses it and a rebuilt binary makes a new one.

use std::fs::{self, File, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::host_tools;
pub use super::node::PAUSE_IMAGE;
use super::oci::{self, Image};
use crate::sh;

/// The image the DaemonSet runs: the plugin, its IPAM, the agent, the CLI.
/// It is the name `deploy/tabby.yaml` gives (`tabby:latest`), so the lab
/// applies that file unchanged.
pub const TABBY_IMAGE: &str = "docker.io/library/tabby:latest";
/// The echo server (answers like traefik/whoami), with its client `tabby-echo get`.
pub const ECHO_IMAGE: &str = "lab.tabby.dev/echo:dev";
/// The Rust target of the images' binaries.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Bumped when the layout of the images changes, so old cache entries go unused.
const FORMAT: &str = "tabby-lab-images-2";

/// Where built image layouts are kept: `TABBY_IMAGE_CACHE`, else
/// /var/cache/tabby/lab-images (beside the upstream binaries).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TABBY_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/tabby/lab-images"))
}

/// Which binaries an image needs, by image.
fn binaries(image: &str) -> &'static [&'static str] {
    match image {
        TABBY_IMAGE => &["tabby", "tabby-ipam", "tabby-node", "tabbyctl"],
        PAUSE_IMAGE => &["tabby-pause"],
        _ => &["tabby-echo"],
    }
}

/// The cargo packages that build `bins`.
fn packages(bins: &[&str]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = bins
        .iter()
        .map(|b| match *b {
            "tabby" | "tabby-ipam" => "tabby-cni",
            "tabby-node" => "tabby-node",
            "tabbyctl" => "tabby-ctl",
            _ => "tabby-lab-pods",
        })
        .collect();
    packages.sort();
    packages.dedup();
    packages
}

/// Where the static binaries come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory that already holds them (`TABBY_MUSL_BIN_DIR`).
    Dir(PathBuf),
    /// Built with `cargo build --release --target x86_64-unknown-linux-musl`
    /// in the workspace, into `target_dir`.
    Cargo {
        /// The workspace root.
        workspace: PathBuf,
        /// The cargo target dir (the one holding `release/tabby-lab`).
        target_dir: PathBuf,
    },
}

impl Source {
    /// `TABBY_MUSL_BIN_DIR` if set, else a cargo build into the target dir
    /// that holds `bin_dir` (`.../target/release`).
    pub fn detect(bin_dir: &Path) -> Source {
        if let Some(dir) = std::env::var_os("TABBY_MUSL_BIN_DIR") {
            return Source::Dir(dir.into());
        }
        let target_dir = match bin_dir.file_name().and_then(|n| n.to_str()) {
            Some("release" | "debug") => bin_dir.parent().map(Path::to_path_buf),
            _ => None,
        }
        .unwrap_or_else(tabby_testkit::bins::target_dir);
        Source::Cargo {
            workspace: tabby_testkit::bins::workspace_root(),
            target_dir,
        }
    }

    /// Makes sure the binaries of `images` are there (building them) and
    /// returns their directory.
    pub fn binaries_for(&self, images: &[&str]) -> anyhow::Result<PathBuf> {
        let bins: Vec<&str> = images
            .iter()
            .flat_map(|i| binaries(i).iter().copied())
            .collect();
        let dir = match self {
            Source::Dir(dir) => dir.clone(),
            Source::Cargo {
                workspace,
                target_dir,
            } => {
                let mut cmd =
                    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
                cmd.current_dir(workspace)
                    .args([
                        "build",
                        "--release",
                        "--quiet",
                        "--target",
                        MUSL_TARGET,
                        "--target-dir",
                    ])
                    .arg(target_dir);
                for package in packages(&bins) {
                    cmd.args(["-p", package]);
                }
                // ring (rustls, once the agent speaks to the apiserver) has C
                // and assembly: the system's gcc builds it for musl (no
                // musl-gcc needed).
                let cc = "CC_x86_64_unknown_linux_musl";
                if std::env::var_os(cc).is_none() {
                    cmd.env(cc, "gcc");
                }
                sh::run(cmd).with_context(|| {
                    format!(
                        "building the images' static binaries (needs `rustup target add {MUSL_TARGET}`; or set TABBY_MUSL_BIN_DIR)"
                    )
                })?;
                target_dir.join(MUSL_TARGET).join("release")
            }
        };
        for bin in &bins {
            anyhow::ensure!(
                dir.join(bin).is_file(),
                "{} is missing",
                dir.join(bin).display()
            );
        }
        Ok(dir)
    }
}

/// The definition of image `name` from the binaries in `bins`.
pub fn define(name: &str, bins: &Path) -> anyhow::Result<Image> {
    let read = |bin: &str| {
        fs::read(bins.join(bin)).with_context(|| format!("reading {}", bins.join(bin).display()))
    };
    let local = |bin: &str| -> anyhow::Result<oci::File> {
        Ok(oci::File {
            path: format!("usr/local/bin/{bin}"),
            mode: 0o755,
            data: read(bin)?,
        })
    };
    let path_env = "PATH=/usr/local/bin:/usr/bin:/bin".to_string();
    let image = match name {
        PAUSE_IMAGE => Image {
            name: name.to_string(),
            entrypoint: vec!["/pause".into()],
            env: vec![path_env],
            dirs: vec![],
            files: vec![oci::File {
                path: "pause".into(),
                mode: 0o755,
                data: read("tabby-pause")?,
            }],
            links: vec![],
        },
        TABBY_IMAGE => {
            let (mut files, links) = host_tools::tools()?;
            for bin in binaries(name) {
                files.push(local(bin)?);
            }
            Image {
                name: name.to_string(),
                entrypoint: vec!["/usr/local/bin/tabby-node".into()],
                env: vec![
                    "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ],
                dirs: vec![
                    "etc".into(),
                    "tmp".into(),
                    "run".into(),
                    "var/lib/tabby".into(),
                ],
                files,
                links,
            }
        }
        ECHO_IMAGE => Image {
            name: name.to_string(),
            entrypoint: vec!["/usr/local/bin/tabby-echo".into()],
            env: vec![path_env],
            dirs: vec!["etc".into(), "tmp".into()],
            files: vec![local("tabby-echo")?],
            links: vec![],
        },
        other => anyhow::bail!("no image {other} in the lab"),
    };
    Ok(image)
}

/// The cache key of an image: its definition and every byte of its files.
pub fn cache_key(image: &Image) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT);
    for part in [
        &image.name,
        &image.entrypoint.join("\0"),
        &image.env.join("\0"),
        &image.dirs.join("\0"),
    ] {
        h.update(part.len().to_le_bytes());
        h.update(part);
    }
    for (path, target) in &image.links {
        for part in [path, target] {
            h.update(part.len().to_le_bytes());
            h.update(part);
        }
    }
    for file in &image.files {
        h.update(file.path.len().to_le_bytes());
        h.update(&file.path);
        h.update(file.mode.to_le_bytes());
        h.update(file.data.len().to_le_bytes());
        h.update(&file.data);
    }
    hex::encode(&h.finalize()[..12])
}

/// A built image: its layout file and whether it came from the cache.
#[derive(Debug, Clone)]
pub struct Built {
    /// The image's name.
    pub name: String,
    /// The OCI layout tar.
    pub file: PathBuf,
    /// Whether it was in the cache already.
    pub cached: bool,
}

/// Builds image `name` from `bins`, or finds it in the cache dir `cache`.
pub fn build(name: &str, bins: &Path, cache: &Path) -> anyhow::Result<Built> {
    let image = define(name, bins)?;
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let short = name.rsplit('/').next().unwrap_or(name).replace(':', "-");
    let file = cache.join(format!("{short}-{}.tar", cache_key(&image)));
    let _lock = lock(cache)?;
    if file.is_file() {
        return Ok(Built {
            name: name.to_string(),
            file,
            cached: true,
        });
    }
    let tmp = file.with_extension(format!("tar.{}.tmp", std::process::id()));
    let out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    oci::write_layout(&image, BufWriter::new(out))
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &file).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(Built {
        name: name.to_string(),
        file,
        cached: false,
    })
}

fn lock(dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow::anyhow!("locking {}: {errno}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_image_is_built_from_the_binaries_it_names() {
        let dir = tempfile::tempdir().unwrap();
        for bin in [
            "tabby",
            "tabby-ipam",
            "tabby-node",
            "tabbyctl",
            "tabby-pause",
            "tabby-echo",
        ] {
            fs::write(dir.path().join(bin), bin).unwrap();
        }
        let tabby = define(TABBY_IMAGE, dir.path()).unwrap();
        let paths: Vec<&str> = tabby.files.iter().map(|f| f.path.as_str()).collect();
        // The agent's netfilter tools come from this host, with their libraries.
        for tool in [
            "usr/sbin/xtables-nft-multi",
            "usr/sbin/nft",
            "lib64/ld-linux-x86-64.so.2",
        ] {
            assert!(paths.contains(&tool), "{tool} not in {paths:?}");
        }
        assert!(paths.iter().any(|p| p.ends_with("/libxt_MASQUERADE.so")));
        let ours: Vec<&str> = paths
            .into_iter()
            .filter(|p| p.starts_with("usr/local/"))
            .collect();
        assert_eq!(
            ours,
            [
                "usr/local/bin/tabby",
                "usr/local/bin/tabby-ipam",
                "usr/local/bin/tabby-node",
                "usr/local/bin/tabbyctl"
            ]
        );
        assert_eq!(tabby.entrypoint, ["/usr/local/bin/tabby-node"]);
        let pause = define(PAUSE_IMAGE, dir.path()).unwrap();
        assert_eq!(
            (pause.files[0].path.as_str(), &pause.files[0].data[..]),
            ("pause", &b"tabby-pause"[..])
        );
        let echo = define(ECHO_IMAGE, dir.path()).unwrap();
        let before = cache_key(&echo);
        fs::write(dir.path().join("tabby-echo"), "rebuilt").unwrap();
        assert_ne!(cache_key(&define(ECHO_IMAGE, dir.path()).unwrap()), before);
        assert_eq!(
            packages(&["tabby", "tabby-ipam", "tabby-echo"]),
            ["tabby-cni", "tabby-lab-pods"]
        );
    }

    #[test]
    fn a_second_build_comes_from_the_cache() {
        let bins = tempfile::tempdir().unwrap();
        fs::write(bins.path().join("tabby-pause"), "pause").unwrap();
        let cache = tempfile::tempdir().unwrap();
        let first = build(PAUSE_IMAGE, bins.path(), cache.path()).unwrap();
        let second = build(PAUSE_IMAGE, bins.path(), cache.path()).unwrap();
        assert!(!first.cached && second.cached);
        assert_eq!(first.file, second.file);
        assert!(first.file.starts_with(cache.path()));
    }
}
