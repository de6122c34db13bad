//! virtio-net on a host tap device: one RX and one TX queue driven from the event loop (the tap
//! fd and the queue doorbells are watched; nothing polls), virtio-net headers passed through
//! so the host kernel does checksum and segmentation offload, optional rate limiters, and a
//! hook through which the metadata service answers frames addressed to it.

pub mod tap;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use self::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO, VNET_HDR_SIZE};
use super::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::config::RateLimiterConfig;
use crate::devices::bus::lock;
use crate::metrics::NetMetrics;
use crate::rate_limiter::RateLimiter;

/// Virtio device type of a network device.
pub const TYPE_NET: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most descriptors a transmitted frame may use.
const MAX_TX_DESCRIPTORS: usize = 64;
/// Largest frame with its header: 64 KiB of TSO payload plus headers.
pub const MAX_FRAME: usize = 65562;
/// Most frame-handler answers held by the device. The handler bounds what it keeps (its ARP
/// and reset queues, each connection's send window), but every answer moved out of it makes
/// room for another: a guest that keeps asking and never posts RX buffers would otherwise
/// grow this queue without end. The rest is taken when buffers come.
const MAX_HANDLER_RX: usize = 64;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_UFO: u64 = 1 << 10;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_UFO: u64 = 1 << 14;
const F_RING_EVENT_IDX: u64 = 1 << 29;

const RX: usize = 0;
const TX: usize = 1;

/// Frames the VMM itself answers (the metadata service) instead of the tap.
pub trait FrameHandler: Send {
    /// Offers a frame the guest sent (Ethernet, without the virtio-net header); returns true
    /// if it was for this handler and must not reach the tap.
    fn handle_tx(&mut self, frame: &[u8]) -> bool;
    /// The next frame the handler wants delivered to the guest.
    fn next_rx(&mut self) -> Option<Vec<u8>>;
    /// When the handler next needs [`FrameHandler::on_timer`] (retransmissions, timeouts).
    fn next_timeout(&self) -> Option<std::time::Instant> {
        None
    }
    /// Runs the handler's due timers.
    fn on_timer(&mut self, _now: std::time::Instant) {}
}

/// Why a network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    /// An eventfd could not be created.
    #[error("cannot create a network eventfd: {0}")]
    EventFd(std::io::Error),
    /// A rate limiter could not be created.
    #[error(transparent)]
    RateLimiter(#[from] crate::rate_limiter::RateLimiterError),
}

struct Active {
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
}

/// A network interface.
pub struct Net {
    id: String,
    tap: Tap,
    mac: Option<[u8; 6]>,
    acked_features: u64,
    queue_events: [EventFd; 2],
    active: Option<Active>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// A frame read from the tap (with header) that no guest buffer has taken yet.
    rx_pending: Option<Vec<u8>>,
    /// Frames from the frame handler waiting for guest buffers (without header), at most
    /// [`MAX_HANDLER_RX`].
    handler_rx: VecDeque<Vec<u8>>,
    /// Frames were taken from the handler since its timer was last armed (taking a segment
    /// can set a retransmission deadline).
    handler_timer_stale: bool,
    tap_readable: bool,
    handler: Option<Arc<Mutex<dyn FrameHandler>>>,
    /// Wakes the event loop for the frame handler's timers.
    handler_timer: vmm_sys_util::timerfd::TimerFd,
    metrics: Arc<NetMetrics>,
}

impl Net {
    /// An interface `id` on the host tap `host_dev_name`.
    pub fn new(
        id: &str,
        host_dev_name: &str,
        mac: Option<[u8; 6]>,
        rx_rate_limiter: Option<&RateLimiterConfig>,
        tx_rate_limiter: Option<&RateLimiterConfig>,
        metrics: Arc<NetMetrics>,
    ) -> Result<Net, NetError> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Net {
            id: id.to_string(),
            tap: Tap::open(host_dev_name)?,
            mac,
            acked_features: 0,
            queue_events: [eventfd()?, eventfd()?],
            active: None,
            rx_limiter: RateLimiter::new(rx_rate_limiter)?,
            tx_limiter: RateLimiter::new(tx_rate_limiter)?,
            rx_pending: None,
            handler_rx: VecDeque::new(),
            handler_timer_stale: false,
            tap_readable: true,
            handler: None,
            handler_timer: crate::rate_limiter::nonblocking_timer()
                .map_err(|e| NetError::EventFd(std::io::Error::from_raw_os_error(e.errno())))?,
            metrics,
        })
    }

    /// Routes frames for the metadata service to `handler` instead of the tap.
    pub fn set_frame_handler(&mut self, handler: Arc<Mutex<dyn FrameHandler>>) {
        self.handler = Some(handler);
    }

    /// Applies new rate limits (PATCH /network-interfaces).
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) {
        if let Some(rx) = rx {
            self.rx_limiter.update(rx);
        }
        if let Some(tx) = tx {
            self.tx_limiter.update(tx);
        }
        self.process_tx();
        self.process_rx();
    }

    /// The interface id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn offload_flags(&self) -> u32 {
        let f = self.acked_features;
        let mut flags = 0;
        if f & F_GUEST_CSUM != 0 {
            flags |= TUN_F_CSUM;
        }
        if f & F_GUEST_TSO4 != 0 {
            flags |= TUN_F_TSO4;
        }
        if f & F_GUEST_TSO6 != 0 {
            flags |= TUN_F_TSO6;
        }
        if f & F_GUEST_UFO != 0 {
            flags |= TUN_F_UFO;
        }
        flags
    }

    fn mark_broken(&mut self, reason: &str) {
        tracing::warn!(
            "virtio-net {}: driver error, device needs reset: {reason}",
            self.id
        );
        self.metrics.inc_invalid();
        if let Some(active) = self.active.take() {
            active.interrupt.mark_broken();
        }
    }

    /// Sends every frame the guest queued (to the tap, or to the frame handler).
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let memory = &active.memory;
        let queue = &mut active.queues[TX];
        let mut completed = false;
        let mut frame = Vec::with_capacity(MAX_FRAME);
        loop {
            let next = match next_chain(queue, memory) {
                Ok(next) => next,
                Err(reason) => {
                    self.mark_broken(&reason);
                    return;
                }
            };
            let Some(chain) = next else { break };
            let head = chain.head_index();
            frame.clear();
            // A frame needs a handful of descriptors (Linux uses at most 19); a chain as long as
            // the ring is a descriptor loop, not a frame.
            let too_long = chain.clone().nth(MAX_TX_DESCRIPTORS).is_some();
            // A descriptor whose `next` points past the ring ends the chain early when iterated:
            // the frame would go out cut short, so it is refused instead.
            let queue_size = queue.size();
            let cut_short = chain
                .clone()
                .take(MAX_TX_DESCRIPTORS)
                .any(|d| d.has_next() && d.next() >= queue_size);
            let read = chain
                .reader(memory)
                .map_err(|e| e.to_string())
                .and_then(|mut reader| {
                    if too_long {
                        return Err(format!("more than {MAX_TX_DESCRIPTORS} descriptors"));
                    }
                    if cut_short {
                        return Err("a descriptor's next index is outside the ring".into());
                    }
                    if reader.available_bytes() > MAX_FRAME {
                        return Err("frame larger than 64 KiB".into());
                    }
                    reader.read_to_end(&mut frame).map_err(|e| e.to_string())
                });
            let valid = match read {
                Ok(_) if frame.len() > VNET_HDR_SIZE => true,
                _ => {
                    self.metrics.inc_invalid();
                    false
                }
            };
            // Both directions count frame bytes, without the virtio-net header.
            if valid
                && !self
                    .tx_limiter
                    .consume((frame.len() - VNET_HDR_SIZE) as u64)
            {
                self.metrics.inc_tx_throttled();
                queue.go_to_previous_position();
                break;
            }
            if valid {
                let for_handler = self
                    .handler
                    .as_ref()
                    .is_some_and(|h| lock(h).handle_tx(&frame[VNET_HDR_SIZE..]));
                if for_handler {
                    self.metrics.inc_mmds_frames();
                } else {
                    match self.tap.write_frame(&frame) {
                        Ok(_) => self.metrics.add_tx((frame.len() - VNET_HDR_SIZE) as u64),
                        Err(e) => {
                            tracing::debug!("virtio-net {}: tap write failed: {e}", self.id);
                            self.metrics.inc_tx_dropped();
                        }
                    }
                }
            }
            if let Err(e) = queue.add_used(memory, head, 0) {
                let reason = format!("tx used ring: {e}");
                self.mark_broken(&reason);
                return;
            }
            completed = true;
        }
        if completed && queue.needs_notification(memory).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        self.collect_handler_frames();
    }

    /// Takes the frame handler's answers for the RX side, up to [`MAX_HANDLER_RX`]; true if
    /// it took any.
    fn pull_handler_frames(&mut self) -> bool {
        let Some(handler) = &self.handler else {
            return false;
        };
        let mut handler = lock(handler);
        let mut pulled = false;
        while self.handler_rx.len() < MAX_HANDLER_RX {
            let Some(frame) = handler.next_rx() else {
                break;
            };
            self.handler_rx.push_back(frame);
            pulled = true;
        }
        pulled
    }

    /// Takes the frame handler's answers for the RX side and re-arms its timer.
    fn collect_handler_frames(&mut self) {
        self.pull_handler_frames();
        self.arm_handler_timer();
    }

    /// Arms the frame handler's timer for its next deadline.
    fn arm_handler_timer(&mut self) {
        self.handler_timer_stale = false;
        let Some(handler) = &self.handler else {
            return;
        };
        let handler = lock(handler);
        match handler.next_timeout() {
            Some(at) => {
                let wait = at
                    .saturating_duration_since(std::time::Instant::now())
                    .max(std::time::Duration::from_millis(1));
                if let Err(e) = self.handler_timer.reset(wait, None) {
                    tracing::warn!("virtio-net {}: cannot arm the MMDS timer: {e}", self.id);
                }
            }
            None => {
                let _ = self.handler_timer.clear();
            }
        }
    }

    /// The next frame for the guest: a metadata-service answer first, else from the tap.
    fn next_rx_frame(&mut self) -> Option<Vec<u8>> {
        if let Some(frame) = self.rx_pending.take() {
            return Some(frame);
        }
        // Answers the handler still holds come once the ones taken are delivered.
        if self.handler_rx.is_empty() && self.pull_handler_frames() {
            self.handler_timer_stale = true;
        }
        if let Some(payload) = self.handler_rx.pop_front() {
            let mut frame = vec![0u8; VNET_HDR_SIZE];
            frame.extend_from_slice(&payload);
            return Some(frame);
        }
        if !self.tap_readable {
            return None;
        }
        let mut frame = vec![0u8; MAX_FRAME];
        match self.tap.read_frame(&mut frame) {
            Ok(n) if n > VNET_HDR_SIZE => {
                frame.truncate(n);
                Some(frame)
            }
            Ok(_) => None,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::debug!("virtio-net {}: tap read failed: {e}", self.id);
                }
                self.tap_readable = false;
                None
            }
        }
    }

    /// Moves frames into guest RX buffers until frames or buffers run out.
    fn process_rx(&mut self) {
        if self.active.is_none() {
            return;
        }
        let mut completed = false;
        while let Some(mut frame) = self.next_rx_frame() {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let memory = &active.memory;
            let queue = &mut active.queues[RX];
            let next = match next_chain(queue, memory) {
                Ok(next) => next,
                Err(reason) => {
                    self.mark_broken(&reason);
                    return;
                }
            };
            let Some(chain) = next else {
                // No buffer: keep the frame until the guest posts one.
                self.rx_pending = Some(frame);
                break;
            };
            // Charged only once a buffer is there, so a waiting frame is never charged twice.
            if !self
                .rx_limiter
                .consume((frame.len() - VNET_HDR_SIZE) as u64)
            {
                queue.go_to_previous_position();
                self.metrics.inc_rx_throttled();
                self.rx_pending = Some(frame);
                break;
            }
            let head = chain.head_index();
            // num_buffers = 1: without mergeable buffers each frame fills one chain.
            frame[10] = 1;
            frame[11] = 0;
            let written = chain
                .writer(memory)
                .map_err(|e| e.to_string())
                .and_then(|mut w| {
                    if w.available_bytes() < frame.len() {
                        return Err(format!(
                            "buffer of {} bytes for a {}-byte frame",
                            w.available_bytes(),
                            frame.len()
                        ));
                    }
                    w.write_all(&frame).map_err(|e| e.to_string())?;
                    Ok(w.bytes_written())
                });
            let used = match written {
                Ok(n) => {
                    self.metrics.add_rx((frame.len() - VNET_HDR_SIZE) as u64);
                    n as u32
                }
                Err(e) => {
                    tracing::debug!("virtio-net {}: frame dropped: {e}", self.id);
                    self.metrics.inc_rx_dropped();
                    0
                }
            };
            if let Err(e) = queue.add_used(memory, head, used) {
                let reason = format!("rx used ring: {e}");
                self.mark_broken(&reason);
                return;
            }
            completed = true;
        }
        if self.handler_timer_stale {
            self.arm_handler_timer();
        }
        if let Some(active) = self.active.as_mut() {
            if completed
                && active.queues[RX]
                    .needs_notification(&active.memory)
                    .unwrap_or(true)
            {
                active.interrupt.signal_used_queue();
            }
        }
    }
}

/// The next available chain. When the ring looks empty, notifications are re-enabled first
/// (with EVENT_IDX this publishes how far the device has read, without which the driver stops
/// ringing the doorbell) and the ring is checked once more for a buffer that raced with it.
fn next_chain<'m>(
    queue: &mut Queue,
    memory: &'m GuestMemoryMmap,
) -> Result<Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>>, String> {
    loop {
        match queue.iter(memory) {
            Ok(mut iter) => {
                if let Some(chain) = iter.next() {
                    return Ok(Some(chain));
                }
            }
            Err(e) => return Err(format!("ring: {e}")),
        }
        match queue.enable_notification(memory) {
            Ok(true) => continue,
            Ok(false) => return Ok(None),
            Err(e) => return Err(format!("notification: {e}")),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_UFO
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_UFO
            | F_RING_EVENT_IDX;
        if self.mac.is_some() {
            features |= F_MAC;
        }
        features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.mac.unwrap_or([0; 6]), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            "virtio-net {}: ignored config write at {offset:#x}",
            self.id
        );
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::BadQueue(format!(
                "virtio-net needs 2 queues, got {}",
                queues.len()
            )));
        }
        let event_idx = self.acked_features & F_RING_EVENT_IDX != 0;
        for queue in &mut queues {
            queue.set_event_idx(event_idx);
        }
        if let Err(e) = self.tap.set_offload(self.offload_flags()) {
            tracing::warn!("virtio-net {}: {e}", self.id);
        }
        self.active = Some(Active {
            memory,
            queues,
            interrupt,
        });
        let _ = self.queue_events[RX].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.rx_pending = None;
        self.handler_rx.clear();
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let tap_events = EventSet::IN | EventSet::EDGE_TRIGGERED;
        let watches = [
            ops.add(Events::new(&self.queue_events[RX], EventSet::IN)),
            ops.add(Events::new(&self.queue_events[TX], EventSet::IN)),
            ops.add(Events::new_raw(self.tap.as_raw_fd(), tap_events)),
            ops.add(Events::new(self.rx_limiter.timer(), EventSet::IN)),
            ops.add(Events::new(self.tx_limiter.timer(), EventSet::IN)),
            ops.add(Events::new(&self.handler_timer, EventSet::IN)),
        ];
        for result in watches {
            if let Err(e) = result {
                tracing::error!(
                    "virtio-net {}: cannot watch an event source: {e:?}",
                    self.id
                );
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_events[RX].as_raw_fd() {
            let _ = self.queue_events[RX].read();
        } else if fd == self.queue_events[TX].as_raw_fd() {
            let _ = self.queue_events[TX].read();
            if !self.tx_limiter.is_blocked() {
                self.process_tx();
            }
        } else if fd == self.tap.as_raw_fd() {
            self.tap_readable = true;
        } else if fd == self.rx_limiter.timer().as_raw_fd() {
            self.rx_limiter.on_timer();
        } else if fd == self.tx_limiter.timer().as_raw_fd() {
            self.tx_limiter.on_timer();
            self.process_tx();
        } else if fd == self.handler_timer.as_raw_fd() {
            let _ = self.handler_timer.wait();
            if let Some(handler) = &self.handler {
                lock(handler).on_timer(std::time::Instant::now());
            }
            self.collect_handler_frames();
        }
        if !self.rx_limiter.is_blocked() {
            self.process_rx();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::test_util::queue_at;

    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    const GUEST_MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 2];
    const MMDS_IP: [u8; 4] = [169, 254, 169, 254];

    /// Creates the persistent tap `name` in this thread's network namespace.
    fn create_tap(name: &str) {
        // SAFETY: open() of a NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(
            fd >= 0,
            "open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor we just opened and own alone.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut request = [0u8; 40];
        request[..name.len()].copy_from_slice(name.as_bytes());
        request[16..18].copy_from_slice(&(0x0002i16 | 0x1000).to_ne_bytes());
        // SAFETY: TUNSETIFF reads a 40-byte ifreq, which `request` is.
        let created = unsafe { libc::ioctl(file.as_raw_fd(), 0x4004_54ca, request.as_mut_ptr()) };
        assert_eq!(created, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let persist = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
        assert_eq!(
            persist,
            0,
            "TUNSETPERSIST: {}",
            std::io::Error::last_os_error()
        );
    }

    struct Mmds(mmds::MmdsNetworkStack);

    impl FrameHandler for Mmds {
        fn handle_tx(&mut self, frame: &[u8]) -> bool {
            self.0.handle_frame(frame)
        }

        fn next_rx(&mut self) -> Option<Vec<u8>> {
            self.0.next_frame()
        }
    }

    /// A virtio-net header and an ARP request "who has 169.254.169.254".
    fn arp_request() -> Vec<u8> {
        let mut frame = vec![0u8; VNET_HDR_SIZE];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&0x0806u16.to_be_bytes());
        frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&[10, 0, 0, 2]);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&MMDS_IP);
        frame
    }

    #[test]
    fn a_guest_that_posts_no_rx_buffers_cannot_grow_the_metadata_backlog() {
        // The tap lives in a network namespace of this thread's own.
        let outcome = std::thread::spawn(|| {
            // SAFETY: unshare() only changes this thread's namespaces.
            let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(unshared, 0, "unshare: {}", std::io::Error::last_os_error());
            create_tap("kilntest0");
            let mut net = Net::new(
                "eth0",
                "kilntest0",
                Some(GUEST_MAC),
                None,
                None,
                Arc::default(),
            )
            .expect("net device");
            let store = Arc::new(Mutex::new(mmds::Mmds::new(1 << 20).expect("mmds")));
            net.set_frame_handler(Arc::new(Mutex::new(Mmds(mmds::MmdsNetworkStack::new(
                mmds::DEFAULT_MAC,
                std::net::Ipv4Addr::from(MMDS_IP),
                store,
            )))));

            let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)])
                .expect("guest memory");
            // RX: a valid ring the guest never puts a buffer in. TX: one descriptor with the
            // ARP request, offered again and again.
            let rx = queue_at(&memory, 0x1_0000, QUEUE_SIZE);
            let tx = queue_at(&memory, 0x2_0000, QUEUE_SIZE);
            let frame = arp_request();
            memory
                .write_slice(&frame, GuestAddress(0x8_0000))
                .expect("frame");
            let mut descriptor = [0u8; 16];
            descriptor[..8].copy_from_slice(&0x8_0000u64.to_le_bytes());
            descriptor[8..12].copy_from_slice(&(frame.len() as u32).to_le_bytes());
            memory
                .write_slice(&descriptor, GuestAddress(0x2_0000))
                .expect("descriptor");
            let irq = EventFd::new(libc::EFD_NONBLOCK).expect("irqfd");
            net.set_acked_features(VIRTIO_F_VERSION_1);
            net.activate(
                memory.clone(),
                vec![rx, tx],
                Arc::new(VirtioInterrupt::new(irq)),
            )
            .expect("activate");

            // One request per doorbell: each is answered (the stack keeps one ARP reply at a
            // time), and the answer has to wait for an RX buffer.
            let mut avail_idx: u16 = 0;
            for _ in 0..2000 {
                let slot = 0x2_1004 + u64::from(avail_idx % QUEUE_SIZE) * 2;
                memory.write_obj(0u16, GuestAddress(slot)).expect("ring");
                avail_idx = avail_idx.wrapping_add(1);
                memory
                    .write_obj(avail_idx, GuestAddress(0x2_1002))
                    .expect("avail idx");
                net.process_tx();
                net.process_rx();
            }
            let backlog = net.handler_rx.len();
            // Clean up the tap (the namespace goes with the thread).
            drop(net);
            backlog
        })
        .join()
        .expect("test thread");
        assert!(
            outcome <= 64,
            "2000 ARP requests and no RX buffer left {outcome} answers queued in the VMM"
        );
    }
}
