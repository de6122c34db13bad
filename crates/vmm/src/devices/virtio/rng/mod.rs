//! virtio-rng: fills the guest's buffers with bytes from the host's kernel RNG (getrandom), so
//! a guest has entropy early in boot without waiting for its own pool.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::config::RateLimiterConfig;
use crate::metrics::EntropyMetrics;
use crate::rate_limiter::RateLimiter;

/// Virtio device type of an entropy device.
pub const TYPE_RNG: u32 = 4;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request, however large the guest's buffer.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

struct Active {
    memory: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// The entropy device.
pub struct Entropy {
    queue_events: [EventFd; 1],
    active: Option<Active>,
    limiter: RateLimiter,
    metrics: Arc<EntropyMetrics>,
}

fn host_random(buffer: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        let rest = &mut buffer[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr() as *mut libc::c_void, rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

impl Entropy {
    /// A new entropy device, optionally rate limited.
    pub fn new(
        rate_limiter: Option<&RateLimiterConfig>,
        metrics: Arc<EntropyMetrics>,
    ) -> std::io::Result<Entropy> {
        Ok(Entropy {
            queue_events: [EventFd::new(libc::EFD_NONBLOCK)?],
            active: None,
            limiter: RateLimiter::new(rate_limiter).map_err(std::io::Error::other)?,
            metrics,
        })
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let memory = &active.memory;
        let mut completed = false;
        loop {
            let next = match active.queue.iter(memory) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    tracing::warn!("virtio-rng: driver error, device needs reset: {e}");
                    self.metrics.inc_invalid();
                    active.interrupt.mark_broken();
                    self.active = None;
                    return;
                }
            };
            let Some(chain) = next else {
                break;
            };
            let wanted: u64 = chain
                .clone()
                .filter(|d| d.is_write_only())
                .map(|d| u64::from(d.len()))
                .sum::<u64>()
                .min(MAX_BYTES_PER_REQUEST as u64);
            if !self.limiter.consume(wanted) {
                self.metrics.inc_throttled();
                active.queue.go_to_previous_position();
                break;
            }
            {
                let head = chain.head_index();
                let mut written = 0usize;
                for descriptor in chain {
                    if !descriptor.is_write_only() {
                        self.metrics.inc_invalid();
                        break;
                    }
                    let len = (descriptor.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
                    if len == 0 {
                        break;
                    }
                    let mut bytes = vec![0u8; len];
                    if host_random(&mut bytes).is_err()
                        || memory.write_slice(&bytes, descriptor.addr()).is_err()
                    {
                        self.metrics.inc_invalid();
                        break;
                    }
                    written += len;
                }
                self.metrics.add_bytes(written as u64);
                if let Err(e) = active.queue.add_used(memory, head, written as u32) {
                    tracing::warn!("virtio-rng: used ring: {e}");
                    active.interrupt.mark_broken();
                    self.active = None;
                    return;
                }
                completed = true;
            }
        }
        if completed && active.queue.needs_notification(memory).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Entropy {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let queue = queues
            .into_iter()
            .next()
            .ok_or_else(|| ActivateError::BadQueue("no request queue".into()))?;
        self.active = Some(Active {
            memory,
            queue,
            interrupt,
        });
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Entropy {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events[0], EventSet::IN)) {
            tracing::error!("virtio-rng: cannot watch its queue: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(self.limiter.timer(), EventSet::IN)) {
            tracing::error!("virtio-rng: cannot watch its rate limiter: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.limiter.timer().as_raw_fd() {
            self.limiter.on_timer();
        } else {
            let _ = self.queue_events[0].read();
        }
        if !self.limiter.is_blocked() {
            self.process_queue();
        }
    }
}
