//! V2 session tokens: stateless, so a guest minting tokens in a loop costs no memory.
//!
//! A token is `base64url(expiry_ms ‖ serial ‖ HMAC-SHA256(key, expiry_ms ‖ serial))`, with a
//! 256-bit key drawn from the kernel when the service is created. Without the key a guest
//! cannot forge a token or extend one; the expiry is checked against the caller's clock.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Shortest lifetime a guest may ask for, in seconds.
pub const MIN_TTL_SECONDS: u32 = 1;
/// Longest lifetime a guest may ask for, in seconds (six hours, as EC2 and Firecracker).
pub const MAX_TTL_SECONDS: u32 = 21600;

const KEY_LEN: usize = 32;
const PAYLOAD_LEN: usize = 16;
const TAG_LEN: usize = 32;
const TOKEN_BYTES: usize = PAYLOAD_LEN + TAG_LEN;
/// Anything longer cannot be one of ours; refused before decoding.
const MAX_TOKEN_CHARS: usize = 80;
const BLOCK: usize = 64;

/// The kernel's random source failed; without it tokens would be guessable.
#[derive(Debug, thiserror::Error)]
#[error("cannot read random bytes for MMDS session tokens: {0}")]
pub struct RandomError(#[source] pub std::io::Error);

/// Mints and checks session tokens.
pub(crate) struct TokenAuthority {
    key: [u8; KEY_LEN],
    epoch: Instant,
    serial: u64,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthority")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl TokenAuthority {
    pub(crate) fn new() -> Result<TokenAuthority, RandomError> {
        let mut key = [0u8; KEY_LEN];
        fill_random(&mut key).map_err(RandomError)?;
        Ok(TokenAuthority {
            key,
            epoch: Instant::now(),
            serial: 0,
        })
    }

    /// A token valid for `ttl_seconds` from `now`; the caller has checked the range.
    pub(crate) fn mint(&mut self, ttl_seconds: u32, now: Instant) -> String {
        let expiry = self.millis(now) + u64::from(ttl_seconds) * 1000;
        self.serial = self.serial.wrapping_add(1);
        let mut bytes = [0u8; TOKEN_BYTES];
        bytes[..8].copy_from_slice(&expiry.to_le_bytes());
        bytes[8..PAYLOAD_LEN].copy_from_slice(&self.serial.to_le_bytes());
        let tag = self.tag(&bytes[..PAYLOAD_LEN]);
        bytes[PAYLOAD_LEN..].copy_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// True if `token` was minted here and has not expired at `now`.
    pub(crate) fn is_valid(&self, token: &str, now: Instant) -> bool {
        if token.len() > MAX_TOKEN_CHARS {
            return false;
        }
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(token.as_bytes()) else {
            return false;
        };
        if bytes.len() != TOKEN_BYTES {
            return false;
        }
        let (payload, tag) = bytes.split_at(PAYLOAD_LEN);
        let expected = self.tag(payload);
        // Constant-time comparison: the guest must learn nothing from timing.
        let diff = expected
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return false;
        }
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&payload[..8]);
        u64::from_le_bytes(expiry) > self.millis(now)
    }

    fn millis(&self, now: Instant) -> u64 {
        let elapsed: Duration = now.saturating_duration_since(self.epoch);
        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX / 2)
    }

    /// HMAC-SHA256 (RFC 2104) of `message` under the authority's key.
    fn tag(&self, message: &[u8]) -> [u8; TAG_LEN] {
        let mut ipad = [0x36u8; BLOCK];
        let mut opad = [0x5cu8; BLOCK];
        for (i, byte) in self.key.iter().enumerate() {
            ipad[i] ^= byte;
            opad[i] ^= byte;
        }
        let inner = Sha256::new()
            .chain_update(ipad)
            .chain_update(message)
            .finalize();
        let outer = Sha256::new()
            .chain_update(opad)
            .chain_update(inner)
            .finalize();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&outer);
        tag
    }
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`), retrying on interruption.
pub(crate) fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a live, writable buffer of exactly `rest.len()` bytes, and
        // getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_and_resist_tampering() {
        let mut authority = TokenAuthority::new().expect("getrandom");
        let now = Instant::now();
        let token = authority.mint(2, now);
        assert!(token.len() <= MAX_TOKEN_CHARS);
        assert!(authority.is_valid(&token, now));
        assert!(authority.is_valid(&token, now + Duration::from_millis(1999)));
        assert!(!authority.is_valid(&token, now + Duration::from_secs(2)));

        // Flip one character: the tag no longer matches.
        let mut chars: Vec<char> = token.chars().collect();
        chars[3] = if chars[3] == 'A' { 'B' } else { 'A' };
        let forged: String = chars.into_iter().collect();
        assert!(!authority.is_valid(&forged, now));

        // Another authority (another VM) does not accept it.
        let other = TokenAuthority::new().expect("getrandom");
        assert!(!other.is_valid(&token, now));

        for junk in ["", "foo", "!!!!", &"A".repeat(64), &"A".repeat(500)] {
            assert!(!authority.is_valid(junk, now));
        }
        assert_ne!(authority.mint(60, now), authority.mint(60, now));
    }
}
