//! Pulling images from registries through the distribution API (oci-client).

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, LayerDescriptor};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::auth::Secret;
use crate::blob::{self, BlobWriter};
use crate::error::{Error, Result};
use crate::manifest::{self, Descriptor, Document};
use crate::progress::{Progress, ProgressMode};
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
    /// Blobs already in the store are not downloaded again, so re-running an interrupted pull
    /// only fetches what is missing. Every blob is verified against its digest before it is
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
            download(&client, &parsed, &manifest.config, &dir, &progress, &ctx).await?;
        }
        let config_bytes = self.read_blob(&manifest.config.digest)?;
        check_config(&config_bytes, &ctx.reference)?;

        let downloads = manifest.layers.iter().map(|layer| {
            let (client, parsed, dir, progress, ctx) = (&client, &parsed, &dir, &progress, &ctx);
            async move {
                if self.has_blob(&layer.digest) {
                    progress
                        .blob(&layer.digest, layer.size)
                        .finish("already present");
                    return Ok(());
                }
                download(client, parsed, layer, dir, progress, ctx).await
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
async fn download(
    client: &Client,
    image: &Reference,
    desc: &Descriptor,
    dir: &std::path::Path,
    progress: &Progress,
    ctx: &Ctx,
) -> Result<()> {
    let bar = Arc::new(progress.blob(&desc.digest, desc.size));
    bar.started(desc.size);
    let result = async {
        // Foreign URLs are never followed: the registry itself must serve every blob.
        let none = None;
        let layer = LayerDescriptor {
            digest: &desc.digest,
            urls: &none,
        };
        // The blob is asked for as the range from byte 0: oci-client then leaves the digest
        // check to the BlobWriter (size and sha256 verified before the blob becomes visible)
        // instead of hashing every byte a second time. A registry that ignores the range
        // answers 200, and oci-client checks too. Empty blobs have no range to ask for.
        let mut stream = if desc.size > 0 {
            match client
                .pull_blob_stream_partial(image, &layer, 0, None)
                .await
                .map_err(|e| ctx.map(e, Target::Blob(&desc.digest)))?
            {
                BlobResponse::Full(stream) | BlobResponse::Partial(stream) => stream,
            }
        } else {
            client
                .pull_blob_stream(image, &layer)
                .await
                .map_err(|e| ctx.map(e, Target::Blob(&desc.digest)))?
        };
        let mut writer = BlobWriter::create(dir, &desc.digest, Some(desc.size))?;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    writer.write_all(&bytes)?;
                    bar.inc(bytes.len() as u64);
                }
                Err(e) => {
                    if e.get_ref()
                        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>())
                    {
                        // oci-client's own check fired at the end of the stream; report it
                        // with our wording (the commit below would fail the same way).
                        break;
                    }
                    return Err(Error::Registry {
                        registry: ctx.registry.clone(),
                        message: format!(
                            "downloading blob {} failed after {} bytes: {}",
                            desc.digest,
                            writer.written(),
                            error_chain(&e)
                        ),
                    });
                }
            }
        }
        // fsync, verify, rename off the runtime's thread: the other downloads go on meanwhile
        // (an fsync can take long on a busy disk).
        tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|e| Error::Other(format!("committing blob {}: {e}", desc.digest)))??;
        Ok(())
    }
    .await;
    bar.finish(if result.is_ok() { "done" } else { "failed" });
    result
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
