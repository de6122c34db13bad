//! Test harness: a real registry (Debian's `docker-registry`) on 127.0.0.1 with a free port
//! and temporary storage, killed on drop, plus helpers to push images built by kiln's own OCI
//! writer.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_image::oci::{Blob, BuiltImage, BuiltLayer, LayerBuilder};
use kiln_image::Compression;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The registry's storage root.
    pub storage: PathBuf,
    /// Where its stdout/stderr (with the access log) goes.
    pub log: PathBuf,
    auth: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start() -> Registry {
        Self::start_with(None)
    }

    /// Starts a registry protected by htpasswd (bcrypt) with one user.
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Self::start_with(Some((user, password)))
    }

    fn start_with(auth: Option<(&str, &str)>) -> Registry {
        if !Path::new(REGISTRY_BIN).exists() {
            panic!(
                "{REGISTRY_BIN} not found: these tests need a real registry; install the Debian \
                 package `docker-registry` (scripts/setup.sh does)"
            );
        }
        let mut dir = tempfile::tempdir().expect("tempdir for the registry");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("registry storage dir");
        let htpasswd = auth.map(|(user, password)| {
            let path = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect(
                    "running htpasswd: install the Debian package `apache2-utils` \
                     (scripts/setup.sh does)",
                );
            assert!(out.status.success(), "htpasswd failed: {out:?}");
            std::fs::write(&path, &out.stdout).expect("writing htpasswd");
            path
        });
        // The port is free when chosen but the registry binds it a little later; if another
        // test took it meanwhile, the registry exits and is started again on another one.
        for attempt in 1.. {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let mut config = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: kiln-test-secret\n",
                storage.display()
            );
            if let Some(htpasswd) = &htpasswd {
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                    htpasswd.display()
                ));
            }
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
            kill_at_exit(child.id());
            let mut registry = Registry {
                child,
                addr,
                storage: storage.clone(),
                log,
                auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
                _dir: dir,
            };
            match registry.wait_ready() {
                Ok(()) => return registry,
                Err(exited) if attempt < 3 => {
                    eprintln!("docker-registry {exited} on {}; retrying", registry.addr);
                    dir = std::mem::replace(
                        &mut registry._dir,
                        tempfile::tempdir().expect("tempdir"),
                    );
                }
                Err(exited) => panic!(
                    "docker-registry {exited} on {}; log:\n{}",
                    registry.addr,
                    std::fs::read_to_string(&registry.log).unwrap_or_default()
                ),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Waits until this registry answers; `Err` if it exited first (its port was taken).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited ({status})"));
            }
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                // Answering, and still ours: a registry that lost its port to another test's
                // would have exited.
                if s.read_exact(&mut buf).is_ok()
                    && buf.starts_with(b"HTTP/1.")
                    && matches!(self.child.try_wait(), Ok(None))
                {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "docker-registry did not come up on {}; log:\n{}",
            self.addr,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// `127.0.0.1:PORT/<repo>`.
    pub fn reference(&self, repo_and_tag: &str) -> String {
        format!("{}/{}", self.addr, repo_and_tag)
    }

    /// How many times a blob was GET'ed from `repo` (from the access log).
    pub fn blob_gets(&self, repo: &str, digest: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/{digest} ");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// How many requests for manifests of `repo` the registry served.
    pub fn manifest_requests(&self, repo: &str) -> usize {
        let needle = format!("/v2/{repo}/manifests/");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| (l.contains("\"GET ") || l.contains("\"HEAD ")) && l.contains(&needle))
            .count()
    }

    /// The file the registry keeps a blob's content in.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn client(&self) -> (Client, RegistryAuth) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        });
        let auth = match &self.auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        (client, auth)
    }

    fn runtime() -> tokio::runtime::Runtime {
        let _ = rustls::crypto::ring::default_provider().install_default();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    }

    async fn push_blobs(client: &Client, auth: &RegistryAuth, r: &Reference, image: &BuiltImage) {
        client
            .auth(r, auth, RegistryOperation::Push)
            .await
            .expect("auth for push");
        for blob in image
            .layers
            .iter()
            .map(|l| &l.blob)
            .chain(std::iter::once(&image.config))
        {
            client
                .push_blob(r, blob.data.clone(), &blob.digest)
                .await
                .expect("pushing a blob");
        }
    }

    async fn push_manifest(client: &Client, r: &Reference, blob: &Blob) {
        client
            .push_manifest_raw(
                r,
                blob.data.clone(),
                blob.media_type.parse().expect("media type header"),
            )
            .await
            .expect("pushing a manifest");
    }

    /// Pushes an image as `repo:tag`.
    pub fn push(&self, repo: &str, tag: &str, image: &BuiltImage) {
        let r: Reference = self
            .reference(&format!("{repo}:{tag}"))
            .parse()
            .expect("ref");
        let (client, auth) = self.client();
        Self::runtime().block_on(async {
            Self::push_blobs(&client, &auth, &r, image).await;
            Self::push_manifest(&client, &r, &image.manifest).await;
        });
    }

    /// Pushes several platform images and an index over them as `repo:tag`.
    pub fn push_index(&self, repo: &str, tag: &str, images: &[&BuiltImage], index: &Blob) {
        let r: Reference = self
            .reference(&format!("{repo}:{tag}"))
            .parse()
            .expect("ref");
        let (client, auth) = self.client();
        Self::runtime().block_on(async {
            for image in images {
                Self::push_blobs(&client, &auth, &r, image).await;
                let by_digest = r.clone_with_digest(image.manifest.digest.clone());
                Self::push_manifest(&client, &by_digest, &image.manifest).await;
            }
            Self::push_manifest(&client, &r, index).await;
        });
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        forget_at_exit(self.child.id());
    }
}

/// Registries not dropped yet. A registry in a `static` (shared by the tests of a binary) is
/// never dropped, so these are killed when the test process exits instead of outliving it.
static LIVE_REGISTRIES: Mutex<Vec<u32>> = Mutex::new(Vec::new());

extern "C" fn kill_live_registries() {
    // At exit: never wait for a lock a dying thread may hold.
    if let Ok(pids) = LIVE_REGISTRIES.try_lock() {
        for &pid in pids.iter() {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: SIGKILL to a child of ours that has not been reaped (a reaped one
                // was removed from the list by its Drop), so the pid is still ours.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn kill_at_exit(pid: u32) {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(kill_live_registries) };
    });
    LIVE_REGISTRIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(pid);
}

fn forget_at_exit(pid: u32) {
    LIVE_REGISTRIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}

/// A layer with a few files whose content depends on `seed`, so digests differ per test.
pub fn layer(seed: &str, compression: Compression) -> BuiltLayer {
    let mut b = LayerBuilder::new();
    b.dir("etc/", 0o755).expect("dir");
    b.file(
        "etc/seed",
        0o644,
        format!("seed {seed} {compression:?}").as_bytes(),
    )
    .expect("file");
    b.dir(&format!("data-{seed}/"), 0o755).expect("dir");
    // Some bulk so downloads take more than one chunk.
    let bulk: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    b.file(&format!("data-{seed}/bulk"), 0o644, &bulk)
        .expect("file");
    b.finish(compression).expect("layer")
}

/// A fresh store in a temp dir.
pub fn store() -> (tempfile::TempDir, kiln_image::Store) {
    let dir = tempfile::tempdir().expect("tempdir for the store");
    let store = kiln_image::Store::open(dir.path()).expect("opening the store");
    (dir, store)
}

/// Quiet pull options.
pub fn quiet() -> kiln_image::PullOptions {
    kiln_image::PullOptions {
        progress: kiln_image::ProgressMode::Quiet,
        ..kiln_image::PullOptions::default()
    }
}

/// Names of files in the store's blob dir.
pub fn blob_files(store: &kiln_image::Store) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.blob_dir())
        .expect("blob dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Entry paths of an (uncompressed) layer stream.
pub fn layer_paths(layer: &kiln_image::Layer) -> Vec<String> {
    let mut archive = tar::Archive::new(layer.open().expect("opening layer"));
    archive
        .entries()
        .expect("tar entries")
        .map(|e| {
            e.expect("tar entry")
                .path()
                .expect("entry path")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// sha256 of a file, as `sha256:<hex>`.
pub fn file_digest(path: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(path).expect("reading a blob");
    let hash = sha2::Sha256::digest(&data);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A TCP proxy to `upstream` that sends responses slowly (16 KiB per 50 ms), so a test can
/// catch a pull in the middle of a download. Runs until the process ends.
pub fn slow_proxy(upstream: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
    let addr = listener.local_addr().expect("proxy addr").to_string();
    let upstream = upstream.to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c_read, mut s_write) = (
                client.try_clone().expect("clone client"),
                server.try_clone().expect("clone server"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// `len` bytes that do not compress.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes a fake `docker-credential-<name>` into `bin`: `get` logs the server it was asked
/// about to `<bin>/<name>.log` and answers `{"ServerURL", "Username", "Secret"}` for the
/// servers in `answers`, "credentials not found in native keychain" (exit 1) for others.
pub fn fake_credential_helper(bin: &Path, name: &str, answers: &[(&str, &str, &str)]) {
    use std::os::unix::fs::PermissionsExt;
    let log = bin.join(format!("{name}.log"));
    let mut script = format!(
        "#!/bin/sh\n[ \"$1\" = get ] || {{ echo \"unsupported action $1\" >&2; exit 2; }}\n\
         server=$(cat)\necho \"$server\" >> '{}'\ncase \"$server\" in\n",
        log.display()
    );
    for (server, username, secret) in answers {
        let json = serde_json::json!({"ServerURL": server, "Username": username, "Secret": secret})
            .to_string();
        assert!(!json.contains('\'') && !server.contains('\''), "quoting");
        script.push_str(&format!("  '{server}') printf '%s' '{json}' ;;\n"));
    }
    script.push_str("  *) echo \"credentials not found in native keychain\"; exit 1 ;;\nesac\n");
    let path = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).expect("writing the fake helper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The servers a fake helper was asked about, in order.
pub fn helper_log(bin: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(bin.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs the ignored test `name` of this test binary in a child process with `DOCKER_CONFIG`
/// set and `bin` first in `PATH` (environment other tests must not see), plus `env`; fails
/// with its output unless it passed.
pub fn run_child_test(name: &str, docker_config: &Path, bin: &Path, env: &[(&str, &str)]) {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--include-ignored", "--nocapture"])
        .env("DOCKER_CONFIG", docker_config)
        .env("PATH", path)
        .envs(env.iter().copied())
        .output()
        .expect("running the child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child test {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a [`Proxy`] does to the traffic between kiln and the registry.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Sleep this long after each 16 KiB sent to the client (a slow link).
    pub throttle: Option<Duration>,
    /// Drop a connection once it has sent this many response bytes (a flaky link).
    pub cut_after: Option<u64>,
    /// At the first cut, drop every open connection and refuse all later ones (the link is
    /// gone), so the pull fails rather than reconnects.
    pub down_after_cut: bool,
    /// With `down_after_cut`: back up after this long (a short outage), once.
    pub outage: Option<Duration>,
    /// Remove `Range` headers from requests (a registry that ignores ranges: it answers 200).
    pub strip_range: bool,
    /// Answer requests for a range that does not start at 0 with `416` itself.
    pub refuse_ranges: bool,
    /// Stop forwarding, holding the connection open, once a connection has sent this many
    /// response bytes (a hung link): a pull is then caught mid-blob however slow the host.
    pub stall_after: Option<u64>,
}

/// One request the proxy forwarded: its request line and its `Range` header.
#[derive(Debug, Clone)]
pub struct ProxiedRequest {
    /// `GET /v2/... HTTP/1.1`.
    pub line: String,
    /// The `Range` header's value as kiln sent it (before any stripping).
    pub range: Option<String>,
}

#[derive(Default)]
struct ProxyState {
    served: std::sync::atomic::AtomicU64,
    requests: std::sync::Mutex<Vec<ProxiedRequest>>,
    down: std::sync::atomic::AtomicBool,
    /// When a temporary outage ends.
    up_at: std::sync::Mutex<Option<Instant>>,
    /// An outage happened already (cuts stop after it).
    recovered: std::sync::atomic::AtomicBool,
    clients: std::sync::Mutex<Vec<TcpStream>>,
}

impl ProxyState {
    /// Whether new connections are refused right now.
    fn is_down(&self) -> bool {
        if !self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let mut up_at = self.up_at.lock().expect("proxy outage");
        if up_at.is_some_and(|t| Instant::now() >= t) {
            *up_at = None;
            self.recovered
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.down.store(false, std::sync::atomic::Ordering::SeqCst);
            return false;
        }
        true
    }

    fn go_down(&self, outage: Option<Duration>) {
        *self.up_at.lock().expect("proxy outage") = outage.map(|d| Instant::now() + d);
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.clients.lock().expect("proxy clients").iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A TCP proxy to a registry (std threads) that counts the bytes it serves, logs the requests
/// with their `Range` headers and can slow down, cut, or un-range the traffic. Runs until the
/// process ends.
pub struct Proxy {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    state: std::sync::Arc<ProxyState>,
}

impl Proxy {
    /// Starts a proxy to `upstream`.
    pub fn start(upstream: &str, options: ProxyOptions) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let state = std::sync::Arc::new(ProxyState::default());
        let upstream = upstream.to_string();
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if shared.is_down() {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                if let Ok(c) = client.try_clone() {
                    shared.clients.lock().expect("proxy clients").push(c);
                }
                let (state, opts) = (shared.clone(), options.clone());
                let (Ok(c_read), Ok(s_write), Ok(c_reply)) =
                    (client.try_clone(), server.try_clone(), client.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    forward_requests(c_read, s_write, c_reply, &state, &opts)
                });
                let (state, opts) = (shared.clone(), options.clone());
                std::thread::spawn(move || forward_responses(server, client, &state, &opts));
            }
        });
        Proxy { addr, state }
    }

    /// Response bytes (headers included) served to kiln so far.
    pub fn served(&self) -> u64 {
        self.state.served.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request forwarded (or refused) so far.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.state.requests.lock().expect("proxy log").clone()
    }

    /// The `Range` headers of the GETs of one blob, in order (`None`: no range).
    pub fn blob_ranges(&self, digest: &str) -> Vec<Option<String>> {
        let needle = format!("/blobs/{digest} ");
        self.requests()
            .into_iter()
            .filter(|r| r.line.starts_with("GET ") && r.line.contains(&needle))
            .map(|r| r.range)
            .collect()
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Client → registry: request heads one by one (pulls send no bodies), logged and edited.
fn forward_requests(
    mut client: TcpStream,
    mut server: TcpStream,
    mut reply: TcpStream,
    state: &ProxyState,
    options: &ProxyOptions,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(end) = find_head_end(&buf) {
            let head: Vec<u8> = buf.drain(..end).collect();
            let text = String::from_utf8_lossy(&head).into_owned();
            let mut lines = text.split("\r\n");
            let line = lines.next().unwrap_or_default().to_string();
            let mut range = None;
            let mut kept = vec![line.clone()];
            for l in lines {
                match l.split_once(':') {
                    Some((name, value)) if name.eq_ignore_ascii_case("range") => {
                        range = Some(value.trim().to_string());
                        if !options.strip_range {
                            kept.push(l.to_string());
                        }
                    }
                    _ => kept.push(l.to_string()),
                }
            }
            let refuse = options.refuse_ranges
                && range.as_deref().is_some_and(|r| !r.starts_with("bytes=0-"));
            state
                .requests
                .lock()
                .expect("proxy log")
                .push(ProxiedRequest { line, range });
            if refuse {
                let _ = reply.write_all(
                    b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\
                      Connection: close\r\n\r\n",
                );
                let _ = reply.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
                return;
            }
            // `kept` ends with the two empty strings of the blank line.
            if server.write_all(kept.join("\r\n").as_bytes()).is_err() {
                return;
            }
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = server.shutdown(std::net::Shutdown::Write);
}

/// Registry → client: counted, maybe throttled, maybe cut.
fn forward_responses(
    mut server: TcpStream,
    mut client: TcpStream,
    state: &ProxyState,
    options: &ProxyOptions,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut sent = 0u64;
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Cuts stop once a temporary outage is over.
        let cutting =
            !(options.down_after_cut && state.recovered.load(std::sync::atomic::Ordering::SeqCst));
        let n = match options.cut_after.filter(|_| cutting) {
            Some(cut) => n.min(usize::try_from(cut.saturating_sub(sent)).unwrap_or(n)),
            None => n,
        };
        let n = match options.stall_after {
            Some(stall) => n.min(usize::try_from(stall.saturating_sub(sent)).unwrap_or(n)),
            None => n,
        };
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        state
            .served
            .fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        if cutting && options.cut_after.is_some_and(|cut| sent >= cut) {
            let _ = server.shutdown(std::net::Shutdown::Both);
            let _ = client.shutdown(std::net::Shutdown::Both);
            if options.down_after_cut {
                state.go_down(options.outage);
            }
            return;
        }
        if options.stall_after.is_some_and(|stall| sent >= stall) {
            // Hung, not closed: the client sees neither data nor end of file.
            std::thread::sleep(Duration::from_secs(3600));
            return;
        }
        if let Some(pause) = options.throttle {
            std::thread::sleep(pause);
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
}

/// The length a partial download of `digest` has on record (`images/partial/<hex>.json`),
/// 0 if there is none.
pub fn partial_synced(store: &kiln_image::Store, digest: &str) -> u64 {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = partial_dir(store).join(format!("{hex}.json"));
    std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("synced").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}

/// `images/partial` of a store.
pub fn partial_dir(store: &kiln_image::Store) -> PathBuf {
    store.kiln_root().join("images").join("partial")
}

/// Names of the files in `images/partial`.
pub fn partial_files(store: &kiln_image::Store) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(partial_dir(store))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
