//! Registry credentials: `kiln login` stores them in `<kiln root>/auth.json` (mode 0600, the
//! same `{"auths": {...}}` shape as Docker's), and pulls also read Docker's own
//! `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, so `docker login` works too.
//!
//! Docker's credential helpers are used as Docker uses them: `credHelpers[registry]`, else
//! `credsStore`, names a helper; `docker-credential-<helper> get` is run with the registry
//! (`https://index.docker.io/v1/` for Docker Hub, else `host[:port]`) on stdin and answers
//! `{"ServerURL", "Username", "Secret"}`. A username of `<token>` makes the secret an identity
//! token (an OAuth2 refresh token, exchanged at the registry's token service). A helper that
//! does not know the registry falls back to the file's `auths` entry, as in Docker; a helper
//! that is not installed is an error naming it (Docker fails too) rather than an anonymous
//! pull that would end in a confusing "authentication required". kiln's own `auth.json` is
//! consulted first and never names helpers.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

/// What a registry is accessed with.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Secret {
    /// A username and password: HTTP Basic, or the login at the registry's token service.
    Basic(Credentials),
    /// An identity token from a credential helper (user `<token>`): an OAuth2 refresh token,
    /// traded for an access token at the registry's token service.
    IdentityToken(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Basic(c) => f.debug_tuple("Basic").field(c).finish(),
            Secret::IdentityToken(_) => f.write_str("IdentityToken(..)"),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    /// Docker's default credential helper.
    #[serde(
        rename = "credsStore",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    creds_store: Option<String>,
    /// Docker's per-registry credential helpers.
    #[serde(
        rename = "credHelpers",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    cred_helpers: BTreeMap<String, String>,
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

/// Credentials for `registry` from `kiln login`, else from Docker's config file (its
/// credential helpers first, then its `auths`).
///
/// Unreadable Docker config files are ignored with a warning (they belong to another tool);
/// a damaged kiln auth file, and a credential helper that is missing or fails, are errors.
pub(crate) fn lookup(kiln_root: &Path, registry: &str) -> Result<Option<Secret>> {
    if let Some(file) = read_auth_file(&kiln_auth_path(kiln_root))? {
        if let Some(creds) = find_in(&file, registry) {
            return Ok(Some(Secret::Basic(creds)));
        }
    }
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    let file = match read_auth_file(&path) {
        Ok(Some(file)) => file,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!("ignoring Docker credentials: {e}");
            return Ok(None);
        }
    };
    if let Some(helper) = helper_for(&file, registry) {
        if let Some(secret) = helper_get(helper, &helper_server(registry), &path)? {
            return Ok(Some(secret));
        }
    }
    Ok(find_in(&file, registry).map(Secret::Basic))
}

/// The credential helper Docker would ask for `registry`: its `credHelpers` entry, else
/// `credsStore`.
fn helper_for<'a>(file: &'a AuthFile, registry: &str) -> Option<&'a str> {
    let key = registry_key(registry);
    file.cred_helpers
        .iter()
        .find(|(k, _)| registry_key(k) == key)
        .map(|(_, helper)| helper.as_str())
        .or(file.creds_store.as_deref())
        .map(str::trim)
        .filter(|helper| !helper.is_empty())
}

/// What Docker hands a helper as the server: Docker Hub's legacy index URL, else the host.
fn helper_server(registry: &str) -> String {
    match registry_key(registry).as_str() {
        "docker.io" => "https://index.docker.io/v1/".to_string(),
        key => key.to_string(),
    }
}

/// The message helpers print (with a failure status) for a server they hold nothing for.
const HELPER_NOT_FOUND: &str = "credentials not found in native keychain";
/// The username a helper answers with when the secret is an identity token.
const TOKEN_USERNAME: &str = "<token>";

/// Runs `docker-credential-<helper> get` for `server`; `None` when the helper holds nothing
/// for it.
fn helper_get(helper: &str, server: &str, config: &Path) -> Result<Option<Secret>> {
    let program = format!("docker-credential-{helper}");
    let failed = |reason: String| Error::CredentialHelper {
        program: program.clone(),
        reason,
    };
    // A name with a slash would run a file by path instead of a program from PATH.
    if helper.contains(['/', '\0']) || helper.chars().any(char::is_whitespace) {
        return Err(failed(format!(
            "{helper:?} (in {}) is not a helper name",
            config.display()
        )));
    }
    let mut child = match Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::CredentialHelperMissing {
                program,
                config: config.to_path_buf(),
            })
        }
        Err(e) => return Err(failed(format!("cannot run it: {e}"))),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its answer, not by the broken pipe.
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(format!("waiting for it: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if stdout.trim() == HELPER_NOT_FOUND {
            return Ok(None);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = format!("{} {}", stdout.trim(), stderr.trim());
        return Err(failed(format!(
            "`{program} get` for {server} exited with {}: {}",
            out.status,
            said.trim()
        )));
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let answer: Answer = serde_json::from_slice(&out.stdout).map_err(|e| {
        failed(format!(
            "`{program} get` for {server} did not answer {{\"Username\", \"Secret\"}} JSON: {e}"
        ))
    })?;
    Ok(match (answer.username.as_str(), answer.secret) {
        (_, secret) if secret.is_empty() => None,
        (TOKEN_USERNAME, secret) => Some(Secret::IdentityToken(secret)),
        (username, secret) => Some(Secret::Basic(Credentials {
            username: username.to_string(),
            password: secret,
        })),
    })
}

/// Trades an identity token for an access token to pull `repository` from `registry`: the
/// OAuth2 refresh-token grant at the token service the registry's Bearer challenge names,
/// as Docker does.
pub(crate) async fn access_token(
    registry: &str,
    http: bool,
    repository: &str,
    identity_token: &str,
) -> Result<String> {
    let scheme = if http { "http" } else { "https" };
    let unreachable = |e: reqwest::Error| Error::Unreachable {
        registry: registry.to_string(),
        reason: crate::pull::root_cause(&e),
    };
    let failed = |reason: String| Error::AuthFailed {
        registry: registry.to_string(),
        reason,
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(unreachable)?;
    let url = format!("{scheme}://{registry}/v2/");
    let res = client.get(&url).send().await.map_err(unreachable)?;
    let challenge = res
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let params = challenge
        .strip_prefix("Bearer ")
        .or_else(|| challenge.strip_prefix("bearer "));
    let (Some(realm), service) = params.map(parse_bearer).unwrap_or_default() else {
        return Err(failed(
            "the credential helper gave an identity token, but the registry has no token \
             service to exchange it at"
                .to_string(),
        ));
    };
    let scope = format!("repository:{repository}:pull");
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", identity_token),
        ("client_id", "kiln"),
        ("scope", scope.as_str()),
    ];
    if let Some(service) = &service {
        form.push(("service", service.as_str()));
    }
    let res = client
        .post(&realm)
        .form(&form)
        .send()
        .await
        .map_err(unreachable)?;
    if !res.status().is_success() {
        return Err(failed(format!(
            "token service {realm} refused the identity token (HTTP {})",
            res.status()
        )));
    }
    #[derive(Deserialize)]
    struct Token {
        #[serde(default)]
        access_token: Option<String>,
        #[serde(default)]
        token: Option<String>,
    }
    let token: Token = res
        .json()
        .await
        .map_err(|e| failed(format!("token service {realm} answered no token: {e}")))?;
    token
        .access_token
        .or(token.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| failed(format!("token service {realm} answered no token")))
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
    fn helpers_are_chosen_as_docker_does() {
        let file: AuthFile = serde_json::from_str(
            r#"{"credsStore":"desktop","credHelpers":{"gcr.io":"gcloud","https://index.docker.io/v1/":"hub"}}"#,
        )
        .expect("parse");
        assert_eq!(helper_for(&file, "gcr.io"), Some("gcloud"));
        assert_eq!(helper_for(&file, "index.docker.io"), Some("hub"));
        assert_eq!(helper_for(&file, "127.0.0.1:5000"), Some("desktop"));
        let none: AuthFile = serde_json::from_str(r#"{"credsStore":" "}"#).expect("parse");
        assert_eq!(helper_for(&none, "gcr.io"), None);
        assert_eq!(
            helper_server("index.docker.io"),
            "https://index.docker.io/v1/"
        );
        assert_eq!(helper_server("Reg.example:5000"), "reg.example:5000");
        // A config round-trips with its helpers.
        let text = serde_json::to_string(&file).expect("serialize");
        assert!(text.contains("\"credsStore\":\"desktop\""), "{text}");
        assert!(text.contains("\"credHelpers\""), "{text}");
    }

    #[test]
    fn helper_names_cannot_be_paths() {
        let err = helper_get("../../tmp/x", "gcr.io", Path::new("/c.json")).expect_err("refused");
        assert!(matches!(err, Error::CredentialHelper { .. }), "{err}");
    }

    #[test]
    fn bearer_params() {
        let (realm, service) =
            parse_bearer(r#"realm="https://auth.example/token",service="registry.example""#);
        assert_eq!(realm.as_deref(), Some("https://auth.example/token"));
        assert_eq!(service.as_deref(), Some("registry.example"));
    }
}
