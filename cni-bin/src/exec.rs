//! Running another CNI plugin (a delegated IPAM such as host-local) the
//! way a runtime does: same CNI_* environment, config on stdin.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use serde::Deserialize;

use crate::env::{Command, Invocation};
use crate::error::{CniError, Code, Result};

/// Finds `plugin` in the CNI_PATH directories.
pub fn find_plugin(plugin: &str, path: &[PathBuf]) -> Result<PathBuf> {
    if plugin.contains('/') || plugin.is_empty() {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("plugin type {plugin:?} is not a plain name"),
        ));
    }
    path.iter()
        .map(|dir| dir.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            let dirs: Vec<String> = path.iter().map(|p| p.display().to_string()).collect();
            CniError::new(
                Code::InvalidConfig,
                format!(
                    "plugin {plugin:?} not found in CNI_PATH [{}]",
                    dirs.join(":")
                ),
            )
        })
}

/// Runs `plugin` for `command` with `stdin` and returns its stdout.
/// A failing plugin's error object is returned with its own code.
pub fn run_plugin(
    plugin: &str,
    command: Command,
    inv: &Invocation,
    stdin: &[u8],
) -> Result<Vec<u8>> {
    let bin = find_plugin(plugin, &inv.path)?;
    run_binary(&bin, plugin, command, inv, stdin)
}

fn run_binary(
    bin: &Path,
    plugin: &str,
    command: Command,
    inv: &Invocation,
    stdin: &[u8],
) -> Result<Vec<u8>> {
    let io_err = |what: &str, e: std::io::Error| {
        CniError::with_source(Code::IoFailure, format!("{what} {plugin}"), &e)
    };
    let mut child = Process::new(bin)
        .env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_NETNS", inv.netns.as_deref().unwrap_or(Path::new("")))
        .env("CNI_IFNAME", &inv.ifname)
        .env(
            "CNI_PATH",
            std::env::join_paths(&inv.path).unwrap_or_default(),
        )
        .env(
            "CNI_ARGS",
            inv.args
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(";"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io_err("start", e))?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin that rejects its environment exits before reading stdin:
        // the broken pipe is not the error, its exit status and output are.
        match input.write_all(stdin) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(io_err("write config to", e))
            }
            _ => {}
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| io_err("wait for", e))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    #[derive(Deserialize)]
    struct Wire {
        code: u32,
        msg: String,
        #[serde(default)]
        details: String,
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(match serde_json::from_slice::<Wire>(&out.stdout) {
        Ok(w) => CniError {
            code: code_from_u32(w.code),
            msg: format!("{plugin} {}: {}", command.as_str(), w.msg),
            details: if w.details.is_empty() {
                stderr
            } else {
                w.details
            },
        },
        Err(_) => CniError {
            code: Code::IoFailure,
            msg: format!("{plugin} {} failed with {}", command.as_str(), out.status),
            details: stderr,
        },
    })
}

fn code_from_u32(code: u32) -> Code {
    match code {
        1 => Code::IncompatibleVersion,
        2 => Code::UnsupportedField,
        3 => Code::ContainerUnknown,
        4 => Code::InvalidEnv,
        6 => Code::DecodeFailure,
        7 => Code::InvalidConfig,
        11 => Code::TryAgainLater,
        50 | 51 => Code::NotAvailable,
        100 => Code::PoolExhausted,
        _ => Code::IoFailure,
    }
}
