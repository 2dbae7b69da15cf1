//! The plugin's kubeconfig: the ServiceAccount token of the plugin (from
//! the TokenRequest API, bound to no object, `validity` long), the API
//! server and its CA, mode 0600. install-cni writes it once; the running
//! agent rewrites it at a quarter of the token's life, so the plugin
//! always finds a token with three quarters of its life left.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::Client;

use super::files::write_atomic;
use super::InstallError;

/// The shortest validity the API grants.
pub const MIN_VALIDITY: Duration = Duration::from_secs(600);

/// Whose token, and for how long.
#[derive(Debug, Clone)]
pub struct TokenSource {
    /// The plugin ServiceAccount's namespace.
    pub namespace: String,
    /// The plugin ServiceAccount.
    pub service_account: String,
    /// How long a token lives (at least [`MIN_VALIDITY`]).
    pub validity: Duration,
}

/// The plugin's kubeconfig file and what goes into it.
#[derive(Debug, Clone)]
pub struct PluginKubeconfig {
    /// Where it is written (the CNI conf dir as this process sees it).
    pub path: PathBuf,
    /// The API server URL the plugin uses.
    pub server: String,
    /// The CA bundle (PEM) of that server.
    pub ca_pem: Option<String>,
    /// Whose token.
    pub source: TokenSource,
}

impl PluginKubeconfig {
    /// The server and CA of `config` (the agent's own view of the API).
    pub fn new(config: &kube::Config, path: PathBuf, source: TokenSource) -> Self {
        let ca_pem = config
            .root_cert
            .as_ref()
            .map(|certs| certs.iter().map(|der| der_to_pem(der)).collect::<String>());
        Self {
            path,
            server: config.cluster_url.to_string().trim_end_matches('/').into(),
            ca_pem,
            source,
        }
    }

    /// Requests a fresh token and writes the file; returns how long the token lives.
    pub async fn refresh(&self, client: &Client) -> Result<Duration, InstallError> {
        let (token, lifetime) = request_token(client, &self.source).await?;
        let text = render(&self.server, self.ca_pem.as_deref(), &token);
        write_atomic(&self.path, text.as_bytes(), 0o600)?;
        Ok(lifetime)
    }

    /// Keeps the file fresh forever: a new token at a quarter of each
    /// token's life; after a failure again in 5 s, then up to 60 s.
    pub async fn keep_fresh(self, client: Client) {
        let mut retry = Duration::from_secs(5);
        loop {
            let wait = match self.refresh(&client).await {
                Ok(lifetime) => {
                    tracing::info!(path = %self.path.display(), valid_for = ?lifetime, "plugin kubeconfig refreshed");
                    retry = Duration::from_secs(5);
                    lifetime / 4
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %crate::error_chain(&e), "cannot refresh the plugin's token");
                    let wait = retry;
                    retry = (retry * 2).min(Duration::from_secs(60));
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A token of `source` from the TokenRequest API, and its lifetime.
pub async fn request_token(
    client: &Client,
    source: &TokenSource,
) -> Result<(String, Duration), InstallError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &source.namespace);
    let validity = source.validity.max(MIN_VALIDITY);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(validity.as_secs() as i64),
            bound_object_ref: None,
        }),
        ..Default::default()
    };
    let answer = api
        .create_token_request(&source.service_account, &PostParams::default(), &request)
        .await
        .map_err(|source_err| InstallError::Kube {
            context: format!(
                "request a token for serviceaccount {}/{}",
                source.namespace, source.service_account
            ),
            source: source_err,
        })?;
    let token = answer
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| InstallError::NoToken {
            service_account: format!("{}/{}", source.namespace, source.service_account),
        })?;
    let granted = answer
        .spec
        .and_then(|s| s.expiration_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .map_or(validity, Duration::from_secs);
    Ok((token, granted))
}

/// The kubeconfig text for `token`.
pub fn render(server: &str, ca_pem: Option<&str>, token: &str) -> String {
    let ca = match ca_pem {
        Some(pem) => format!(
            "    certificate-authority-data: {}\n",
            base64::engine::general_purpose::STANDARD.encode(pem)
        ),
        None => String::new(),
    };
    format!(
        "# Written by tabby-node install-cni; refreshed by tabby-node. Do not edit.\n\
         apiVersion: v1\nkind: Config\nclusters:\n- name: tabby\n  cluster:\n    server: {server}\n{ca}\
         users:\n- name: tabby-plugin\n  user:\n    token: \"{token}\"\n\
         contexts:\n- name: tabby\n  context:\n    cluster: tabby\n    user: tabby-plugin\n\
         current-context: tabby\n"
    )
}

fn der_to_pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_parses_and_carries_server_ca_and_token() {
        let text = render("https://10.0.0.1:6443", Some("PEM"), "abc.def");
        let parsed = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("UEVN"));
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_some());
        assert!(text.contains("token: \"abc.def\""), "{text}");
    }
}
