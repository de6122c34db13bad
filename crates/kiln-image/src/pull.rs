//! Pulling images from registries through the distribution API (oci-client).

use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, LayerDescriptor};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::auth::Secret;
use crate::blob;
use crate::error::{Error, Result};
use crate::manifest::{self, Descriptor, Document};
use crate::partial::Partial;
use crate::progress::{BlobProgress, Progress, ProgressMode};
use crate::reference::{self, registry_of};
use crate::store::{ImageRecord, Store};
use crate::Credentials;

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries (host or host:port) to reach over plain HTTP. Loopback registries
    /// (`localhost`, `127.0.0.0/8`, `[::1]`) always are; `KILN_INSECURE_REGISTRIES`
    /// (comma-separated) adds more.
    pub insecure_registries: Vec<String>,
    /// Progress display.
    pub progress: ProgressMode,
    /// Credentials to use instead of the stored ones.
    pub credentials: Option<Credentials>,
    /// Layers downloaded at once.
    pub max_concurrent_downloads: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_registries: Vec::new(),
            progress: ProgressMode::Auto,
            credentials: None,
            max_concurrent_downloads: 4,
        }
    }
}

/// Installs ring as rustls' crypto provider (once per process; later calls are no-ops).
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether a registry host\[:port\] is on the loopback interface.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn is_insecure(registry: &str, options: &PullOptions) -> bool {
    if is_loopback(registry) {
        return true;
    }
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    let env = std::env::var("KILN_INSECURE_REGISTRIES").unwrap_or_default();
    options
        .insecure_registries
        .iter()
        .map(String::as_str)
        .chain(env.split(',').map(str::trim))
        .filter(|s| !s.is_empty())
        .any(|s| s == registry || s == host)
}

/// The text of an error and all its sources ("error sending request: … Connection refused").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The innermost cause of an error ("Connection refused (os error 111)").
pub(crate) fn root_cause(e: &dyn std::error::Error) -> String {
    let mut last = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

/// What a request was for, to turn registry errors into the right message.
enum Target<'a> {
    Manifest,
    Blob(&'a str),
}

struct Ctx {
    registry: String,
    reference: String,
    has_credentials: bool,
}

impl Ctx {
    fn map(&self, e: OciDistributionError, target: Target<'_>) -> Error {
        let not_found = || match target {
            Target::Manifest => Error::ImageNotFound {
                reference: self.reference.clone(),
            },
            Target::Blob(digest) => Error::Registry {
                registry: self.registry.clone(),
                message: format!("blob {digest} of {} is missing", self.reference),
            },
        };
        let auth = || {
            if self.has_credentials {
                Error::AuthFailed {
                    registry: self.registry.clone(),
                    reason: "wrong username or password, or no access to this repository".into(),
                }
            } else {
                Error::AuthRequired {
                    registry: self.registry.clone(),
                }
            }
        };
        match e {
            OciDistributionError::RequestError(re) => {
                if re.is_connect() || re.is_timeout() || re.is_builder() {
                    Error::Unreachable {
                        registry: self.registry.clone(),
                        reason: root_cause(&re),
                    }
                } else {
                    Error::Registry {
                        registry: self.registry.clone(),
                        message: error_chain(&re),
                    }
                }
            }
            OciDistributionError::UnauthorizedError { .. } => auth(),
            OciDistributionError::AuthenticationFailure(reason) => {
                if self.has_credentials {
                    Error::AuthFailed {
                        registry: self.registry.clone(),
                        reason: reason.trim().to_string(),
                    }
                } else {
                    Error::AuthRequired {
                        registry: self.registry.clone(),
                    }
                }
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    not_found()
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    auth()
                } else {
                    let messages: Vec<String> = envelope
                        .errors
                        .iter()
                        .map(|e| format!("{:?}: {}", e.code, e.message))
                        .collect();
                    Error::Registry {
                        registry: self.registry.clone(),
                        message: messages.join("; "),
                    }
                }
            }
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
            OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => auth(),
            OciDistributionError::ServerError { code, url, message } => Error::Registry {
                registry: self.registry.clone(),
                message: format!("HTTP {code} for {url}: {}", message.trim()),
            },
            OciDistributionError::DigestError(d) => Error::InvalidImage {
                context: self.reference.clone(),
                reason: format!("manifest digest check failed: {d}"),
            },
            other => Error::Registry {
                registry: self.registry.clone(),
                message: error_chain(&other),
            },
        }
    }
}

impl Store {
    /// Pulls `reference` from its registry into the store and records it.
    ///
    /// Blobs already in the store are not downloaded again, and a blob an interrupted pull
    /// had begun is resumed from where it stopped with a range request (the
    /// `partial/` files in the [crate docs](crate)), so re-running an interrupted pull only fetches what is missing.
    /// A connection that breaks in the middle of a blob is resumed within the same pull. Every blob is verified against its digest before it is
    /// stored; the reference is recorded only when all blobs are present. The default image
    /// name ([`crate::DEFAULT_IMAGE`] or [`crate::DEFAULT_IMAGE_ALIAS`]) is built locally.
    pub fn pull(&self, reference: &str, options: &PullOptions) -> Result<ImageRecord> {
        if crate::default_image::is_default_name(reference) {
            return self.ensure_default_image();
        }
        let parsed = reference::parse(reference)?;
        install_crypto_provider();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Other(format!("starting the async runtime: {e}")))?;
        rt.block_on(self.pull_async(parsed, options))
    }

    /// The stored image for `reference`, pulling it first only if it is not in the store
    /// (what `kiln run IMAGE` wants: no network when the image is already here).
    pub fn ensure(&self, reference: &str, options: &PullOptions) -> Result<ImageRecord> {
        if crate::default_image::is_default_name(reference) {
            return self.ensure_default_image();
        }
        match self.resolve(reference) {
            Ok(record) => Ok(record),
            Err(Error::NotInStore { .. }) => self.pull(reference, options),
            Err(e) => Err(e),
        }
    }

    async fn pull_async(&self, parsed: Reference, options: &PullOptions) -> Result<ImageRecord> {
        let registry = registry_of(&parsed);
        let insecure = is_insecure(&registry, options);
        let secret = match &options.credentials {
            Some(c) => Some(Secret::Basic(c.clone())),
            None => crate::auth::lookup(self.kiln_root(), &registry)?,
        };
        let ctx = Ctx {
            registry: registry.clone(),
            reference: parsed.whole(),
            has_credentials: secret.is_some(),
        };
        let auth = match &secret {
            Some(Secret::Basic(c)) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            Some(Secret::IdentityToken(token)) => RegistryAuth::Bearer(
                crate::auth::access_token(&registry, insecure, parsed.repository(), token).await?,
            ),
            None => RegistryAuth::Anonymous,
        };
        let client = Client::new(ClientConfig {
            protocol: if insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(120)),
            user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        });
        let progress = Progress::new(options.progress);
        progress.message(&format!("pulling {}", ctx.reference));

        client
            .auth(&parsed, &auth, RegistryOperation::Pull)
            .await
            .map_err(|e| ctx.map(e, Target::Manifest))?;

        // Manifest or index, verified against the reference's digest by oci-client and
        // re-hashed here before anything is stored.
        let (body, digest) = client
            .pull_manifest_raw(&parsed, &auth, manifest::ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| ctx.map(e, Target::Manifest))?;
        let digest = check_digest(&body, &digest, parsed.digest())?;
        let (manifest_bytes, manifest_digest, index) =
            match manifest::parse_document(&body, &ctx.reference)? {
                Document::Manifest(_) => (body.to_vec(), digest, None),
                Document::Index(index) => {
                    let entry = manifest::select_platform(&index, &ctx.reference)?;
                    let platform_ref = parsed.clone_with_digest(entry.digest.clone());
                    let (mbody, mdigest) = client
                        .pull_manifest_raw(&platform_ref, &auth, manifest::ACCEPTED_MANIFESTS)
                        .await
                        .map_err(|e| ctx.map(e, Target::Manifest))?;
                    let mdigest = check_digest(&mbody, &mdigest, Some(&entry.digest))?;
                    (mbody.to_vec(), mdigest, Some((body.to_vec(), digest)))
                }
            };
        let manifest = manifest::parse_manifest(&manifest_bytes, &ctx.reference)?;
        manifest::check_manifest(&manifest, &ctx.reference)?;

        // From here on blobs are written: hold off prune until the reference is recorded.
        let _lease = self.lease()?;
        let dir = self.blob_dir();

        // The config first: it is small and tells whether the image can run here at all.
        if !self.has_blob(&manifest.config.digest) {
            let progress = Progress::new(ProgressMode::Quiet);
            download(&client, &parsed, &manifest.config, self, &progress, &ctx).await?;
        }
        let config_bytes = self.read_blob(&manifest.config.digest)?;
        check_config(&config_bytes, &ctx.reference)?;

        let downloads = manifest.layers.iter().map(|layer| {
            let (client, parsed, progress, ctx) = (&client, &parsed, &progress, &ctx);
            async move {
                if self.has_blob(&layer.digest) {
                    progress
                        .blob(&layer.digest, layer.size)
                        .finish("already present");
                    return Ok(());
                }
                download(client, parsed, layer, self, progress, ctx).await
            }
        });
        // Every download runs to its end even when another fails, so a retried pull finds
        // as many finished layers as possible.
        let results: Vec<Result<()>> = stream::iter(downloads)
            .buffer_unordered(options.max_concurrent_downloads.max(1))
            .collect()
            .await;
        if let Some(err) = results.into_iter().find_map(|r| r.err()) {
            return Err(err);
        }

        if let Some((index_bytes, index_digest)) = &index {
            blob::write_blob(&dir, index_digest, index_bytes)?;
        }
        blob::write_blob(&dir, &manifest_digest, &manifest_bytes)?;
        let index_digest = index.as_ref().map(|(_, d)| d.as_str());
        self.record(&ctx.reference, &manifest_digest, index_digest)?;
        progress.message(&format!("{}: stored as {manifest_digest}", ctx.reference));
        self.resolve(&ctx.reference)
    }
}

/// Re-hashes a manifest body; it must match what the registry said and what the reference
/// pinned.
fn check_digest(body: &[u8], claimed: &str, pinned: Option<&str>) -> Result<String> {
    let actual = blob::sha256_digest(body);
    for expected in [Some(claimed), pinned].into_iter().flatten() {
        if blob::digest_hex(expected).is_ok() && expected != actual {
            return Err(Error::DigestMismatch {
                digest: expected.to_string(),
                actual,
            });
        }
    }
    Ok(actual)
}

/// Refuses configs kiln cannot boot (wrong OS or architecture) before layers are fetched.
pub(crate) fn check_config(bytes: &[u8], reference: &str) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        os: String,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| Error::InvalidImage {
        context: reference.to_string(),
        reason: format!("image config is not valid JSON: {e}"),
    })?;
    if probe.os != "linux" || probe.architecture != "amd64" {
        return Err(Error::InvalidImage {
            context: reference.to_string(),
            reason: format!(
                "image is for {}/{}; kiln runs linux/amd64 images",
                probe.os, probe.architecture
            ),
        });
    }
    Ok(())
}

/// Streams one blob into the store, hashing as it goes; the blob appears only if verified.
///
/// The bytes go to the blob's partial file (see [`crate::partial`]), so a pull that is
/// interrupted leaves them for the next one, which asks only for the rest.
async fn download(
    client: &Client,
    image: &Reference,
    desc: &Descriptor,
    store: &Store,
    progress: &Progress,
    ctx: &Ctx,
) -> Result<()> {
    let bar = progress.blob(&desc.digest, desc.size);
    let result = fetch_blob(client, image, desc, store, &bar, ctx).await;
    bar.finish(match result {
        Ok(true) => "done",
        Ok(false) => "already present",
        Err(_) => "failed",
    });
    result.map(|_| ())
}

/// Runs blocking file work (fsync, re-hashing a partial file) off the async runtime's
/// thread, so the other downloads go on meanwhile.
async fn blocking<T: Send + 'static>(
    digest: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Other(format!("storing blob {digest}: {e}")))?
}

/// Why one request for a blob did not leave a complete file.
enum Stop {
    /// The registry refused or mishandled the range request: fetch again from byte 0.
    Range(Error),
    /// The content cannot be the blob (more bytes than its size): it is discarded.
    Corrupt(Error),
    /// The connection broke in the middle of the body, or the request got no answer:
    /// reconnect and resume from where the file ends.
    Dropped(Error),
    /// Anything else (network, auth, a missing blob): what arrived stays for the next pull.
    Fail(Error),
}

/// Reconnections in a row that brought no new byte before a download gives up (a link that
/// delivers anything at all keeps being resumed; a dead one fails the pull, whose partial
/// file the next pull resumes).
const MAX_STALLED_RECONNECTS: u32 = 3;

/// Whether a registry's error answer to a range request may be about the range itself
/// (416, or another 4xx that is not about auth, a missing blob or rate limits), so that
/// asking for the whole blob could succeed.
fn refused_range(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ServerError { code, .. } => {
            *code == 416
                || ((400..500).contains(code) && !matches!(code, 401 | 403 | 404 | 408 | 429))
        }
        OciDistributionError::RegistryError { envelope, .. } => !envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::BlobUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::Unauthorized
                    | OciErrorCode::Denied
                    | OciErrorCode::Toomanyrequests
            )
        }),
        OciDistributionError::SpecViolationError(_) => true,
        _ => false,
    }
}

/// Makes what the partial file holds durable and recorded, so the next pull resumes from
/// there; a failure is only logged (the caller is already returning an error of its own).
async fn save(partial: &mut Partial, digest: &str) {
    let checkpoint = match partial.checkpoint(true) {
        Ok(Some(checkpoint)) => checkpoint,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("keeping the partial download of {digest}: {e}");
            return;
        }
    };
    match blocking(digest, move || checkpoint.run()).await {
        Ok(synced) => partial.checkpointed(synced),
        Err(e) => tracing::warn!("keeping the partial download of {digest}: {e}"),
    }
}

/// Downloads a blob into the store, resuming its partial file if there is one. `Ok(false)`
/// when the blob turned out to be stored already (by a concurrent pull that held it).
async fn fetch_blob(
    client: &Client,
    image: &Reference,
    desc: &Descriptor,
    store: &Store,
    bar: &BlobProgress,
    ctx: &Ctx,
) -> Result<bool> {
    let (partial_dir, blob_dir) = (store.partial_dir(), store.blob_dir());
    let digest = desc.digest.as_str();
    let partial = match Partial::lock(&partial_dir, &blob_dir, digest, desc.size, false)? {
        Some(partial) => partial,
        None => {
            // Another pull is downloading this very blob: wait for it rather than fetch it
            // twice. Its lock goes with it if it dies, so this cannot wait forever.
            bar.note("waiting for another pull of this blob");
            let (d, size) = (desc.digest.clone(), desc.size);
            blocking(digest, move || {
                Partial::lock(&partial_dir, &blob_dir, &d, size, true)?
                    .ok_or_else(|| Error::Other(format!("partial blob {d}: lock not taken")))
            })
            .await?
        }
    };
    if store.has_blob(digest) {
        partial.discard()?;
        return Ok(false);
    }
    let (mut partial, mut offset) = blocking(digest, move || {
        let mut partial = partial;
        let offset = partial.resume()?;
        Ok((partial, offset))
    })
    .await?;
    bar.started(desc.size, offset);
    let mut retried = false;
    let mut stalled = 0u32;
    loop {
        let fetched = if offset < desc.size || desc.size == 0 {
            fetch(client, image, desc, &mut partial, offset, bar, ctx).await
        } else {
            // Complete on disk already (killed before the rename): only the check is left.
            Ok(offset)
        };
        let start = match fetched {
            Ok(start) => start,
            Err(Stop::Range(e)) if !retried => {
                tracing::warn!("{e}; downloading blob {digest} again from byte 0");
                bar.note("registry refused the range, starting over");
                partial.restart()?;
                bar.set_position(0);
                (offset, retried) = (0, true);
                continue;
            }
            Err(Stop::Corrupt(e)) => {
                if offset > 0 && !retried {
                    tracing::warn!("{e}; downloading blob {digest} again from byte 0");
                    partial.restart()?;
                    bar.set_position(0);
                    (offset, retried) = (0, true);
                    continue;
                }
                partial.discard()?;
                return Err(e);
            }
            Err(Stop::Dropped(e)) => {
                // A flaky link: what arrived is kept and recorded, and the rest asked for
                // with a range, after a pause that grows while no byte gets through.
                save(&mut partial, digest).await;
                stalled = if partial.written() > offset {
                    0
                } else {
                    stalled + 1
                };
                if stalled >= MAX_STALLED_RECONNECTS {
                    if partial.written() == 0 {
                        return Err(e);
                    }
                    let cause = match e {
                        Error::Registry { message, .. } => message,
                        Error::Unreachable { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    return Err(Error::Registry {
                        registry: ctx.registry.clone(),
                        message: format!(
                            "downloading blob {digest} stopped after {} of {} bytes (kept: \
                             pulling again resumes there): {cause}",
                            partial.written(),
                            desc.size
                        ),
                    });
                }
                let pause = Duration::from_millis(500 << stalled);
                tracing::warn!(
                    "{e}; resuming at byte {} in {} ms",
                    partial.written(),
                    pause.as_millis()
                );
                bar.note("connection lost, resuming");
                tokio::time::sleep(pause).await;
                offset = partial.written();
                continue;
            }
            Err(Stop::Range(e) | Stop::Fail(e)) => {
                save(&mut partial, digest).await;
                return Err(e);
            }
        };
        if partial.written() < desc.size {
            save(&mut partial, digest).await;
            return Err(Error::Registry {
                registry: ctx.registry.clone(),
                message: format!(
                    "downloading blob {digest} ended after {} of {} bytes",
                    partial.written(),
                    desc.size
                ),
            });
        }
        // fsync, verify, rename; a mismatch empties the partial file.
        let (back, finished) = blocking(digest, move || {
            let mut partial = partial;
            let finished = partial.finish();
            Ok((partial, finished))
        })
        .await?;
        partial = back;
        match finished {
            Ok(_) => return Ok(true),
            Err(e @ (Error::DigestMismatch { .. } | Error::SizeMismatch { .. })) => {
                if start > 0 && !retried {
                    // Resumed: the bytes kept on disk may be what is wrong. Once more, whole.
                    tracing::warn!("{e}; downloading blob {digest} again from byte 0");
                    bar.note("corrupt partial download, starting over");
                    bar.set_position(0);
                    (offset, retried) = (0, true);
                    continue;
                }
                partial.discard()?;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// One request for a blob from `offset`, appended to the partial file. Returns where the
/// received content started (0 when the registry sent the whole blob instead of the range).
async fn fetch(
    client: &Client,
    image: &Reference,
    desc: &Descriptor,
    partial: &mut Partial,
    offset: u64,
    bar: &BlobProgress,
    ctx: &Ctx,
) -> std::result::Result<u64, Stop> {
    let digest = desc.digest.as_str();
    // Foreign URLs are never followed: the registry itself must serve every blob.
    let none = None;
    let layer = LayerDescriptor {
        digest,
        urls: &none,
    };
    let mut start = offset;
    // The blob is asked for as a range, from byte 0 or from where the partial file ends:
    // oci-client then leaves the digest check to kiln (size and sha256 verified before the
    // blob becomes visible) instead of hashing every byte a second time. A registry that
    // ignores the range answers 200 with the whole blob, and oci-client checks too. Empty
    // blobs have no range to ask for.
    let mut stream = if desc.size > 0 {
        match client
            .pull_blob_stream_partial(image, &layer, offset, None)
            .await
        {
            Ok(BlobResponse::Partial(stream)) => {
                let want = desc.size - offset;
                if let Some(len) = stream.content_length.filter(|len| *len != want) {
                    return Err(Stop::Range(Error::Registry {
                        registry: ctx.registry.clone(),
                        message: format!(
                            "asked for blob {digest} from byte {offset}, the registry sent \
                             {len} bytes instead of {want}"
                        ),
                    }));
                }
                stream
            }
            Ok(BlobResponse::Full(stream)) => {
                if offset > 0 {
                    tracing::info!(
                        "registry {} ignored the range; downloading blob {digest} whole",
                        ctx.registry
                    );
                    partial.restart().map_err(Stop::Fail)?;
                    bar.set_position(0);
                    start = 0;
                }
                stream
            }
            Err(e) => {
                let range = offset > 0 && refused_range(&e);
                // No answer at all (refused, reset, timed out): a blip on the link, retried
                // like a broken-off body.
                let transport = matches!(e, OciDistributionError::RequestError(_));
                let e = ctx.map(e, Target::Blob(digest));
                return Err(if range {
                    Stop::Range(e)
                } else if transport {
                    Stop::Dropped(e)
                } else {
                    Stop::Fail(e)
                });
            }
        }
    } else {
        client
            .pull_blob_stream(image, &layer)
            .await
            .map_err(|e| Stop::Fail(ctx.map(e, Target::Blob(digest))))?
    };
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                partial.write_all(&bytes).map_err(|e| match e {
                    Error::SizeMismatch { .. } => Stop::Corrupt(e),
                    e => Stop::Fail(e),
                })?;
                bar.inc(bytes.len() as u64);
                if let Some(checkpoint) = partial.checkpoint(false).map_err(Stop::Fail)? {
                    let synced = blocking(digest, move || checkpoint.run())
                        .await
                        .map_err(Stop::Fail)?;
                    partial.checkpointed(synced);
                }
            }
            Err(e) => {
                if e.get_ref()
                    .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>())
                {
                    // oci-client's own check fired at the end of the stream; report it
                    // with our wording (the final check fails the same way).
                    break;
                }
                return Err(Stop::Dropped(Error::Registry {
                    registry: ctx.registry.clone(),
                    message: format!(
                        "downloading blob {digest} failed after {} bytes: {}",
                        partial.written(),
                        error_chain(&e)
                    ),
                }));
            }
        }
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries() {
        assert!(is_loopback("localhost"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.1.2.3"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }
}
