//! The KVM VM: its file descriptor, in-kernel interrupt controllers, PIT and guest memory.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::boot::memory_regions;

/// Where KVM puts the three pages it needs for real-mode TSS emulation: inside the MMIO gap,
/// clear of every device.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Why the VM could not be created or given memory.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    /// The running kernel's KVM API is not the stable version 12.
    #[error("unsupported KVM API version {0} (12 expected)")]
    ApiVersion(i32),
    /// A VM-level ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory {
        /// Requested size.
        mib: usize,
        /// Why.
        reason: String,
    },
}

/// What guest memory was registered for; a different shape needs new memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryShape {
    /// Guest RAM in MiB.
    pub mem_size_mib: usize,
    /// Whether KVM logs dirty pages.
    pub track_dirty_pages: bool,
}

/// A VM with its interrupt controllers and (once attached) its guest memory.
pub struct Vm {
    /// The KVM system handle, kept for per-vCPU queries.
    pub kvm: Kvm,
    /// The VM file descriptor.
    pub fd: VmFd,
    memory: Option<(MemoryShape, GuestMemoryMmap)>,
}

impl Vm {
    /// Creates the VM with guest memory of `shape`, then its in-kernel IOAPIC/PIC/LAPICs and
    /// the PIT.
    ///
    /// The order matters for start-up time: once the VM has an in-kernel irqchip, the first
    /// change to its memory slots waits several milliseconds in the host kernel (6-10 ms
    /// measured on kvm_pvm hosts, for any memory size), while slots registered before the
    /// irqchip cost about 0.1 ms.
    pub fn new(shape: MemoryShape) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mut vm = Vm {
            kvm,
            fd,
            memory: None,
        };
        vm.ensure_memory(shape)?;
        vm.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(vm)
    }

    /// The attached guest memory, if any.
    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.memory.as_ref().map(|(_, memory)| memory)
    }

    /// Makes sure guest memory of `shape` is mapped and registered, replacing memory of
    /// another shape (its KVM slots are deleted first). Replacing costs the slow first slot
    /// change described at [`Vm::new`]; a new VM is cheaper.
    pub fn ensure_memory(&mut self, shape: MemoryShape) -> Result<&GuestMemoryMmap, VmError> {
        if self
            .memory
            .as_ref()
            .is_some_and(|(current, _)| *current != shape)
        {
            self.remove_memory()?;
        }
        if self.memory.is_none() {
            let memory = self.register_memory(shape)?;
            self.memory = Some((shape, memory));
        }
        self.memory().ok_or_else(|| VmError::Memory {
            mib: shape.mem_size_mib,
            reason: "memory vanished".into(),
        })
    }

    fn remove_memory(&mut self) -> Result<(), VmError> {
        let Some((_, memory)) = self.memory.take() else {
            return Ok(());
        };
        for slot in 0..memory.num_regions() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                memory_size: 0,
                ..Default::default()
            };
            // SAFETY: a zero-sized region deletes the slot; no memory is referenced.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
                what: "KVM_SET_USER_MEMORY_REGION (delete)",
                source,
            })?;
        }
        Ok(())
    }

    fn register_memory(&self, shape: MemoryShape) -> Result<GuestMemoryMmap, VmError> {
        let mem_size_mib = shape.mem_size_mib;
        let bytes = (mem_size_mib as u64)
            .checked_mul(1 << 20)
            .ok_or_else(|| VmError::Memory {
                mib: mem_size_mib,
                reason: "size overflows".into(),
            })?;
        let memory = GuestMemoryMmap::<()>::from_ranges(&memory_regions(bytes)).map_err(|e| {
            VmError::Memory {
                mib: mem_size_mib,
                reason: e.to_string(),
            }
        })?;
        let flags = if shape.track_dirty_pages {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in memory.iter().enumerate() {
            let host =
                memory
                    .get_host_address(region.start_addr())
                    .map_err(|e| VmError::Memory {
                        mib: mem_size_mib,
                        reason: e.to_string(),
                    })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region describes memory owned by `memory`, which `self.memory` keeps
            // alive until the slot is deleted (remove_memory) or the VM fd is closed.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
                what: "KVM_SET_USER_MEMORY_REGION",
                source,
            })?;
        }
        Ok(memory)
    }
}
