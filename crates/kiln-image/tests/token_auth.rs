//! Pulls against a real registry (Debian's docker-registry, distribution v2.8) that uses
//! Docker's bearer token authentication, with a token server written here: it checks HTTP
//! basic credentials and hands out ES256 JWTs signed with a key whose self-signed
//! certificate is the registry's `rootcertbundle` (the certificate travels in the `x5c`
//! header). Key, certificate and signatures come from the `openssl` CLI.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{blob_files, layer, quiet, store};
use kiln_image::oci::{BuiltImage, ImageBuilder};
use kiln_image::{Compression, Credentials, Error, PullOptions};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const SERVICE: &str = "kiln-test";
const ISSUER: &str = "kiln-test-issuer";
const USER: &str = "tokenuser";
const PASSWORD: &str = "t0ken-pass";
/// The identity token (OAuth2 refresh token) the token server accepts for [`USER`].
const REFRESH_TOKEN: &str = "kiln-identity-token-1";

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Whether the `openssl` CLI runs (`None`) or why not.
fn openssl_missing() -> Option<String> {
    match Command::new("openssl").arg("version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`openssl version` failed: {out:?}")),
        Err(e) => Some(format!(
            "openssl CLI not runnable ({e}); install the Debian package `openssl`"
        )),
    }
}

/// An ES256 signing key and its self-signed certificate.
struct SigningKey {
    key: PathBuf,
    cert: PathBuf,
    /// The certificate, base64 DER (standard alphabet), for the `x5c` header.
    cert_der_b64: String,
}

impl SigningKey {
    fn generate(dir: &Path) -> SigningKey {
        let key = dir.join("key.pem");
        let cert = dir.join("cert.pem");
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .arg("ec_paramgen_curve:prime256v1")
            .args(["-nodes", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .args(["-days", "1", "-subj", "/CN=kiln-test"])
            .output()
            .expect("running openssl req");
        assert!(out.status.success(), "openssl req failed: {out:?}");
        let pem = std::fs::read_to_string(&cert).expect("reading cert.pem");
        let cert_der_b64: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect();
        SigningKey {
            key,
            cert,
            cert_der_b64,
        }
    }

    /// ES256 signature of `input` in JWS form (raw r || s, 32 bytes each).
    fn sign(&self, input: &[u8]) -> Vec<u8> {
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running openssl dgst");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("writing to openssl");
        let out = child.wait_with_output().expect("openssl dgst");
        assert!(out.status.success(), "openssl dgst failed: {out:?}");
        der_ecdsa_to_raw(&out.stdout)
    }

    fn jwt(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [self.cert_der_b64],
        });
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self.sign(input.as_bytes());
        format!("{input}.{}", b64url(&sig))
    }
}

/// `SEQUENCE { INTEGER r, INTEGER s }` (DER) to the 64-byte `r || s` JWS wants.
fn der_ecdsa_to_raw(der: &[u8]) -> Vec<u8> {
    fn len_at(der: &[u8], i: &mut usize) -> usize {
        let b = der[*i];
        *i += 1;
        if b < 0x80 {
            return b as usize;
        }
        let n = (b & 0x7f) as usize;
        let mut len = 0;
        for _ in 0..n {
            len = (len << 8) | der[*i] as usize;
            *i += 1;
        }
        len
    }
    assert_eq!(der[0], 0x30, "ECDSA signature is a DER SEQUENCE");
    let mut i = 1;
    let _ = len_at(der, &mut i);
    let mut raw = Vec::with_capacity(64);
    for _ in 0..2 {
        assert_eq!(der[i], 0x02, "DER INTEGER");
        i += 1;
        let len = len_at(der, &mut i);
        let mut int = &der[i..i + len];
        i += len;
        while int.len() > 32 && int[0] == 0 {
            int = &int[1..];
        }
        assert!(int.len() <= 32, "P-256 integer too long");
        raw.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        raw.extend_from_slice(int);
    }
    raw
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One request the token server answered.
#[derive(Debug, Clone)]
struct TokenRequest {
    /// The basic-auth user, if credentials were sent.
    user: Option<String>,
    /// `scope` parameters, decoded.
    scopes: Vec<String>,
    /// `service` parameter.
    service: Option<String>,
    /// The HTTP status answered.
    status: u16,
    /// `grant_type` of an OAuth2 POST.
    grant: Option<String>,
}

/// A Docker token server on 127.0.0.1: one user, who gets every action a `repository` scope
/// asks for; anonymous clients get a token granting nothing (as Docker Hub does for private
/// repositories); wrong credentials get 401.
struct TokenServer {
    addr: String,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    fn start(key: Arc<SigningKey>) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("token server port");
        let addr = listener.local_addr().expect("token addr").to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let jti = Arc::new(AtomicU64::new(0));
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut workers = Vec::new();
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (key, requests, jti) = (key.clone(), requests.clone(), jti.clone());
                    workers.push(std::thread::spawn(move || {
                        serve_token(conn, &key, &requests, &jti);
                    }));
                }
                for w in workers {
                    let _ = w.join();
                }
            })
        };
        TokenServer {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.requests.lock().expect("token log").clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_token(
    mut conn: TcpStream,
    key: &SigningKey,
    log: &Mutex<Vec<TokenRequest>>,
    jti: &AtomicU64,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
    let head_len = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    // An OAuth2 POST carries its parameters as a form body.
    let content_length = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(64 * 1024);
    let mut body = buf[head_len..].to_vec();
    while body.len() < content_length {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let target = request_line.split(' ').nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut scopes = Vec::new();
    let mut service = None;
    let mut grant = None;
    let mut refresh_token = None;
    for pair in query
        .split('&')
        .chain(body.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match percent_decode(k).as_str() {
            "scope" => scopes.extend(v.split(' ').map(str::to_string)),
            "service" => service = Some(v),
            "grant_type" => grant = Some(v),
            "refresh_token" => refresh_token = Some(v),
            _ => {}
        }
    }
    let basic = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .and_then(|(_, value)| {
            let value = value.trim();
            let b64 = value
                .strip_prefix("Basic ")
                .or_else(|| value.strip_prefix("basic "))?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (u, p) = text.split_once(':')?;
            Some((u.to_string(), p.to_string()))
        });

    let basic = match (grant.as_deref(), refresh_token.as_deref()) {
        // The refresh-token grant: an identity token stands for the user.
        (Some("refresh_token"), Some(REFRESH_TOKEN)) => {
            Some((USER.to_string(), PASSWORD.to_string()))
        }
        (Some("refresh_token"), _) => Some((USER.to_string(), String::new())),
        _ => basic,
    };
    let granted = match (&basic, path) {
        (_, p) if p != "/token" => Err(404),
        (Some((u, p)), _) if u == USER && p == PASSWORD => Ok(true),
        (Some(_), _) => Err(401),
        (None, _) => Ok(false),
    };
    let status = match granted {
        Ok(_) => 200,
        Err(code) => code,
    };
    log.lock().expect("token log").push(TokenRequest {
        user: basic.as_ref().map(|(u, _)| u.clone()),
        scopes: scopes.clone(),
        service: service.clone(),
        status,
        grant: grant.clone(),
    });
    let (status_line, extra, body) = match granted {
        Ok(authenticated) => {
            let access: Vec<serde_json::Value> = if authenticated {
                scopes
                    .iter()
                    .filter_map(|s| {
                        let mut parts = s.splitn(3, ':');
                        let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                        (kind == "repository").then(|| {
                            serde_json::json!({
                                "type": kind,
                                "name": name,
                                "actions": actions.split(',').collect::<Vec<_>>(),
                            })
                        })
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_secs();
            let claims = serde_json::json!({
                "iss": ISSUER,
                "sub": basic.as_ref().map(|(u, _)| u.as_str()).unwrap_or(""),
                "aud": service.as_deref().unwrap_or(SERVICE),
                "exp": now + 300,
                "nbf": now - 10,
                "iat": now,
                "jti": format!("kiln-{}", jti.fetch_add(1, Ordering::SeqCst)),
                "access": access,
            });
            let token = key.jwt(&claims);
            let body = serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": 300,
            })
            .to_string();
            ("200 OK", "Content-Type: application/json\r\n", body)
        }
        Err(401) => (
            "401 Unauthorized",
            "Content-Type: application/json\r\nWWW-Authenticate: Basic realm=\"kiln-test-token\"\r\n",
            r#"{"details":"wrong username or password"}"#.to_string(),
        ),
        Err(_) => ("404 Not Found", "", "not found".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status_line}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes());
    let _ = conn.shutdown(Shutdown::Write);
}

/// docker-registry with `auth: token` pointing at a [`TokenServer`]; killed on drop.
struct TokenRegistry {
    child: Child,
    addr: String,
    log: PathBuf,
    token: TokenServer,
    key: Arc<SigningKey>,
    _dir: tempfile::TempDir,
}

impl TokenRegistry {
    fn start() -> TokenRegistry {
        if !Path::new(REGISTRY_BIN).exists() {
            panic!(
                "{REGISTRY_BIN} not found: these tests need a real registry; install the Debian \
                 package `docker-registry` (scripts/setup.sh does)"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir for the registry");
        let key = Arc::new(SigningKey::generate(dir.path()));
        let token = TokenServer::start(key.clone());
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("registry storage dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n\
             http:\n  addr: {addr}\n  secret: kiln-test-secret\n\
             auth:\n  token:\n    realm: http://{token_addr}/token\n    service: {SERVICE}\n\
             \x20   issuer: {ISSUER}\n    rootcertbundle: {cert}\n",
            storage = storage.display(),
            token_addr = token.addr,
            cert = key.cert.display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("writing registry config");
        let log = dir.path().join("registry.log");
        let log_file = std::fs::File::create(&log).expect("registry log file");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log file"))
            .stderr(log_file)
            .spawn()
            .expect("starting docker-registry");
        let registry = TokenRegistry {
            child,
            addr,
            log,
            token,
            key,
            _dir: dir,
        };
        registry.wait_ready();
        registry
    }

    /// Raw `GET /v2/` response head.
    fn v2_head(&self) -> Option<String> {
        self.v2_with("")
    }

    /// Raw `GET /v2/` response, with extra header lines (each ending in CRLF).
    fn v2_with(&self, headers: &str) -> Option<String> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: x\r\n{headers}\r\n").as_bytes())
            .ok()?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        text.starts_with("HTTP/1.").then_some(text)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.v2_head().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "docker-registry did not come up on {}; log:\n{}",
            self.addr,
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn reference(&self, repo_and_tag: &str) -> String {
        format!("{}/{}", self.addr, repo_and_tag)
    }

    /// Pushes `image` as `repo:tag` with oci-client, through the token flow.
    fn push(&self, repo: &str, tag: &str, image: &BuiltImage) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r: Reference = self
            .reference(&format!("{repo}:{tag}"))
            .parse()
            .expect("ref");
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        });
        let auth = RegistryAuth::Basic(USER.into(), PASSWORD.into());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let result: Result<(), oci_client::errors::OciDistributionError> = rt.block_on(async {
            client.auth(&r, &auth, RegistryOperation::Push).await?;
            for blob in image
                .layers
                .iter()
                .map(|l| &l.blob)
                .chain(std::iter::once(&image.config))
            {
                client
                    .push_blob(&r, blob.data.clone(), &blob.digest)
                    .await?;
            }
            client
                .push_manifest_raw(
                    &r,
                    image.manifest.data.clone(),
                    image.manifest.media_type.parse().expect("media type"),
                )
                .await?;
            Ok(())
        });
        if let Err(e) = result {
            panic!(
                "pushing {repo}:{tag} through the token flow: {e}\nregistry log:\n{}",
                self.log_text()
            );
        }
    }
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn creds(password: &str) -> Credentials {
    Credentials {
        username: USER.into(),
        password: password.into(),
    }
}

#[test]
fn bearer_token_auth() {
    if let Some(reason) = openssl_missing() {
        eprintln!("SKIPPED bearer_token_auth: {reason}");
        return;
    }
    let registry = TokenRegistry::start();

    // The registry really speaks bearer: its challenge points at our token server.
    let head = registry.v2_head().expect("GET /v2/");
    assert!(
        head.starts_with("HTTP/1.1 401") || head.starts_with("HTTP/1.0 401"),
        "{head}"
    );
    let realm = format!(
        "Bearer realm=\"http://{}/token\",service=\"{SERVICE}\"",
        registry.token.addr
    );
    assert!(head.contains(&realm), "challenge: {head}");

    // Negative control: the registry checks signatures against its rootcertbundle. A token
    // from our key opens /v2/; the same claims signed by another key (presenting our
    // certificate in x5c) do not.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
        "iat": now, "jti": "control", "access": [],
    });
    let good = registry.key.jwt(&claims);
    let ok = registry
        .v2_with(&format!("Authorization: Bearer {good}\r\n"))
        .expect("GET /v2/ with a token");
    assert!(
        ok.starts_with("HTTP/1.0 200") || ok.starts_with("HTTP/1.1 200"),
        "{ok}"
    );
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = SigningKey::generate(other_dir.path());
    let forger = SigningKey {
        cert_der_b64: registry.key.cert_der_b64.clone(),
        ..other
    };
    let forged = forger.jwt(&claims);
    let refused = registry
        .v2_with(&format!("Authorization: Bearer {forged}\r\n"))
        .expect("GET /v2/ with a forged token");
    assert!(
        refused.starts_with("HTTP/1.0 401") || refused.starts_with("HTTP/1.1 401"),
        "{refused}"
    );

    let image = ImageBuilder::new()
        .layer(layer("token-a", Compression::Gzip))
        .layer(layer("token-b", Compression::Zstd))
        .cmd(&["/bin/true"])
        .build()
        .expect("image");
    registry.push("private/app", "v1", &image);
    let push_scopes: Vec<String> = registry
        .token
        .requests()
        .into_iter()
        .filter(|r| r.status == 200 && r.user.as_deref() == Some(USER))
        .flat_map(|r| r.scopes)
        .collect();
    assert!(
        push_scopes.contains(&"repository:private/app:pull,push".to_string()),
        "{push_scopes:?}"
    );

    let (dir, store) = store();
    let reference = registry.reference("private/app:v1");

    // Anonymous: the token server hands out a token that grants nothing; the registry
    // refuses it.
    let err = store
        .pull(&reference, &quiet())
        .expect_err("anonymous pull of a private image");
    eprintln!("expected error: {err}");
    assert!(matches!(err, Error::AuthRequired { .. }), "{err}");
    assert!(err.to_string().contains(&registry.addr), "{err}");
    assert!(err.to_string().contains("kiln login"), "{err}");
    assert!(
        registry
            .token
            .requests()
            .iter()
            .any(|r| r.user.is_none() && r.status == 200),
        "the anonymous pull asked the token server"
    );

    // Wrong password: the token server says 401.
    let before = registry.token.requests().len();
    let wrong = PullOptions {
        credentials: Some(creds("wrong")),
        ..quiet()
    };
    let err = store.pull(&reference, &wrong).expect_err("wrong password");
    eprintln!("expected error: {err}");
    assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
    assert!(err.to_string().contains(&registry.addr), "{err}");
    assert!(
        registry.token.requests()[before..]
            .iter()
            .any(|r| r.user.as_deref() == Some(USER) && r.status == 401),
        "the wrong password reached the token server"
    );
    let bad_login = kiln_image::login(dir.path(), &registry.addr, &creds("nope"), false)
        .expect_err("login with a wrong password");
    eprintln!("expected error: {bad_login}");
    assert!(matches!(bad_login, Error::AuthFailed { .. }), "{bad_login}");
    assert!(
        bad_login.to_string().contains(&registry.addr),
        "{bad_login}"
    );
    assert!(
        !dir.path().join("auth.json").exists(),
        "a refused login stores nothing"
    );
    assert!(
        blob_files(&store).is_empty(),
        "nothing stored after failures"
    );
    assert!(
        store.list().expect("list").is_empty(),
        "no reference recorded"
    );

    // Explicit right credentials.
    let right = PullOptions {
        credentials: Some(creds(PASSWORD)),
        ..quiet()
    };
    let (_dir2, store2) = common::store();
    let record = store2
        .pull(&reference, &right)
        .expect("pull with credentials");
    assert_eq!(record.manifest_digest, image.manifest.digest);

    // `kiln login` through the token service, then a pull with the stored credentials.
    kiln_image::login(dir.path(), &registry.addr, &creds(PASSWORD), false).expect("login");
    let record = store.pull(&reference, &quiet()).expect("pull after login");
    assert_eq!(record.reference, reference);
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_eq!(record.config_digest, image.config.digest);
    assert_eq!(record.layers.len(), 2);
    for (got, want) in record.layers.iter().zip(&image.layers) {
        assert_eq!(got.digest, want.blob.digest);
        assert_eq!(common::file_digest(&got.path), got.digest);
    }
    let resolved = store.resolve(&reference).expect("resolve");
    assert_eq!(resolved.manifest_digest, image.manifest.digest);
    let pull_scopes: Vec<TokenRequest> = registry
        .token
        .requests()
        .into_iter()
        .filter(|r| r.scopes.iter().any(|s| s == "repository:private/app:pull"))
        .filter(|r| r.user.as_deref() == Some(USER) && r.status == 200)
        .collect();
    assert!(!pull_scopes.is_empty(), "{:?}", registry.token.requests());
    assert!(pull_scopes
        .iter()
        .all(|r| r.service.as_deref() == Some(SERVICE)));
    // The registry served the manifest to a bearer-authenticated client.
    let log = registry.log_text();
    assert!(
        log.contains("\"GET /v2/private/app/manifests/v1 "),
        "registry log:\n{log}"
    );
    assert!(kiln_image::logout(dir.path(), &registry.addr).expect("logout"));
}

/// An identity token from a Docker credential helper (user `<token>`) is traded for an access
/// token at the registry's token service with the OAuth2 refresh-token grant, as Docker
/// does. Runs the pulls in a child process (own `DOCKER_CONFIG` and `PATH`).
#[test]
fn identity_token_from_a_credential_helper() {
    if let Some(reason) = openssl_missing() {
        eprintln!("SKIPPED identity_token_from_a_credential_helper: {reason}");
        return;
    }
    let registry = TokenRegistry::start();
    let image = ImageBuilder::new()
        .layer(layer("idtoken", Compression::Gzip))
        .cmd(&["/bin/true"])
        .build()
        .expect("image");
    registry.push("private/idtoken", "v1", &image);
    let config_dir = tempfile::tempdir().expect("tmp");
    let bin = tempfile::tempdir().expect("tmp");
    let addr = registry.addr.as_str();
    common::fake_credential_helper(bin.path(), "kilnidt", &[(addr, "<token>", REFRESH_TOKEN)]);
    common::fake_credential_helper(bin.path(), "kilnrevoked", &[(addr, "<token>", "revoked")]);
    common::run_child_test(
        "identity_token_child",
        config_dir.path(),
        bin.path(),
        &[
            ("KILN_TEST_PULL", &registry.reference("private/idtoken:v1")),
            ("KILN_TEST_DIGEST", &image.manifest.digest),
        ],
    );
    let grants: Vec<TokenRequest> = registry
        .token
        .requests()
        .into_iter()
        .filter(|r| r.grant.as_deref() == Some("refresh_token"))
        .collect();
    assert!(
        grants.iter().any(|r| r.status == 200
            && r.service.as_deref() == Some(SERVICE)
            && r.scopes
                .iter()
                .any(|s| s == "repository:private/idtoken:pull")),
        "{grants:?}"
    );
    assert!(grants.iter().any(|r| r.status == 401), "{grants:?}");
}

#[test]
#[ignore = "run by identity_token_from_a_credential_helper in a child process"]
fn identity_token_child() {
    let reference = std::env::var("KILN_TEST_PULL").expect("KILN_TEST_PULL");
    let digest = std::env::var("KILN_TEST_DIGEST").expect("KILN_TEST_DIGEST");
    let config = PathBuf::from(std::env::var_os("DOCKER_CONFIG").expect("DOCKER_CONFIG"))
        .join("config.json");
    std::fs::write(&config, r#"{"credsStore": "kilnidt"}"#).expect("config.json");
    let (_dir, store) = store();
    let record = store
        .pull(&reference, &quiet())
        .expect("pull with an identity token");
    assert_eq!(record.manifest_digest, digest);

    std::fs::write(&config, r#"{"credsStore": "kilnrevoked"}"#).expect("config.json");
    let (_dir, store) = common::store();
    let err = store
        .pull(&reference, &quiet())
        .expect_err("a revoked identity token");
    eprintln!("expected error: {err}");
    assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
    assert!(err.to_string().contains("identity token"), "{err}");
}
