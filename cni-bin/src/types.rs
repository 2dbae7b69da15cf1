//! The network configuration on stdin and the result on stdout.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{CniError, Code, Result};
use crate::version::CniVersion;

/// The network configuration of one plugin invocation (a conflist entry
/// with `name` and `cniVersion` injected by the runtime).
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    /// The requested version (validated in [`NetConf::parse`]).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// The network name; part of every IPAM handle.
    pub name: String,
    /// The plugin type.
    #[serde(rename = "type")]
    pub kind: String,
    /// This node's name; falls back to the host name.
    #[serde(default)]
    pub nodename: Option<String>,
    /// Pod interface MTU; else the agent's MTU file, else the uplink's.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The file `tabby-node` writes the pods' MTU to (uplink minus the
    /// encapsulation's overhead); [`DEFAULT_MTU_FILE`] when absent.
    #[serde(default, rename = "mtuFile")]
    pub mtu_file: Option<PathBuf>,
    /// Where the plugin logs (never stdout).
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// `error`, `warn`, `info` (default), `debug`.
    #[serde(default)]
    pub log_level: Option<String>,
    /// The IPAM section, passed as is to a delegated IPAM plugin.
    #[serde(default)]
    pub ipam: Option<Value>,
    /// Per-pod settings.
    #[serde(default)]
    pub container_settings: ContainerSettings,
    /// The previous plugin's (or the cached) result.
    #[serde(default, rename = "prevResult")]
    pub prev_result: Option<Value>,
    /// GC: the attachments that must be kept.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Where `tabby-node` writes the pods' MTU by default (its `mtu_file`).
pub const DEFAULT_MTU_FILE: &str = "/var/lib/tabby/mtu";

/// The MTU in an MTU file: `None` when the file is missing or holds no
/// valid MTU (68 to 65535).
pub fn mtu_from_file(path: &std::path::Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    let mtu = text.trim().parse::<u32>().ok()?;
    (68..=65535).contains(&mtu).then_some(mtu)
}

/// `container_settings`, as Calico names it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerSettings {
    /// Leave `net.ipv4.ip_forward` on in the pod.
    #[serde(default)]
    pub allow_ip_forwarding: bool,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    /// The container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name.
    #[serde(default)]
    pub ifname: String,
}

impl NetConf {
    /// Parses and validates stdin: JSON, required fields, a supported version.
    pub fn parse(bytes: &[u8]) -> Result<(Self, CniVersion)> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(CniError::new(
                Code::DecodeFailure,
                "no network configuration on stdin",
            ));
        }
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::with_source(
                Code::DecodeFailure,
                "network configuration on stdin is not valid JSON",
                &e,
            )
        })?;
        for field in ["cniVersion", "name", "type"] {
            if !raw.get(field).is_some_and(Value::is_string) {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!("network configuration has no string field {field:?}"),
                ));
            }
        }
        let conf: NetConf = serde_json::from_value(raw).map_err(|e| {
            CniError::with_source(Code::InvalidConfig, "invalid network configuration", &e)
        })?;
        let version = CniVersion::parse(&conf.cni_version)?;
        validate_network_name(&conf.name)?;
        if let Some(node) = conf.nodename.as_deref().filter(|n| !n.is_empty()) {
            validate_node_name(node)?;
        }
        if let Some(mtu) = conf.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!("mtu {mtu} is outside 68..65535"),
                ));
            }
        }
        Ok((conf, version))
    }

    /// The IPAM plugin type, if an `ipam` section names one.
    pub fn ipam_type(&self) -> Option<&str> {
        self.ipam.as_ref()?.get("type")?.as_str()
    }

    /// This node's name: `nodename`, else the host name.
    pub fn node_name(&self) -> String {
        self.nodename
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(host_name)
    }

    /// The IPAM handle of an attachment: network, container and interface,
    /// as the CNI spec keys attachments. `eth0` keeps the `<network>.<id>`
    /// form of earlier releases (and Calico's), so their allocations are
    /// still found; any other interface is `<network>.<id>:<ifname>`, which
    /// no `eth0` handle can be (container IDs have no ':').
    pub fn handle(&self, container_id: &str, ifname: &str) -> String {
        if ifname == crate::naming::DEFAULT_IFNAME || ifname.is_empty() {
            format!("{}.{}", self.name, container_id)
        } else {
            format!("{}.{}:{}", self.name, container_id, ifname)
        }
    }

    /// The addresses of the previous result; CHECK cannot run without them.
    pub fn required_prev_ips(&self) -> Result<Vec<std::net::IpAddr>> {
        let prev = self
            .prev_result()?
            .ok_or_else(|| CniError::new(Code::InvalidConfig, "CHECK needs prevResult"))?;
        if prev.ips.is_empty() {
            return Err(CniError::new(
                Code::InvalidConfig,
                "CHECK needs prevResult.ips: a result without addresses leaves nothing to check",
            ));
        }
        Ok(prev.ips.iter().map(|c| c.address.ip()).collect())
    }

    /// The addresses of the previous result, if the runtime passed a readable one.
    pub fn prev_ips(&self) -> Vec<std::net::IpAddr> {
        self.prev_result()
            .ok()
            .flatten()
            .map(|r| r.ips.iter().map(|c| c.address.ip()).collect())
            .unwrap_or_default()
    }

    /// The previous result, parsed.
    pub fn prev_result(&self) -> Result<Option<CniResult>> {
        self.prev_result
            .as_ref()
            .map(|v| {
                serde_json::from_value(v.clone()).map_err(|e| {
                    CniError::with_source(Code::DecodeFailure, "prevResult is not a CNI result", &e)
                })
            })
            .transpose()
    }
}

/// The spec's network name: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn validate_network_name(name: &str) -> Result<()> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "network name {name:?} must start with a letter or digit and have only letters, digits, '_', '.' and '-'"
            ),
        ))
    }
}

/// A Kubernetes node name: a DNS-1123 subdomain (lower-case letters,
/// digits, '-' and '.', labels starting and ending alphanumeric, at most 253).
pub fn validate_node_name(name: &str) -> Result<()> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        return Ok(());
    }
    let shown: String = name.chars().take(64).collect();
    let more = if name.chars().count() > 64 { "..." } else { "" };
    Err(CniError::new(
        Code::InvalidConfig,
        format!(
            "node name {shown:?}{more} ({} bytes) is not a Kubernetes node name: at most 253 lower-case letters, digits, '-' and '.', each label starting and ending with a letter or digit (set `nodename`)",
            name.len()
        ),
    ))
}

/// The host name, lower-cased as Kubernetes node names are.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.to_lowercase())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A CNI result, independent of version; [`CniResult::to_json`] writes a version's form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// Interfaces created (host side first, then the pod side).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes in the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteEntry>,
    /// DNS settings (Tabby sets none).
    #[serde(default)]
    pub dns: Dns,
}

/// An interface in a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Its MTU (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for an interface inside the container; absent on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length.
    pub address: IpNetwork,
    /// The gateway, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    /// Destination.
    pub dst: IpNetwork,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// DNS settings of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// resolv.conf options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl CniResult {
    /// The result in the wire form of `version` (0.x adds `ips[].version`).
    pub fn to_json(&self, version: CniVersion) -> String {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            map.insert("cniVersion".into(), Value::String(version.as_str().into()));
            if version.has_ip_version_field() {
                if let Some(Value::Array(ips)) = map.get_mut("ips") {
                    for (ip, cfg) in ips.iter_mut().zip(&self.ips) {
                        let fam = if cfg.address.is_ipv4() { "4" } else { "6" };
                        if let Value::Object(o) = ip {
                            o.insert("version".into(), Value::String(fam.into()));
                        }
                    }
                }
            }
            if version < CniVersion::V1_1_0 {
                if let Some(Value::Array(ifs)) = map.get_mut("interfaces") {
                    for i in ifs.iter_mut().filter_map(Value::as_object_mut) {
                        i.remove("mtu");
                    }
                }
            }
        }
        v.to_string()
    }

    /// Parses a result printed by another plugin (any version).
    pub fn from_plugin_output(bytes: &[u8], plugin: &str) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| {
            CniError::with_source(
                Code::DecodeFailure,
                format!("{plugin} printed something that is not a CNI result"),
                &e,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"tabby","nodename":"node-a","mtu":1450,
        "log_file":"/var/log/tabby/cni.log","ipam":{"type":"tabby-ipam","datastore":{"type":"file","path":"/tmp/x"},
        "pool":{"cidr":"10.244.0.0/16","blockSize":26}}}"#;

    #[test]
    fn the_contract_conflist_entry_parses() {
        let (c, v) = NetConf::parse(CONF.as_bytes()).unwrap();
        assert_eq!(v, CniVersion::V1_1_0);
        assert_eq!(c.node_name(), "node-a");
        assert_eq!(c.ipam_type(), Some("tabby-ipam"));
        assert_eq!(c.handle("c1", "eth0"), "k8s-pod-network.c1");
        assert_eq!(c.handle("c1", "net1"), "k8s-pod-network.c1:net1");
    }

    #[test]
    fn malformed_json_is_a_decode_error_and_missing_fields_a_config_error() {
        assert_eq!(
            NetConf::parse(b"{\"cniVersion\":").unwrap_err().code,
            Code::DecodeFailure
        );
        assert_eq!(NetConf::parse(b"").unwrap_err().code, Code::DecodeFailure);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","type":"tabby"}"#).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.contains("name"));
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"tabby"}"#).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"tabby","mtu":10}"#)
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
    }

    #[test]
    fn an_mtu_file_gives_its_mtu_and_a_missing_or_bad_one_none() {
        let dir = std::env::temp_dir().join(format!("tabby-mtu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mtu");
        assert_eq!(mtu_from_file(&file), None);
        std::fs::write(&file, "1450\n").unwrap();
        assert_eq!(mtu_from_file(&file), Some(1450));
        std::fs::write(&file, "12").unwrap();
        assert_eq!(mtu_from_file(&file), None, "below 68");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(mtu_from_file(&file), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn network_and_node_names_follow_their_patterns() {
        let conf = |name: &str, node: &str| {
            format!(
                r#"{{"cniVersion":"1.0.0","name":"{name}","type":"tabby","nodename":"{node}"}}"#
            )
        };
        assert!(NetConf::parse(conf("k8s-pod.net_1", "node-a.example").as_bytes()).is_ok());
        for (name, node) in [
            ("a/b", "n"),
            ("-a", "n"),
            ("", "n"),
            ("a b", "n"),
            ("n", "Node-A"),
            ("n", "node_a"),
            ("n", "a..b"),
            ("n", "-a"),
            ("n", &"a".repeat(254)),
        ] {
            let e = NetConf::parse(conf(name, node).as_bytes()).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig, "{name:?} {node:?}");
        }
    }

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mtu: Some(1450),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                address: "10.244.0.5/32".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            }],
            routes: vec![RouteEntry {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn old_versions_get_the_ip_version_field_and_new_ones_do_not() {
        let r = sample();
        let old: Value = serde_json::from_str(&r.to_json(CniVersion::V0_3_1)).unwrap();
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["cniVersion"], "0.3.1");
        assert!(old["interfaces"][0].get("mtu").is_none());
        let new: Value = serde_json::from_str(&r.to_json(CniVersion::V1_1_0)).unwrap();
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["interfaces"][0]["mtu"], 1450);
    }

    #[test]
    fn a_result_of_any_version_parses_back() {
        let r = sample();
        for v in crate::version::SUPPORTED {
            let back = CniResult::from_plugin_output(r.to_json(v).as_bytes(), "x").unwrap();
            assert_eq!(back.ips, r.ips);
            assert_eq!(back.routes, r.routes);
        }
    }
}
