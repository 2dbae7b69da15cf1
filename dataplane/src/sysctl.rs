//! Kernel parameters under `/proc/sys` (`sysctl -w`).
//!
//! The `net/` subtree belongs to the network namespace of the calling
//! *thread*: to change a pod's sysctls, call these inside
//! [`NetNs::run`](crate::NetNs::run).

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `value` to `/proc/sys/<key>` (`sysctl -w key=value`), e.g.
/// `set("net/ipv4/conf/tabby1234/proxy_arp", "1")`.
///
/// The key uses slashes, not dots, because interface names may contain dots.
pub fn set(key: &str, value: &str) -> Result<()> {
    let path = path_of(key)?;
    std::fs::write(&path, value).map_err(|source| Error::Sysctl {
        op: "write",
        key: key.to_string(),
        source,
    })
}

/// Reads `/proc/sys/<key>` (`sysctl key`) without its trailing newline.
pub fn get(key: &str) -> Result<String> {
    let path = path_of(key)?;
    let value = std::fs::read_to_string(&path).map_err(|source| Error::Sysctl {
        op: "read",
        key: key.to_string(),
        source,
    })?;
    Ok(value.trim_end_matches('\n').to_string())
}

/// `/proc/sys/<key>`, refusing keys that would escape `/proc/sys`.
fn path_of(key: &str) -> Result<PathBuf> {
    let relative = Path::new(key);
    let plain = relative
        .components()
        .all(|component| matches!(component, Component::Normal(_)));
    if key.is_empty() || !plain {
        return Err(Error::InvalidSysctlKey {
            key: key.to_string(),
        });
    }
    Ok(Path::new("/proc/sys").join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_under_proc_sys() {
        let path = path_of("net/ipv4/conf/eth0.100/forwarding").unwrap();
        assert_eq!(
            path,
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
    }

    #[test]
    fn keys_that_escape_proc_sys_are_rejected() {
        for key in ["", "/etc/passwd", "net/../../etc/passwd", "./net"] {
            assert!(
                matches!(path_of(key), Err(Error::InvalidSysctlKey { .. })),
                "{key:?} accepted"
            );
        }
    }
}
