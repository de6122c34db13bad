//! The microVM metadata service (MMDS), wire-compatible with Firecracker's.
//!
//! Three layers, each usable on its own:
//! - [`Mmds`]: the JSON document the host manages through the API (`PUT`/`PATCH`/`GET /mmds`),
//!   the version chosen by `PUT /mmds/config`, and the V2 session-token authority. It also
//!   answers raw guest HTTP requests ([`Mmds::handle_http`]).
//! - [`MmdsNetworkStack`]: a tiny ARP/IPv4/TCP endpoint, one per interface listed in the
//!   config, that lives inside virtio-net's TX path. It takes the guest's Ethernet frames for
//!   the MMDS address and produces the frames that answer them, so metadata traffic never
//!   reaches the tap and needs no host networking.
//! - [`MmdsConfig`]: the `PUT /mmds/config` body and its validation.
//!
//! # Wiring it into a VMM
//! - API: `PUT /mmds` → [`Mmds::put`], `PATCH /mmds` → [`Mmds::patch`], `GET /mmds` →
//!   [`Mmds::data`] (errors are [`StoreError`], 400 with its text as `fault_message`);
//!   `PUT /mmds/config` → parse [`MmdsConfig`], [`MmdsConfig::validate`], then
//!   [`Mmds::apply_config`] and one [`MmdsNetworkStack`] per listed interface on
//!   [`MmdsConfig::ipv4`].
//! - virtio-net's frame hook: `handle_tx` → [`MmdsNetworkStack::handle_frame`], `next_rx` →
//!   [`MmdsNetworkStack::next_frame`]. Answers carry complete checksums, so they go to the
//!   guest with an all-zero virtio-net header.
//! - Timers: retransmissions, zero-window probes and idle clean-up need a clock. The stack
//!   runs due timers itself whenever it is handed a frame or asked for one, which suffices
//!   on a lossless path. For the rest, arm a timerfd (absolute, `CLOCK_MONOTONIC`, the clock
//!   behind [`Instant`]) to [`MmdsNetworkStack::next_timeout`] after each TX batch; when it
//!   fires call [`MmdsNetworkStack::on_timer`], drain `next_frame` into the RX queue and
//!   re-arm.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Instant;
//! use mmds::{Mmds, MmdsConfig, MmdsNetworkStack, DEFAULT_MAC};
//!
//! let mmds = Arc::new(Mutex::new(Mmds::new(mmds::DEFAULT_SIZE_LIMIT).expect("getrandom")));
//! mmds.lock().unwrap().put(serde_json::json!({"latest": {"meta-data": {}}})).unwrap();
//! let config: MmdsConfig =
//!     serde_json::from_str(r#"{"version":"V2","network_interfaces":["eth0"]}"#).unwrap();
//! config.validate(|id| id == "eth0").unwrap();
//! mmds.lock().unwrap().apply_config(&config);
//!
//! let mut stack = MmdsNetworkStack::new(DEFAULT_MAC, config.ipv4(), mmds.clone());
//!
//! // TX path: `true` means "consumed, keep it from the tap".
//! # let frame = [0u8; 60];
//! let consumed = stack.handle_frame(&frame);
//! // After every TX batch, and after `on_timer`: move answers to the guest's RX queue.
//! while let Some(reply) = stack.next_frame() { /* queue `reply` for the guest */ }
//! // Timer: re-arm to `next_timeout()`; on expiry run the due timers and drain again.
//! if let Some(deadline) = stack.next_timeout() {
//!     if deadline <= Instant::now() {
//!         stack.on_timer(Instant::now());
//!     }
//! }
//! # let _ = consumed;
//! ```

mod config;
mod http;
mod net;
mod store;
mod token;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde_json::Value;

pub use config::{ConfigError, MmdsConfig, MmdsVersion, DEFAULT_IPV4};
pub use http::MAX_REQUEST_SIZE;
pub use net::{MmdsNetworkStack, StackLimits, DEFAULT_MAC};
pub use store::{merge_patch, DataStore, StoreError, DEFAULT_SIZE_LIMIT};
pub use token::{RandomError, MAX_TTL_SECONDS, MIN_TTL_SECONDS};

use token::TokenAuthority;

/// The service state one VM shares between its API handler and its interfaces' stacks
/// (behind `Arc<Mutex<Mmds>>`).
#[derive(Debug)]
pub struct Mmds {
    store: DataStore,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: TokenAuthority,
}

impl Mmds {
    /// An empty V1 service whose document may take up to `size_limit` bytes serialized
    /// (Firecracker's `--mmds-size-limit`, default [`DEFAULT_SIZE_LIMIT`]).
    ///
    /// Fails only if the kernel cannot supply the token key's randomness.
    pub fn new(size_limit: usize) -> Result<Mmds, RandomError> {
        Ok(Mmds {
            store: DataStore::new(size_limit),
            version: MmdsVersion::V1,
            imds_compat: false,
            tokens: TokenAuthority::new()?,
        })
    }

    /// Replaces the document (`PUT /mmds`).
    pub fn put(&mut self, value: Value) -> Result<(), StoreError> {
        self.store.put(value)
    }

    /// Merges an RFC 7396 patch into the document (`PATCH /mmds`).
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        self.store.patch(patch)
    }

    /// The document (`GET /mmds`); `{}` before the first `put`.
    pub fn data(&self) -> &Value {
        self.store.get()
    }

    /// The size limit, for capping API request bodies to match.
    pub fn size_limit(&self) -> usize {
        self.store.limit()
    }

    /// Adopts the guest-visible parts of a validated `PUT /mmds/config` (version, IMDS
    /// compatibility); the address and interfaces go to the network stacks.
    pub fn apply_config(&mut self, config: &MmdsConfig) {
        self.version = config.version;
        self.imds_compat = config.imds_compat;
    }

    /// The session model in force.
    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    /// Whether reads always answer in IMDS text.
    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// Answers one raw guest HTTP request as of `now` and returns the raw response; an
    /// incomplete request is answered with 400. The network stack uses the same logic, so
    /// this also serves other transports (and tests).
    pub fn handle_http(&mut self, request: &[u8], now: Instant) -> Vec<u8> {
        match http::serve(request, now, || &mut *self) {
            http::Parsed::Done { response, .. } => response.into_bytes(),
            http::Parsed::Incomplete => http::truncated_request().into_bytes(),
        }
    }
}

/// Locks the shared service even if a panicking holder poisoned the mutex: the data is a JSON
/// document that is only ever replaced whole, so it is never left half-updated.
pub(crate) fn lock(mmds: &Mutex<Mmds>) -> MutexGuard<'_, Mmds> {
    mmds.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn body(response: &[u8]) -> (u16, String) {
        let text = String::from_utf8_lossy(response).to_string();
        let status = text[9..12].parse().expect("status code");
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    #[test]
    fn shared_across_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Mmds>();
        assert_send::<MmdsNetworkStack>();
    }

    #[test]
    fn hostile_requests_never_panic() {
        let mut mmds = Mmds::new(DEFAULT_SIZE_LIMIT).expect("mmds");
        let now = Instant::now();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let alphabet = b"GETPU /:\r\n\r\nHTTP/1.01aA-_?#%~\x00\xff";
        for round in 0..5000 {
            let len = (round * 7) % 300;
            let request: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            let response = mmds.handle_http(&request, now);
            assert!(response.starts_with(b"HTTP/1."));
        }
        let crlfs = b"\r\n".repeat(5000);
        assert!(mmds.handle_http(&crlfs, now).starts_with(b"HTTP/1.1 413"));
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', 10_000));
        long.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        assert!(mmds.handle_http(&long, now).starts_with(b"HTTP/1.1 413"));
    }

    #[test]
    fn handle_http_v1_and_v2() {
        let mut mmds = Mmds::new(DEFAULT_SIZE_LIMIT).expect("mmds");
        mmds.put(json!({"latest": {"meta-data": {"ami-id": "ami-1"}}}))
            .expect("put");
        let now = Instant::now();
        let get = b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n";
        assert_eq!(body(&mmds.handle_http(get, now)), (200, "ami-1".into()));
        // An incomplete request is a bad one when nothing more can arrive.
        assert_eq!(body(&mmds.handle_http(b"GET / HTTP/1.1\r\n", now)).0, 400);

        let config: MmdsConfig =
            serde_json::from_str(r#"{"version":"V2","network_interfaces":["eth0"]}"#)
                .expect("config");
        mmds.apply_config(&config);
        assert_eq!(body(&mmds.handle_http(get, now)).0, 401);
        let put = b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n";
        let raw = mmds.handle_http(put, now);
        assert!(String::from_utf8_lossy(&raw).contains("X-metadata-token-ttl-seconds: 5\r\n"));
        let (status, token) = body(&raw);
        assert_eq!(status, 200);
        let with_token =
            format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
        assert_eq!(
            body(&mmds.handle_http(with_token.as_bytes(), now)),
            (200, "ami-1".into())
        );
        let later = now + Duration::from_secs(5);
        assert_eq!(
            body(&mmds.handle_http(with_token.as_bytes(), later)),
            (401, "MMDS token not valid.".into())
        );
    }
}
