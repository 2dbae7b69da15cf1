//! The `main` of both plugins: read the environment and stdin, run, print
//! the result or the error object, and return the exit status. Logs go to
//! the configured file only.

use std::io::{Read, Write};

use tracing::{error, info_span};

use crate::env::{Command, Invocation};
use crate::error::{CniError, Code, Result};
use crate::types::NetConf;
use crate::version::{version_info, CniVersion};

/// Which plugin is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    /// The interface plugin.
    Tabby,
    /// The IPAM plugin.
    TabbyIpam,
}

/// Runs the plugin and returns the process exit code.
pub fn main(plugin: Plugin) -> i32 {
    let mut version = CniVersion::LATEST;
    let outcome = run(plugin, &mut version);
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(out) => {
            if !out.is_empty() {
                let _ = writeln!(stdout, "{out}");
            }
            0
        }
        Err(e) => {
            error!(code = e.code as u32, msg = %e.msg, details = %e.details, "failed");
            let _ = writeln!(stdout, "{}", e.to_json(version));
            1
        }
    }
}

fn run(plugin: Plugin, version: &mut CniVersion) -> Result<String> {
    let inv = Invocation::from_env()?;
    if inv.command == Command::Version {
        return Ok(version_info());
    }
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
        CniError::with_source(Code::IoFailure, "read network configuration from stdin", &e)
    })?;
    let (conf, v) = NetConf::parse(&stdin)?;
    *version = v;
    crate::logging::init(conf.log_file.as_deref(), conf.log_level.as_deref());
    let span = info_span!("cni", plugin = ?plugin, cmd = inv.command.as_str(), container = %inv.container_id);
    let _enter = span.enter();
    match plugin {
        Plugin::Tabby => crate::plugin::run(&inv, &conf, v, &stdin),
        Plugin::TabbyIpam => crate::tabby_ipam::run(&inv, &conf, v),
    }
}
