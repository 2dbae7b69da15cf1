//! `tabby-node install-cni`: puts the CNI plugin on the host, as the
//! DaemonSet's init container (Calico's install-cni):
//!
//! ```text
//! <bin dir>/tabby, tabby-ipam      copied atomically (temp + rename), 0755
//! <conf dir>/10-tabby.conflist     the template with __NODE_NAME__ and __KUBECONFIG_FILEPATH__ filled in, 0644
//! <conf dir>/tabby-kubeconfig      the plugin ServiceAccount's token (TokenRequest), 0600
//! ```
//!
//! Idempotent: a file that already holds the right bytes is left alone. A
//! `10-tabby.conflist` that Tabby did not write (its first plugin is not
//! `tabby`) is refused unless `force`. Uninstall removes these files and
//! nothing else. The running agent refreshes the kubeconfig ([`token`]).

pub mod cli;
pub mod files;
pub mod token;

use std::path::{Path, PathBuf};

use files::{remove, write_atomic, FileError, Outcome};
use serde_json::Value;

/// The plugin binaries, in install order; `tabby` must exist, `tabby-ipam` may.
pub const BINARIES: [&str; 2] = ["tabby-ipam", "tabby"];
/// The conflist's file name (sorts before most others, like Calico's).
pub const CONFLIST: &str = "10-tabby.conflist";
/// The plugin kubeconfig's file name.
pub const KUBECONFIG: &str = "tabby-kubeconfig";
/// The conflist written when no template is given.
pub const DEFAULT_TEMPLATE: &str = include_str!("default.conflist");

/// Why install-cni failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file could not be read, written or removed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The conflist template is not a Tabby conflist.
    #[error("invalid conflist template: {reason}")]
    Template {
        /// What is wrong.
        reason: String,
    },
    /// The plugin binary is not where it should be.
    #[error("no {} to install (set --source-dir)", path.display())]
    MissingBinary {
        /// The expected source.
        path: PathBuf,
    },
    /// The conflist in place belongs to someone else.
    #[error("{} was not written by Tabby (its first plugin is {found}); rerun with --force to replace it", path.display())]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The type of its first plugin.
        found: String,
    },
    /// An API call failed.
    #[error("{context}")]
    Kube {
        /// What was asked.
        context: String,
        /// Why it failed.
        #[source]
        source: kube::Error,
    },
    /// The kubeconfig of the agent itself is unusable.
    #[error("load the agent's kubeconfig")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The TokenRequest answer carried no token.
    #[error("the TokenRequest for {service_account} returned no token")]
    NoToken {
        /// `namespace/name`.
        service_account: String,
    },
}

/// Where to install.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The host's CNI bin dir as this process sees it (`/host/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The host's CNI conf dir as this process sees it (`/host/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The same conf dir as the host (the plugin) sees it, for the
    /// conflist's kubeconfig path (`/etc/cni/net.d`).
    pub host_conf_dir: PathBuf,
}

impl Layout {
    /// The conflist's path.
    pub fn conflist(&self) -> PathBuf {
        self.conf_dir.join(CONFLIST)
    }

    /// The kubeconfig's path here.
    pub fn kubeconfig(&self) -> PathBuf {
        self.conf_dir.join(KUBECONFIG)
    }
}

/// One file and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The file.
    pub path: PathBuf,
    /// Written or unchanged.
    pub outcome: Outcome,
}

/// Fills in the template and checks it is a Tabby conflist.
pub fn render_conflist(
    template: &str,
    node: &str,
    layout: &Layout,
) -> Result<String, InstallError> {
    let kubeconfig = layout.host_conf_dir.join(KUBECONFIG);
    let text = template
        .replace("__NODE_NAME__", node)
        .replace("__KUBECONFIG_FILEPATH__", &kubeconfig.display().to_string());
    let value: Value = serde_json::from_str(&text).map_err(|e| InstallError::Template {
        reason: format!("not JSON: {e}"),
    })?;
    match first_plugin_type(&value) {
        Some("tabby") => {}
        other => {
            return Err(InstallError::Template {
                reason: format!("the first plugin must be tabby, not {other:?}"),
            })
        }
    }
    let mut out = serde_json::to_string_pretty(&value).map_err(|e| InstallError::Template {
        reason: e.to_string(),
    })?;
    out.push('\n');
    Ok(out)
}

fn first_plugin_type(conflist: &Value) -> Option<&str> {
    conflist.get("plugins")?.get(0)?.get("type")?.as_str()
}

/// Copies the binaries from `source_dir` and writes the conflist; the
/// kubeconfig is written separately ([`token::PluginKubeconfig::refresh`]).
pub fn install_files(
    layout: &Layout,
    source_dir: &Path,
    conflist: &str,
    force: bool,
) -> Result<Vec<Change>, InstallError> {
    check_not_foreign(&layout.conflist(), force)?;
    let mut changes = Vec::new();
    for name in BINARIES {
        let source = source_dir.join(name);
        let bytes = match std::fs::read(&source) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name != "tabby" => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(InstallError::MissingBinary { path: source })
            }
            Err(source_err) => {
                return Err(FileError {
                    what: "read",
                    path: source,
                    source: source_err,
                }
                .into())
            }
        };
        let path = layout.bin_dir.join(name);
        let outcome = write_atomic(&path, &bytes, 0o755)?;
        changes.push(Change { path, outcome });
    }
    let path = layout.conflist();
    let outcome = write_atomic(&path, conflist.as_bytes(), 0o644)?;
    changes.push(Change { path, outcome });
    for other in conflists_before_ours(&layout.conf_dir) {
        tracing::warn!(file = %other.display(), "another CNI config sorts before {CONFLIST}: the runtime will use it instead");
    }
    Ok(changes)
}

/// Refuses to replace a conflist whose first plugin is not `tabby`.
pub fn check_not_foreign(path: &Path, force: bool) -> Result<(), InstallError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(FileError {
                what: "read",
                path: path.to_path_buf(),
                source,
            }
            .into())
        }
    };
    let found = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| first_plugin_type(&v).map(str::to_string));
    match found.as_deref() {
        Some("tabby") => Ok(()),
        _ if force => {
            tracing::warn!(file = %path.display(), "replacing a foreign conflist (--force)");
            Ok(())
        }
        other => Err(InstallError::Foreign {
            path: path.to_path_buf(),
            found: other.unwrap_or("unreadable").to_string(),
        }),
    }
}

fn conflists_before_ours(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let is_conf = [".conf", ".conflist", ".json"]
                .iter()
                .any(|s| name.ends_with(s));
            is_conf && !name.starts_with('.') && name.as_str() < CONFLIST
        })
        .collect();
    found.sort();
    found
}

/// Removes what install wrote (a foreign conflist stays); returns the
/// files removed.
pub fn uninstall(layout: &Layout) -> Result<Vec<PathBuf>, InstallError> {
    let mut removed = Vec::new();
    let mut paths: Vec<PathBuf> = BINARIES.iter().map(|b| layout.bin_dir.join(b)).collect();
    paths.push(layout.kubeconfig());
    match check_not_foreign(&layout.conflist(), false) {
        Ok(()) => paths.push(layout.conflist()),
        Err(e) => tracing::warn!(error = %crate::error_chain(&e), "leaving the conflist in place"),
    }
    for path in paths {
        if remove(&path)? {
            removed.push(path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            bin_dir: "/b".into(),
            conf_dir: "/host/etc/cni/net.d".into(),
            host_conf_dir: "/etc/cni/net.d".into(),
        }
    }

    #[test]
    fn the_default_template_names_the_node_and_the_host_kubeconfig() {
        let text = render_conflist(DEFAULT_TEMPLATE, "node-7", &layout()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let plugin = &v["plugins"][0];
        assert_eq!(plugin["nodename"], "node-7");
        assert_eq!(
            plugin["ipam"]["datastore"],
            serde_json::json!({"type": "kubernetes", "kubeconfig": "/etc/cni/net.d/tabby-kubeconfig"})
        );
    }

    #[test]
    fn a_template_that_is_not_tabby_is_refused() {
        for bad in [
            "{",
            r#"{"plugins":[{"type":"bridge"}]}"#,
            r#"{"plugins":[]}"#,
        ] {
            assert!(render_conflist(bad, "n", &layout()).is_err(), "{bad}");
        }
    }
}
