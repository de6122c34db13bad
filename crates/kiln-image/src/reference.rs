//! Image references: what users type (`busybox`, `127.0.0.1:5000/app:v1`, `repo@sha256:…`)
//! and the one normalized spelling the store keys images by.

use oci_client::Reference;

use crate::error::{Error, Result};

/// Parses a user's reference into oci-client's type, with a clear error.
pub(crate) fn parse(reference: &str) -> Result<Reference> {
    let trimmed = reference.trim();
    if trimmed.is_empty() {
        return Err(Error::InvalidReference {
            reference: reference.to_string(),
            reason: "empty reference".into(),
        });
    }
    let parsed: Reference =
        trimmed
            .parse()
            .map_err(|e: oci_client::ParseError| Error::InvalidReference {
                reference: reference.to_string(),
                reason: e.to_string(),
            })?;
    if let Some(digest) = parsed.digest() {
        if crate::blob::digest_hex(digest).is_err() {
            return Err(Error::InvalidReference {
                reference: reference.to_string(),
                reason: "only sha256 digests are supported".into(),
            });
        }
    }
    Ok(parsed)
}

/// The canonical spelling of a reference, as `kiln image ls` shows it and the store keys it:
/// `busybox` → `docker.io/library/busybox:latest`.
///
/// Fails with [`Error::InvalidReference`] on syntax errors.
pub fn normalize_reference(reference: &str) -> Result<String> {
    Ok(parse(reference)?.whole())
}

/// The registry host a reference pulls from (`docker.io` becomes `index.docker.io`).
pub(crate) fn registry_of(reference: &Reference) -> String {
    reference.resolve_registry().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_docker() {
        assert_eq!(
            normalize_reference("busybox").expect("parse"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize_reference("127.0.0.1:5000/a/b:v1").expect("parse"),
            "127.0.0.1:5000/a/b:v1"
        );
        assert_eq!(
            normalize_reference("localhost/kiln/busybox").expect("parse"),
            "localhost/kiln/busybox:latest"
        );
        assert!(normalize_reference("UPPERCASE").is_err());
        assert!(normalize_reference("bad ref!").is_err());
        assert!(normalize_reference("").is_err());
    }
}
