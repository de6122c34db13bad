//! Registry credentials: `kiln login` stores them in `<kiln root>/auth.json` (mode 0600, the
//! same `{"auths": {...}}` shape as Docker's), and pulls also read Docker's own
//! `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, so `docker login` works too.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::blob::TMP_PREFIX;
use crate::error::{Error, IoContext, Result};

/// A username and password (or token used as password) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets into logs.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct AuthEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

impl AuthEntry {
    fn credentials(&self) -> Option<Credentials> {
        if let Some(auth) = &self.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (user, pass) = text.split_once(':')?;
            return Some(Credentials {
                username: user.to_string(),
                password: pass.to_string(),
            });
        }
        Some(Credentials {
            username: self.username.clone()?,
            password: self.password.clone()?,
        })
    }
}

/// Reduces the spellings of a registry in config files (`https://index.docker.io/v1/`,
/// `docker.io`, `127.0.0.1:5000`) to one host\[:port\] key.
pub(crate) fn registry_key(registry: &str) -> String {
    let s = registry.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s).to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => host,
    }
}

fn kiln_auth_path(kiln_root: &Path) -> PathBuf {
    kiln_root.join("auth.json")
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join(".docker").join("config.json"))
}

fn read_auth_file(path: &Path) -> Result<Option<AuthFile>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Other(format!("{}: not a valid auth file: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn find_in(file: &AuthFile, registry: &str) -> Option<Credentials> {
    let key = registry_key(registry);
    file.auths
        .iter()
        .find(|(k, _)| registry_key(k) == key)
        .and_then(|(_, entry)| entry.credentials())
}

/// Credentials for `registry` from `kiln login`, else from Docker's config file.
///
/// Unreadable Docker config files are ignored with a warning (they belong to another tool);
/// a damaged kiln auth file is an error.
pub(crate) fn lookup(kiln_root: &Path, registry: &str) -> Result<Option<Credentials>> {
    if let Some(file) = read_auth_file(&kiln_auth_path(kiln_root))? {
        if let Some(creds) = find_in(&file, registry) {
            return Ok(Some(creds));
        }
    }
    if let Some(path) = docker_config_path() {
        match read_auth_file(&path) {
            Ok(Some(file)) => return Ok(find_in(&file, registry)),
            Ok(None) => {}
            Err(e) => tracing::warn!("ignoring Docker credentials: {e}"),
        }
    }
    Ok(None)
}

fn write_auth_file(path: &Path, file: &AuthFile) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Other(format!("{}: no parent directory", path.display())))?;
    fs::create_dir_all(dir).at(dir)?;
    let bytes = serde_json::to_vec_pretty(file)
        .map_err(|e| Error::Other(format!("serializing credentials: {e}")))?;
    let tmp = dir.join(format!("{TMP_PREFIX}auth-{}.json", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    fs::rename(&tmp, path).at(path)
}

/// Checks `credentials` against `registry` (the way `docker login` does: `GET /v2/`, following
/// a Bearer challenge to its token service) and stores them in `<kiln_root>/auth.json`.
///
/// `insecure` allows plain HTTP for this registry (always allowed for loopback).
pub fn login(
    kiln_root: &Path,
    registry: &str,
    credentials: &Credentials,
    insecure: bool,
) -> Result<()> {
    let key = registry_key(registry);
    if key.is_empty() {
        return Err(Error::InvalidReference {
            reference: registry.to_string(),
            reason: "empty registry name".into(),
        });
    }
    let wire_registry = if key == "docker.io" {
        "index.docker.io".to_string()
    } else {
        key.clone()
    };
    let http = insecure || crate::pull::is_loopback(&wire_registry);
    verify(&wire_registry, http, credentials)?;
    let path = kiln_auth_path(kiln_root);
    let mut file = read_auth_file(&path)?.unwrap_or_default();
    file.auths.retain(|k, _| registry_key(k) != key);
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", credentials.username, credentials.password));
    file.auths.insert(
        key,
        AuthEntry {
            auth: Some(token),
            ..AuthEntry::default()
        },
    );
    write_auth_file(&path, &file)
}

/// Forgets kiln's stored credentials for `registry`; `false` if there were none.
pub fn logout(kiln_root: &Path, registry: &str) -> Result<bool> {
    let key = registry_key(registry);
    let path = kiln_auth_path(kiln_root);
    let Some(mut file) = read_auth_file(&path)? else {
        return Ok(false);
    };
    let before = file.auths.len();
    file.auths.retain(|k, _| registry_key(k) != key);
    if file.auths.len() == before {
        return Ok(false);
    }
    write_auth_file(&path, &file)?;
    Ok(true)
}

fn verify(registry: &str, http: bool, credentials: &Credentials) -> Result<()> {
    crate::pull::install_crypto_provider();
    let scheme = if http { "http" } else { "https" };
    let unreachable = |e: reqwest::Error| Error::Unreachable {
        registry: registry.to_string(),
        reason: crate::pull::root_cause(&e),
    };
    let failed = |reason: &str| Error::AuthFailed {
        registry: registry.to_string(),
        reason: reason.to_string(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("starting the async runtime: {e}")))?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(unreachable)?;
        let url = format!("{scheme}://{registry}/v2/");
        let res = client
            .get(&url)
            .basic_auth(&credentials.username, Some(&credentials.password))
            .send()
            .await
            .map_err(unreachable)?;
        if res.status().is_success() {
            return Ok(());
        }
        if res.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Err(Error::Registry {
                registry: registry.to_string(),
                message: format!("GET {url}: HTTP {}", res.status()),
            });
        }
        let challenge = res
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let Some(params) = challenge
            .strip_prefix("Bearer ")
            .or_else(|| challenge.strip_prefix("bearer "))
        else {
            return Err(failed("wrong username or password"));
        };
        let (realm, service) = parse_bearer(params);
        let Some(realm) = realm else {
            return Err(failed("the registry's token challenge names no realm"));
        };
        let mut req = client
            .get(&realm)
            .basic_auth(&credentials.username, Some(&credentials.password));
        if let Some(service) = service {
            req = req.query(&[("service", service)]);
        }
        let res = req.send().await.map_err(unreachable)?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(failed(&format!(
                "token service {realm} refused the credentials (HTTP {})",
                res.status()
            )))
        }
    })
}

/// `realm` and `service` of a Bearer challenge's parameters.
fn parse_bearer(params: &str) -> (Option<String>, Option<String>) {
    let mut realm = None;
    let mut service = None;
    for part in params.split(',') {
        if let Some((k, v)) = part.trim().split_once('=') {
            let v = v.trim().trim_matches('"').to_string();
            match k.trim() {
                "realm" => realm = Some(v),
                "service" => service = Some(v),
                _ => {}
            }
        }
    }
    (realm, service)
}

/// Reads a password from the terminal without echoing it (for `kiln login`).
pub fn prompt_password(prompt: &str) -> Result<String> {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let tty = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .at("/dev/tty")?;
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data; an all-zero value is valid and is overwritten by
    // tcgetattr before use.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the duration of the call and `saved` is a valid termios to
    // fill in.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(Error::io("/dev/tty", std::io::Error::last_os_error()));
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: as above; `quiet` is a valid termios derived from the current one.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
        return Err(Error::io("/dev/tty", std::io::Error::last_os_error()));
    }
    let mut writer = &tty;
    let _ = writer.write_all(prompt.as_bytes());
    let _ = writer.flush();
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    // SAFETY: restores the settings read above on the same open descriptor.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    read.at("/dev/tty")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_keys() {
        assert_eq!(registry_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(registry_key("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(registry_key("http://Reg.example:443/"), "reg.example:443");
    }

    #[test]
    fn docker_config_entries() {
        let file: AuthFile = serde_json::from_str(
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNzOndvcmQ="}},"credsStore":"x"}"#,
        )
        .expect("parse");
        let creds = find_in(&file, "index.docker.io").expect("found");
        assert_eq!(creds.username, "user");
        assert_eq!(creds.password, "pass:word");
        assert!(find_in(&file, "127.0.0.1:5000").is_none());
    }

    #[test]
    fn bearer_params() {
        let (realm, service) =
            parse_bearer(r#"realm="https://auth.example/token",service="registry.example""#);
        assert_eq!(realm.as_deref(), Some("https://auth.example/token"));
        assert_eq!(service.as_deref(), Some("registry.example"));
    }
}
