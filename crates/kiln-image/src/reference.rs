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
    let parsed: Reference = match parse_plain(trimmed) {
        Some(parsed) => parsed,
        None => trimmed
            .parse()
            .map_err(|e: oci_client::ParseError| Error::InvalidReference {
                reference: reference.to_string(),
                reason: e.to_string(),
            })?,
    };
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

/// Docker Hub's name in references, and the namespace of its official images.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const OFFICIAL: &str = "library/";
/// Longest repository name the reference grammar allows.
const NAME_MAX: usize = 255;

/// The reference, for the plain ASCII spellings nearly everyone types (`busybox`,
/// `host:5000/a/b:v1`, `repo@sha256:<hex>`), parsed without oci-spec's parser, whose
/// Unicode-aware regular expression takes ~35 ms to compile, once per process: most of a
/// `kiln image pull` of a small image. `None` for anything else (other digest algorithms,
/// non-ASCII tags, invalid input), which then goes to oci-spec's parser.
///
/// Accepts only what that grammar accepts, and builds the same value: the domain split and
/// `library/` rules are Docker's (`split_domain` in distribution's `normalize.go`); the unit
/// tests compare the two parsers on a corpus.
fn parse_plain(s: &str) -> Option<Reference> {
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => {
            let hex = digest.strip_prefix("sha256:")?;
            let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
            if hex.len() != 64 || !hex.bytes().all(lower_hex) {
                return None;
            }
            (rest, Some(digest))
        }
        None => (s, None),
    };
    // A ':' after the last '/' starts the tag; one before it is a registry's port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].find(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let tag_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let first_ok = tag.bytes().next().is_some_and(tag_byte);
        let rest_ok = tag.bytes().all(|b| tag_byte(b) || b == b'.' || b == b'-');
        if !first_ok || !rest_ok || tag.len() > 128 {
            return None;
        }
    }
    let mut parts = name.split('/');
    let first = parts.next()?;
    let has_more = name.contains('/');
    if !(path_component_ok(first) || (has_more && domain_ok(first))) {
        return None;
    }
    if !parts.all(path_component_ok) {
        return None;
    }
    let (mut registry, mut repository) = match name.split_once('/') {
        Some((left, right)) if left.contains(['.', ':']) || left == "localhost" => {
            (left.to_string(), right.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    if registry == DOCKER_HUB_LEGACY {
        registry = DOCKER_HUB.to_string();
    }
    if registry == DOCKER_HUB && !repository.contains('/') {
        repository = format!("{OFFICIAL}{repository}");
    }
    if repository.len() > NAME_MAX {
        return None;
    }
    Some(match (tag, digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").into()),
    })
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or any number of `-`.
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Host name labels (`[a-zA-Z0-9]`, inner `-`) joined by `.`, then an optional `:port`.
fn domain_ok(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (d, None),
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
        })
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
        assert!(normalize_reference("Test:5000/repo").is_ok());
        assert!(normalize_reference("bad ref!").is_err());
        assert!(normalize_reference("").is_err());
    }

    /// The fast parser agrees with oci-spec's wherever it answers, and answers for the
    /// everyday spellings.
    #[test]
    fn plain_parser_matches_oci_spec() {
        let hex = "f".repeat(64);
        let long = "a".repeat(300);
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "docker.io/busybox".into(),
            "index.docker.io/library/busybox:latest".into(),
            "test.com:tag".into(),
            "test.com:5000".into(),
            "test.com/repo:tag".into(),
            "test:5000/repo".into(),
            "test:5000/repo:tag".into(),
            format!("test:5000/repo@sha256:{hex}"),
            format!("test:5000/repo:tag@sha256:{hex}"),
            format!("repo@sha256:{}", "F".repeat(64)),
            format!("repo@sha512:{}", "f".repeat(128)),
            "lowercase:Uppercase".into(),
            "sub-dom1.foo.com/bar/baz/quux:some-long-tag".into(),
            "b.gcr.io/test.example.com/my-app:test.example.com".into(),
            "xn--n3h.com/myimage:xn--n3h.com".into(),
            "foo_bar.com:8080".into(),
            "foo/foo_bar.com:8080".into(),
            "foo_bar.com/x".into(),
            "opensuse/leap:15.3".into(),
            "localhost/kiln/busybox".into(),
            "localhost:5000/a".into(),
            "127.0.0.1:5000/a/b:v1".into(),
            "[::1]:5000/a".into(),
            "a__b/c--d/e.f/g_h".into(),
            "a___b".into(),
            "a._b".into(),
            "a..b".into(),
            "-a".into(),
            "a-".into(),
            "UPPERCASE".into(),
            "Test:5000/repo".into(),
            "-host/repo".into(),
            "host-/repo".into(),
            "host:/repo".into(),
            "host:50a0/repo".into(),
            "repo:".into(),
            "repo:-tag".into(),
            "repo:.tag".into(),
            format!("repo:{}", "t".repeat(128)),
            format!("repo:{}", "t".repeat(129)),
            "repo:tâg".into(),
            "bad ref!".into(),
            ":justtag".into(),
            "repo@sha256:abc".into(),
            "a//b".into(),
            "a/".into(),
            "/a".into(),
            long.clone(),
            format!("host.io/{long}"),
            format!("{}/x", "a".repeat(250)),
        ];
        let mut answered = 0;
        for case in &cases {
            let slow: Result<Reference, _> = case.parse();
            if let Some(fast) = parse_plain(case) {
                answered += 1;
                let slow = slow.unwrap_or_else(|e| panic!("{case:?}: oci-spec refuses ({e})"));
                assert_eq!(fast, slow, "{case:?}");
                assert_eq!(fast.whole(), slow.whole(), "{case:?}");
            }
        }
        assert!(answered >= 20, "only {answered} answered");
        for everyday in ["busybox", "127.0.0.1:5000/a/b:v1", "ghcr.io/o/r:1.2-x"] {
            assert!(parse_plain(everyday).is_some(), "{everyday}");
        }
    }
}
