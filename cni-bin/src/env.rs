//! The CNI_* environment, validated once into an [`Invocation`].

use std::path::PathBuf;

use crate::error::{CniError, Code, Result};

/// CNI_COMMAND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container (idempotent).
    Del,
    /// Verify an attachment.
    Check,
    /// Report supported versions.
    Version,
    /// Release everything not in the valid attachments (CNI 1.1).
    Gc,
    /// Report whether ADD can be served (CNI 1.1).
    Status,
}

impl Command {
    /// Parses CNI_COMMAND.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            other => {
                return Err(CniError::new(
                    Code::InvalidEnv,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"
                    ),
                ))
            }
        })
    }

    /// The spelling of CNI_COMMAND.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Gc => "GC",
            Self::Status => "STATUS",
        }
    }
}

/// Everything the runtime passed in the environment, validated.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The operation.
    pub command: Command,
    /// CNI_CONTAINERID (empty for GC, STATUS, VERSION).
    pub container_id: String,
    /// CNI_NETNS; `None` when the runtime passed none (allowed for DEL).
    pub netns: Option<PathBuf>,
    /// CNI_IFNAME (empty for GC, STATUS, VERSION).
    pub ifname: String,
    /// CNI_ARGS as key/value pairs.
    pub args: Vec<(String, String)>,
    /// CNI_PATH split on ':'.
    pub path: Vec<PathBuf>,
}

impl Invocation {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get`, which makes it testable without touching the environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let command = Command::parse(&get("CNI_COMMAND").unwrap_or_default())?;
        let need = |key: &str| -> Result<String> {
            match get(key) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(CniError::new(
                    Code::InvalidEnv,
                    format!("{key} is required for {}", command.as_str()),
                )),
            }
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = if per_container {
            need("CNI_CONTAINERID")?
        } else {
            String::new()
        };
        validate_container_id(&container_id)?;
        let ifname = if per_container {
            need("CNI_IFNAME")?
        } else {
            String::new()
        };
        if per_container {
            validate_ifname(&ifname)?;
        }
        let netns = match command {
            Command::Add | Command::Check => Some(PathBuf::from(need("CNI_NETNS")?)),
            _ => get("CNI_NETNS")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        };
        let path = get("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
        let args = parse_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }

    /// One CNI_ARGS value.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `<namespace>.<pod>` from the Kubernetes CNI_ARGS, else the container ID.
    pub fn pod_identity(&self) -> String {
        match (self.arg("K8S_POD_NAMESPACE"), self.arg("K8S_POD_NAME")) {
            (Some(ns), Some(pod)) if !ns.is_empty() && !pod.is_empty() => format!("{ns}.{pod}"),
            _ => self.container_id.clone(),
        }
    }
}

fn parse_args(s: &str) -> Result<Vec<(String, String)>> {
    s.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_ARGS entry {kv:?} is not KEY=VALUE"),
            )),
        })
        .collect()
}

/// The spec: the container ID must be non-empty and made of `[A-Za-z0-9_.-]` after an alphanumeric.
fn validate_container_id(id: &str) -> Result<()> {
    let ok = id.is_empty()
        || (id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            Code::InvalidEnv,
            format!("CNI_CONTAINERID {id:?} has characters outside [A-Za-z0-9_.-]"),
        ))
    }
}

/// Linux interface names: 1 to 15 bytes, no '/', ':' or whitespace, not "." or "..".
pub fn validate_ifname(name: &str) -> Result<()> {
    let problem = if name.len() > 15 {
        Some("is longer than 15 characters")
    } else if name.is_empty() || name == "." || name == ".." {
        Some("is not a valid interface name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match problem {
        Some(p) => Err(CniError::new(
            Code::InvalidEnv,
            format!("CNI_IFNAME {name:?} {p}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn inv(vars: &[(&str, &str)]) -> Result<Invocation> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Invocation::from_lookup(|k| map.get(k).cloned())
    }

    const ADD: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];

    #[test]
    fn add_reads_every_variable() {
        let mut v = ADD.to_vec();
        v.push((
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ));
        let i = inv(&v).unwrap();
        assert_eq!(i.command, Command::Add);
        assert_eq!(i.path.len(), 2);
        assert_eq!(i.pod_identity(), "default.web-0");
    }

    #[test]
    fn without_kubernetes_args_the_identity_is_the_container_id() {
        assert_eq!(inv(&ADD).unwrap().pod_identity(), "abc123");
    }

    #[test]
    fn an_interface_name_over_15_characters_is_an_env_error() {
        let mut v = ADD.to_vec();
        v[3] = ("CNI_IFNAME", "averyveryverylongname");
        let e = inv(&v).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnv);
        assert!(e.msg.contains("15"), "{}", e.msg);
    }

    #[test]
    fn add_without_netns_is_an_env_error_but_del_is_not() {
        let v: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        assert_eq!(inv(&v).unwrap_err().code, Code::InvalidEnv);
        let mut d = v.clone();
        d[0] = ("CNI_COMMAND", "DEL");
        assert!(inv(&d).unwrap().netns.is_none());
    }

    #[test]
    fn unknown_commands_and_bad_args_are_rejected() {
        assert_eq!(
            inv(&[("CNI_COMMAND", "FROB")]).unwrap_err().code,
            Code::InvalidEnv
        );
        let mut v = ADD.to_vec();
        v.push(("CNI_ARGS", "novalue"));
        assert_eq!(inv(&v).unwrap_err().code, Code::InvalidEnv);
        let mut v = ADD.to_vec();
        v[1] = ("CNI_CONTAINERID", "bad/id");
        assert_eq!(inv(&v).unwrap_err().code, Code::InvalidEnv);
    }

    #[test]
    fn version_needs_nothing_else() {
        assert_eq!(
            inv(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
    }
}
