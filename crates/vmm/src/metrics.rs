//! Counters the VMM keeps and writes as JSON lines to the metrics path (`PUT /metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

/// Per-drive counters.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    read_count: AtomicU64,
    read_bytes: AtomicU64,
    write_count: AtomicU64,
    write_bytes: AtomicU64,
    flush_count: AtomicU64,
    io_errors: AtomicU64,
    invalid_requests: AtomicU64,
    rate_limiter_throttled: AtomicU64,
}

impl BlockMetrics {
    /// A request held back by the rate limiter.
    pub fn inc_throttled(&self) {
        self.rate_limiter_throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// A completed read of `bytes`.
    pub fn add_read(&self, bytes: u64) {
        self.read_count.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A completed write of `bytes`.
    pub fn add_write(&self, bytes: u64) {
        self.write_count.fetch_add(1, Ordering::Relaxed);
        self.write_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A flush request.
    pub fn inc_flush(&self) {
        self.flush_count.fetch_add(1, Ordering::Relaxed);
    }

    /// A request answered with an I/O error.
    pub fn inc_error(&self) {
        self.io_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A malformed chain or ring.
    pub fn inc_invalid(&self) {
        self.invalid_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as JSON.
    pub fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "read_count": get(&self.read_count),
            "read_bytes": get(&self.read_bytes),
            "write_count": get(&self.write_count),
            "write_bytes": get(&self.write_bytes),
            "flush_count": get(&self.flush_count),
            "io_errors": get(&self.io_errors),
            "invalid_requests": get(&self.invalid_requests),
            "rate_limiter_throttled": get(&self.rate_limiter_throttled),
        })
    }
}

/// Counters of the vsock device.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    connections: AtomicU64,
    invalid_packets: AtomicU64,
    conn_timeouts: AtomicU64,
}

impl VsockMetrics {
    /// Bytes delivered to the guest.
    pub fn add_rx(&self, bytes: u64) {
        self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes received from the guest.
    pub fn add_tx(&self, bytes: u64) {
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A guest-initiated connection was accepted.
    pub fn inc_connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A malformed packet or ring.
    pub fn inc_invalid(&self) {
        self.invalid_packets.fetch_add(1, Ordering::Relaxed);
    }

    /// A host CONNECT the guest did not answer in time.
    pub fn inc_conn_timeouts(&self) {
        self.conn_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as JSON.
    pub fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "rx_bytes": get(&self.rx_bytes),
            "tx_bytes": get(&self.tx_bytes),
            "connections": get(&self.connections),
            "invalid_packets": get(&self.invalid_packets),
            "conn_timeouts": get(&self.conn_timeouts),
        })
    }
}

/// Counters of the entropy device.
#[derive(Debug, Default)]
pub struct EntropyMetrics {
    bytes: AtomicU64,
    invalid_requests: AtomicU64,
    rate_limiter_throttled: AtomicU64,
}

impl EntropyMetrics {
    /// A request held back by the rate limiter.
    pub fn inc_throttled(&self) {
        self.rate_limiter_throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// Random bytes handed to the guest.
    pub fn add_bytes(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A malformed request.
    pub fn inc_invalid(&self) {
        self.invalid_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as JSON.
    pub fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "bytes": get(&self.bytes),
            "invalid_requests": get(&self.invalid_requests),
            "rate_limiter_throttled": get(&self.rate_limiter_throttled),
        })
    }
}

/// Counters of one network interface.
#[derive(Debug, Default)]
pub struct NetMetrics {
    rx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    rx_dropped: AtomicU64,
    tx_dropped: AtomicU64,
    rx_rate_limiter_throttled: AtomicU64,
    tx_rate_limiter_throttled: AtomicU64,
    mmds_frames: AtomicU64,
    invalid: AtomicU64,
}

impl NetMetrics {
    /// A frame delivered to the guest.
    pub fn add_rx(&self, bytes: u64) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A frame sent by the guest to the tap.
    pub fn add_tx(&self, bytes: u64) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A frame for the guest that did not fit its buffer.
    pub fn inc_rx_dropped(&self) {
        self.rx_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame the tap refused.
    pub fn inc_tx_dropped(&self) {
        self.tx_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Receive held back by the rate limiter.
    pub fn inc_rx_throttled(&self) {
        self.rx_rate_limiter_throttled
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Transmit held back by the rate limiter.
    pub fn inc_tx_throttled(&self) {
        self.tx_rate_limiter_throttled
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A frame answered by the metadata service.
    pub fn inc_mmds_frames(&self) {
        self.mmds_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// A malformed chain or ring.
    pub fn inc_invalid(&self) {
        self.invalid.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as JSON.
    pub fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "rx_bytes": get(&self.rx_bytes),
            "rx_packets": get(&self.rx_packets),
            "tx_bytes": get(&self.tx_bytes),
            "tx_packets": get(&self.tx_packets),
            "rx_dropped": get(&self.rx_dropped),
            "tx_dropped": get(&self.tx_dropped),
            "rx_rate_limiter_throttled": get(&self.rx_rate_limiter_throttled),
            "tx_rate_limiter_throttled": get(&self.tx_rate_limiter_throttled),
            "mmds_frames": get(&self.mmds_frames),
            "invalid": get(&self.invalid),
        })
    }
}
