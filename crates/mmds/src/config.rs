//! `PUT /mmds/config`: Firecracker's JSON body and its validation.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The address guests use when the config names none (EC2's and Firecracker's).
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// How guests authenticate: V1 answers any `GET`, V2 wants a session token on every `GET`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Token-less reads (Firecracker's default, deprecated there).
    #[default]
    V1,
    /// IMDSv2-style sessions: `PUT /latest/api/token` first, then `X-metadata-token`.
    V2,
}

impl std::fmt::Display for MmdsVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MmdsVersion::V1 => "V1",
            MmdsVersion::V2 => "V2",
        })
    }
}

/// The body of `PUT /mmds/config`, field for field as in Firecracker's swagger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// Session model offered to the guest.
    #[serde(default)]
    pub version: MmdsVersion,
    /// Interface ids whose traffic to `ipv4_address` is answered by MMDS instead of the tap.
    pub network_interfaces: Vec<String>,
    /// The service address; `None` means [`DEFAULT_IPV4`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    /// EC2 compatibility: always answer in IMDS text, whatever `Accept` says.
    #[serde(default)]
    pub imds_compat: bool,
}

/// Why a config was refused; the `Display` text is meant for an API `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// MMDS must be reachable through at least one interface.
    #[error("The list of network interface IDs that allow forwarding MMDS requests is empty.")]
    EmptyNetworkInterfaces,
    /// Firecracker only accepts RFC 3927 link-local addresses (169.254.1.0 – 169.254.254.255).
    #[error("The MMDS IPv4 address {0} is not link local.")]
    NotLinkLocal(Ipv4Addr),
    /// An id in `network_interfaces` names no configured interface.
    #[error("The list of network interface IDs provided contains `{0}`, which does not correspond to any existing network interface.")]
    UnknownInterface(String),
}

impl MmdsConfig {
    /// The address the service answers on.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_IPV4)
    }

    /// Checks the config against itself and the interfaces the VM has (`is_known(id)`).
    pub fn validate(&self, is_known: impl Fn(&str) -> bool) -> Result<(), ConfigError> {
        if self.network_interfaces.is_empty() {
            return Err(ConfigError::EmptyNetworkInterfaces);
        }
        if let Some(unknown) = self.network_interfaces.iter().find(|id| !is_known(id)) {
            return Err(ConfigError::UnknownInterface(unknown.clone()));
        }
        let ipv4 = self.ipv4();
        if !is_link_local(ipv4) {
            return Err(ConfigError::NotLinkLocal(ipv4));
        }
        Ok(())
    }
}

/// RFC 3927 reserves the first and last /24 of 169.254.0.0/16, so they are refused as well.
fn is_link_local(ip: Ipv4Addr) -> bool {
    matches!(ip.octets(), [169, 254, 1..=254, _])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<MmdsConfig, serde_json::Error> {
        serde_json::from_str(body)
    }

    #[test]
    fn firecracker_bodies_parse() {
        let config = parse(
            r#"{"version":"V2","network_interfaces":["eth0"],"ipv4_address":"169.254.169.254"}"#,
        )
        .expect("full body");
        assert_eq!(config.version, MmdsVersion::V2);
        assert_eq!(config.ipv4(), DEFAULT_IPV4);
        assert!(!config.imds_compat);
        config.validate(|id| id == "eth0").expect("valid");

        let config = parse(r#"{"network_interfaces":["eth0"]}"#).expect("minimal body");
        assert_eq!(config.version, MmdsVersion::V1);
        assert_eq!(config.ipv4(), DEFAULT_IPV4);

        let config =
            parse(r#"{"network_interfaces":["eth0"],"imds_compat":true}"#).expect("imds_compat");
        assert!(config.imds_compat);
    }

    #[test]
    fn bad_bodies_are_refused() {
        assert!(parse(r#"{"network_interfaces":["eth0"],"bogus":1}"#).is_err());
        assert!(parse(r#"{"network_interfaces":["eth0"],"version":"V3"}"#).is_err());
        assert!(parse(r#"{"network_interfaces":["eth0"],"ipv4_address":"1.2.3"}"#).is_err());
        assert!(parse(r#"{"version":"V2"}"#).is_err());
    }

    #[test]
    fn validation() {
        let mut config = parse(r#"{"network_interfaces":[]}"#).expect("parse");
        assert_eq!(
            config.validate(|_| true),
            Err(ConfigError::EmptyNetworkInterfaces)
        );
        config.network_interfaces = vec!["eth1".into()];
        assert_eq!(
            config.validate(|id| id == "eth0"),
            Err(ConfigError::UnknownInterface("eth1".into()))
        );
        for bad in ["10.0.0.1", "169.254.0.1", "169.254.255.1", "0.0.0.0"] {
            config.ipv4_address = Some(bad.parse().expect("ip"));
            assert!(matches!(
                config.validate(|_| true),
                Err(ConfigError::NotLinkLocal(_))
            ));
        }
        config.ipv4_address = Some(Ipv4Addr::new(169, 254, 170, 2));
        config.validate(|_| true).expect("link-local");
        assert!(ConfigError::NotLinkLocal(Ipv4Addr::new(10, 0, 0, 1))
            .to_string()
            .contains("10.0.0.1"));
    }
}
