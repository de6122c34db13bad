//! virtio-blk on a host file: read, write, flush and get-id, with read-only drives, sparse
//! files and backing files that can be swapped after boot.

mod request;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, VirtioDevice, VirtioInterrupt, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::config::{CacheType, RateLimiterConfig};
use crate::metrics::BlockMetrics;
use crate::rate_limiter::RateLimiter;

/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes returned by GET_ID.
pub const ID_BYTES: usize = 20;
/// Size of the (only) request queue.
pub const QUEUE_SIZE: u16 = 256;

const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Why a drive's backing file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file could not be opened.
    #[error("cannot open drive file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The eventfd for the queue could not be created.
    #[error("cannot create the queue eventfd: {0}")]
    EventFd(std::io::Error),
    /// The rate limiter could not be created.
    #[error(transparent)]
    RateLimiter(#[from] crate::rate_limiter::RateLimiterError),
}

/// The backing file and what the guest may do with it.
struct Disk {
    file: File,
    path: PathBuf,
    capacity_sectors: u64,
}

fn open_disk(path: &Path, read_only: bool) -> Result<Disk, BlockError> {
    let open_err = |source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(open_err)?;
    // Seeking to the end also sizes block devices, whose metadata length is 0.
    let len = (&file).seek(SeekFrom::End(0)).map_err(open_err)?;
    Ok(Disk {
        file,
        path: path.to_path_buf(),
        capacity_sectors: len / SECTOR_SIZE,
    })
}

struct Active {
    memory: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio block device.
pub struct Block {
    id: String,
    disk: Disk,
    read_only: bool,
    cache_type: CacheType,
    acked_features: u64,
    queue_events: [EventFd; 1],
    active: Option<Active>,
    interrupt: Option<Arc<VirtioInterrupt>>,
    limiter: RateLimiter,
    metrics: Arc<BlockMetrics>,
}

impl Block {
    /// A device for drive `id` backed by the file at `path`.
    pub fn new(
        id: &str,
        path: &Path,
        read_only: bool,
        cache_type: CacheType,
        rate_limiter: Option<&RateLimiterConfig>,
        metrics: Arc<BlockMetrics>,
    ) -> Result<Block, BlockError> {
        Ok(Block {
            id: id.to_string(),
            disk: open_disk(path, read_only)?,
            read_only,
            cache_type,
            acked_features: 0,
            queue_events: [EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            active: None,
            interrupt: None,
            limiter: RateLimiter::new(rate_limiter)?,
            metrics,
        })
    }

    /// The drive's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Swaps the backing file (PATCH /drives) and tells the guest its capacity may have changed.
    pub fn update_backing_file(&mut self, path: &Path) -> Result<(), BlockError> {
        self.disk = open_disk(path, self.read_only)?;
        if let Some(interrupt) = &self.interrupt {
            interrupt.signal_config_change();
        }
        Ok(())
    }

    /// Applies new rate limits (PATCH /drives) and serves requests they now allow.
    pub fn update_rate_limiter(&mut self, config: &RateLimiterConfig) {
        self.limiter.update(config);
        self.process_queue();
    }

    /// Path of the current backing file.
    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let outcome = request::process_queue(
            &active.memory,
            &mut active.queue,
            &mut self.disk.file,
            request::DiskInfo {
                capacity_sectors: self.disk.capacity_sectors,
                read_only: self.read_only,
                flush_syncs: self.cache_type == CacheType::Writeback,
                id: &self.id,
            },
            &mut self.limiter,
            &self.metrics,
        );
        match outcome {
            request::QueueOutcome::Idle => {}
            request::QueueOutcome::Notify => active.interrupt.signal_used_queue(),
            request::QueueOutcome::Broken(reason) => {
                tracing::warn!(
                    "virtio-blk {}: driver error, device needs reset: {reason}",
                    self.id
                );
                self.metrics.inc_invalid();
                active.interrupt.mark_broken();
                self.active = None;
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
        // As in Firecracker: only a write-back cache has anything for the guest to flush.
        if self.cache_type == CacheType::Writeback {
            features |= VIRTIO_BLK_F_FLUSH;
        }
        if self.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.disk.capacity_sectors.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            "virtio-blk {}: ignored config write at {offset:#x}",
            self.id
        );
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut queue = queues
            .into_iter()
            .next()
            .ok_or_else(|| ActivateError::BadQueue("no request queue".into()))?;
        queue.set_event_idx(self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        self.interrupt = Some(interrupt.clone());
        self.active = Some(Active {
            memory,
            queue,
            interrupt,
        });
        // Requests queued before DRIVER_OK are served now rather than waiting for a doorbell.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events[0], EventSet::IN)) {
            tracing::error!("virtio-blk {}: cannot watch its queue: {e:?}", self.id);
        }
        if let Err(e) = ops.add(Events::new(self.limiter.timer(), EventSet::IN)) {
            tracing::error!(
                "virtio-blk {}: cannot watch its rate limiter: {e:?}",
                self.id
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.limiter.timer().as_raw_fd() {
            self.limiter.on_timer();
        } else {
            let _ = self.queue_events[0].read();
        }
        // While throttled, doorbells only queue requests; the timer resumes service.
        if !self.limiter.is_blocked() {
            self.process_queue();
        }
    }
}
