//! The `main` of both plugins: read the environment and stdin, run, print
//! the result or the error object, and return the exit status. Logs go to
//! the configured file only.

use std::io::{Read, Write};

use tracing::{error, info_span};

use crate::env::{Command, Invocation};
use crate::error::{CniError, Code, Result};
use crate::types::NetConf;
use crate::version::{version_info, CniVersion};

/// The largest network configuration read from stdin. Real ones are a few
/// KiB; a runtime passing more is broken or hostile, and reading it all
/// would cost memory in every plugin process.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

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
    let stdin = read_config(std::io::stdin().lock())?;
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

/// Reads the configuration, refusing more than [`MAX_CONFIG_BYTES`].
fn read_config(input: impl Read) -> Result<Vec<u8>> {
    let mut stdin = Vec::new();
    input
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| {
            CniError::with_source(Code::IoFailure, "read network configuration from stdin", &e)
        })?;
    if stdin.len() as u64 > MAX_CONFIG_BYTES {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "the network configuration on stdin is larger than {} MiB",
                MAX_CONFIG_BYTES >> 20
            ),
        ));
    }
    Ok(stdin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_over_the_limit_is_refused_after_reading_just_past_it() {
        let big = std::io::repeat(b' ').take(100 << 20);
        let e = read_config(big).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.contains("4 MiB"), "{}", e.msg);
        let exact = vec![b' '; MAX_CONFIG_BYTES as usize];
        assert_eq!(read_config(&exact[..]).unwrap().len(), exact.len());
    }
}
