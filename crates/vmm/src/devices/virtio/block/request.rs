//! Parsing and carrying out virtio-blk requests from a descriptor chain the guest wrote.
//!
//! Everything here is guest-controlled: descriptor addresses, lengths, flags, sectors and
//! request types. A request that cannot be served gets VIRTIO_BLK_S_IOERR or _UNSUPP; a chain
//! with no writable status byte is returned with length 0; a ring the driver corrupted marks
//! the device as needing a reset. Nothing here may panic.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use virtio_queue::{desc::split::Descriptor, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{ID_BYTES, SECTOR_SIZE};
use crate::metrics::BlockMetrics;
use crate::rate_limiter::RateLimiter;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Size of the request header (type, reserved, sector).
const HEADER_SIZE: u32 = 16;

/// Most descriptors one request may use. The ring holds at most this many, but an indirect
/// table (a feature kiln-vmm does not offer, yet a hostile driver may still use) could list up
/// to 65535; longer chains are refused instead of buffered.
const MAX_DESCRIPTORS_PER_REQUEST: usize = super::QUEUE_SIZE as usize;

/// What the request needs to know about the disk.
pub struct DiskInfo<'a> {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub flush_syncs: bool,
    pub id: &'a str,
}

/// What processing the queue led to.
pub enum QueueOutcome {
    /// No request was completed.
    Idle,
    /// Requests were completed and the driver wants an interrupt.
    Notify,
    /// The driver broke the ring; the device must be reset.
    Broken(String),
}

/// Serves available requests until the ring is empty or the rate limiter says wait (then
/// the request stays queued and the limiter's timer brings the device back).
pub fn process_queue(
    memory: &GuestMemoryMmap,
    queue: &mut Queue,
    file: &mut File,
    disk: DiskInfo<'_>,
    limiter: &mut RateLimiter,
    metrics: &BlockMetrics,
) -> QueueOutcome {
    let mut completed = false;
    loop {
        let next = match queue.iter(memory) {
            Ok(mut iter) => iter.next().map(|chain| {
                let head = chain.head_index();
                let descriptors: Vec<Descriptor> =
                    chain.take(MAX_DESCRIPTORS_PER_REQUEST + 1).collect();
                (head, descriptors)
            }),
            Err(e) => return QueueOutcome::Broken(format!("available ring: {e}")),
        };
        let Some((head, descriptors)) = next else {
            // With EVENT_IDX, re-check for requests that raced with re-enabling notifications.
            match queue.enable_notification(memory) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => return QueueOutcome::Broken(format!("notification: {e}")),
            }
        };
        let data_bytes: u64 = descriptors
            .iter()
            .skip(1)
            .take(descriptors.len().saturating_sub(2))
            .map(|d| u64::from(d.len()))
            .sum();
        if !limiter.consume(data_bytes) {
            metrics.inc_throttled();
            queue.go_to_previous_position();
            break;
        }
        let used_len = serve(memory, file, &disk, &descriptors, metrics);
        if let Err(e) = queue.add_used(memory, head, used_len) {
            return QueueOutcome::Broken(format!("used ring: {e}"));
        }
        completed = true;
    }
    if !completed {
        return QueueOutcome::Idle;
    }
    match queue.needs_notification(memory) {
        Ok(true) => QueueOutcome::Notify,
        Ok(false) => QueueOutcome::Idle,
        Err(e) => QueueOutcome::Broken(format!("used event: {e}")),
    }
}

/// Serves one chain; returns the number of bytes written into guest buffers (the used length).
fn serve(
    memory: &GuestMemoryMmap,
    file: &mut File,
    disk: &DiskInfo<'_>,
    descriptors: &[Descriptor],
    metrics: &BlockMetrics,
) -> u32 {
    let (Some(header), Some(status)) = (descriptors.first(), descriptors.last()) else {
        metrics.inc_invalid();
        return 0;
    };
    if descriptors.len() < 2
        || descriptors.len() > MAX_DESCRIPTORS_PER_REQUEST
        || !status.is_write_only()
        || status.len() < 1
    {
        metrics.inc_invalid();
        return 0;
    }
    let data = &descriptors[1..descriptors.len() - 1];
    let (code, written) = if header.is_write_only() || header.len() < HEADER_SIZE {
        (VIRTIO_BLK_S_IOERR, 0)
    } else {
        match read_header(memory, header.addr()) {
            Some((kind, sector)) => execute(memory, file, disk, kind, sector, data, metrics),
            None => (VIRTIO_BLK_S_IOERR, 0),
        }
    };
    if code == VIRTIO_BLK_S_IOERR {
        metrics.inc_error();
    }
    if memory.write_obj(code, status.addr()).is_err() {
        metrics.inc_invalid();
        return 0;
    }
    written.saturating_add(1)
}

fn read_header(memory: &GuestMemoryMmap, address: GuestAddress) -> Option<(u32, u64)> {
    let kind: u32 = memory.read_obj(address).ok()?;
    let sector: u64 = memory.read_obj(address.checked_add(8)?).ok()?;
    Some((kind, sector))
}

fn execute(
    memory: &GuestMemoryMmap,
    file: &mut File,
    disk: &DiskInfo<'_>,
    kind: u32,
    sector: u64,
    data: &[Descriptor],
    metrics: &BlockMetrics,
) -> (u8, u32) {
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let writing = kind == VIRTIO_BLK_T_OUT;
            if writing && disk.read_only {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            // Data buffers must point the right way: device-writable for reads, device-readable
            // for writes.
            if data.iter().any(|d| d.is_write_only() == writing) {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let total: u64 = data.iter().map(|d| d.len() as u64).sum();
            let in_range = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(total))
                .is_some_and(|end| end <= disk.capacity_sectors * SECTOR_SIZE);
            if !total.is_multiple_of(SECTOR_SIZE) || !in_range {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            match transfer(memory, file, sector * SECTOR_SIZE, data, writing) {
                Ok(()) => {
                    if writing {
                        metrics.add_write(total);
                        (VIRTIO_BLK_S_OK, 0)
                    } else {
                        metrics.add_read(total);
                        (VIRTIO_BLK_S_OK, total as u32)
                    }
                }
                Err(e) => {
                    tracing::debug!("virtio-blk {}: I/O failed: {e}", disk.id);
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            metrics.inc_flush();
            if disk.flush_syncs && !disk.read_only {
                if let Err(e) = file.sync_all() {
                    tracing::warn!("virtio-blk {}: flush failed: {e}", disk.id);
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
            }
            (VIRTIO_BLK_S_OK, 0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let Some(buffer) = data.first().filter(|d| d.is_write_only()) else {
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            let mut id = [0u8; ID_BYTES];
            let bytes = disk.id.as_bytes();
            let n = bytes.len().min(ID_BYTES);
            id[..n].copy_from_slice(&bytes[..n]);
            let len = (buffer.len() as usize).min(ID_BYTES);
            match memory.write_slice(&id[..len], buffer.addr()) {
                Ok(()) => (VIRTIO_BLK_S_OK, len as u32),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// Moves data between the file at `offset` and the guest buffers, without a bounce buffer.
fn transfer(
    memory: &GuestMemoryMmap,
    file: &mut File,
    offset: u64,
    data: &[Descriptor],
    writing: bool,
) -> Result<(), String> {
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("seek to {offset}: {e}"))?;
    for descriptor in data {
        let len = descriptor.len() as usize;
        let result = if writing {
            memory.write_all_volatile_to(descriptor.addr(), file, len)
        } else {
            memory.read_exact_volatile_from(descriptor.addr(), file, len)
        };
        result.map_err(|e| format!("buffer at {:#x}+{len}: {e}", descriptor.addr().0))?;
    }
    Ok(())
}
