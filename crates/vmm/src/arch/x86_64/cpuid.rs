//! The CPUID table each vCPU sees: what KVM supports, with topology, APIC IDs and the
//! hypervisor leaves filled in for this VM's shape.
//!
//! The hypervisor bit and the KVM leaves matter: without them a Linux guest never finds
//! kvm-clock, falls back to PIT calibration and can hang there.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Why the CPUID table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM did not report its supported CPUID: {0}")]
    Supported(kvm_ioctls::Error),
    /// The table is full and a required leaf could not be added.
    #[error("the CPUID table has no room for leaf {0:#x}")]
    Full(u32),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const ECX_XSAVE: u32 = 1 << 26;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// XCR0 bit 0: x87 state, which XCR0 must always include.
const XCR0_X87: u64 = 1;
const EDX_HTT: u32 = 1 << 28;

/// KVM paravirtual features advertised when the host did not list leaf 0x40000001 itself:
/// clocksource, clocksource2, no I/O delay and a stable clock.
const KVM_FEATURES_FALLBACK: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);

/// The shape of the guest CPU topology.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    /// Total vCPUs.
    pub vcpu_count: u8,
    /// Two threads per core.
    pub smt: bool,
}

impl Topology {
    fn threads_per_core(&self) -> u32 {
        if self.smt && self.vcpu_count > 1 {
            2
        } else {
            1
        }
    }

    fn cores(&self) -> u32 {
        (self.vcpu_count as u32).div_ceil(self.threads_per_core())
    }
}

/// Bits needed to number `count` items.
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// KVM's supported CPUID, fetched once per VM and specialised per vCPU.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    ensure_hypervisor_leaves(&mut cpuid)?;
    Ok(cpuid)
}

fn ensure_hypervisor_leaves(cpuid: &mut CpuId) -> Result<(), CpuidError> {
    let has = |cpuid: &CpuId, leaf: u32| cpuid.as_slice().iter().any(|e| e.function == leaf);
    if !has(cpuid, LEAF_HYPERVISOR) {
        let sig = b"KVMKVMKVM\0\0\0";
        let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_HYPERVISOR,
                eax: LEAF_KVM_FEATURES,
                ebx: word(0),
                ecx: word(4),
                edx: word(8),
                ..Default::default()
            })
            .map_err(|_| CpuidError::Full(LEAF_HYPERVISOR))?;
    }
    if !has(cpuid, LEAF_KVM_FEATURES) {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_KVM_FEATURES,
                eax: KVM_FEATURES_FALLBACK,
                ..Default::default()
            })
            .map_err(|_| CpuidError::Full(LEAF_KVM_FEATURES))?;
    }
    Ok(())
}

/// The XCR0 a vCPU starts with: every user state component its CPUID table advertises
/// (leaf 0xD subleaf 0, EDX:EAX), or `None` when the table has no XSAVE.
///
/// Why not the architectural reset value (x87 only): KVM reports the XSAVE area size in leaf
/// 0xD (EBX of subleaves 0 and 1) for the XCR0 it believes the guest has, and learns of a new
/// XCR0 by intercepting XSETBV. Where that intercept is missing — nested under QEMU's software
/// SVM, which does not implement it — KVM keeps the reset value, Linux's own XSETBV goes
/// unseen, and its boot-time check finds CPUID's size (576 bytes: x87/SSE only) smaller than
/// the sum of the components it enabled ("XSAVE consistency problem", a WARN). Starting with
/// the value Linux is about to set makes both agree; Linux (and any guest using XSAVE) sets
/// XCR0 itself before relying on it, and without CR4.OSXSAVE the value has no effect.
pub fn boot_xcr0(cpuid: &CpuId) -> Option<u64> {
    let entries = cpuid.as_slice();
    let has_xsave = entries
        .iter()
        .any(|e| e.function == LEAF_FEATURES && e.ecx & ECX_XSAVE != 0);
    let leaf = entries
        .iter()
        .find(|e| e.function == LEAF_XSAVE && e.index == 0)?;
    let xcr0 = (u64::from(leaf.edx) << 32) | u64::from(leaf.eax);
    (has_xsave && xcr0 & XCR0_X87 != 0).then_some(xcr0)
}

/// Returns the CPUID table for vCPU `index` of a VM with `topology`.
pub fn for_vcpu(base: &CpuId, index: u8, topology: Topology) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = index as u32;
    let count = topology.vcpu_count as u32;
    let threads = topology.threads_per_core();
    let smt_bits = bits_for(threads);
    let package_bits = bits_for(count).max(smt_bits);
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ecx |= ECX_HYPERVISOR;
                // APIC ID, logical processors per package, CLFLUSH line size (8 * 8 bytes).
                entry.ebx = (apic_id << 24) | (count.next_power_of_two().min(255) << 16) | (8 << 8);
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count } else { threads };
                entry.eax &= 0x3fff;
                entry.eax |= ((topology.cores().saturating_sub(1)) & 0x3f) << 26;
                entry.eax |= ((sharing.saturating_sub(1)) & 0xfff) << 14;
            }
            LEAF_PERFMON => {
                // No virtual PMU: guests must not program counters the VMM does not save.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = smt_bits;
                        entry.ebx = threads;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = package_bits;
                        entry.ebx = count;
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_AMD_SIZES => {
                // ECX[15:12]: APIC ID size; ECX[7:0]: logical processors - 1.
                entry.ecx = (package_bits << 12) | (count - 1);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: LEAF_FEATURES,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_TOPOLOGY,
                index: 1,
                ..Default::default()
            },
        ])
        .expect("table")
    }

    #[test]
    fn boot_xcr0_is_every_component_of_leaf_0xd_when_xsave_is_there() {
        let leaf_0xd = |eax, edx| kvm_cpuid_entry2 {
            function: LEAF_XSAVE,
            index: 0,
            eax,
            edx,
            ..Default::default()
        };
        let features = |ecx| kvm_cpuid_entry2 {
            function: LEAF_FEATURES,
            ecx,
            ..Default::default()
        };
        let table = |entries: &[kvm_cpuid_entry2]| CpuId::from_entries(entries).expect("table");
        // x87, SSE, AVX, and a component above bit 31 (in EDX).
        let full = table(&[features(ECX_XSAVE), leaf_0xd(0x7, 0x1)]);
        assert_eq!(boot_xcr0(&full), Some(0x1_0000_0007));
        // Subleaf 1 is not the component list.
        let sub1 = kvm_cpuid_entry2 {
            index: 1,
            ..leaf_0xd(0xf, 0)
        };
        assert_eq!(
            boot_xcr0(&table(&[features(ECX_XSAVE), sub1, leaf_0xd(0x3, 0)])),
            Some(0x3)
        );
        // No XSAVE in leaf 1, no leaf 0xD, or no x87 bit: leave XCR0 alone.
        assert_eq!(boot_xcr0(&table(&[features(0), leaf_0xd(0x7, 0)])), None);
        assert_eq!(boot_xcr0(&table(&[features(ECX_XSAVE)])), None);
        assert_eq!(
            boot_xcr0(&table(&[features(ECX_XSAVE), leaf_0xd(0x6, 0)])),
            None
        );
    }

    #[test]
    fn leaf_1_carries_apic_id_hypervisor_bit_and_count() {
        let cpuid = for_vcpu(
            &table(),
            3,
            Topology {
                vcpu_count: 4,
                smt: false,
            },
        );
        let leaf1 = cpuid.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_reports_all_vcpus_at_core_level() {
        let cpuid = for_vcpu(
            &table(),
            1,
            Topology {
                vcpu_count: 6,
                smt: true,
            },
        );
        let leaf = cpuid.as_slice()[1];
        assert_eq!(leaf.ebx, 6);
        assert_eq!(leaf.edx, 1);
        assert_eq!(leaf.eax, 3);
    }

    #[test]
    fn hypervisor_leaves_are_added_when_missing() {
        let mut cpuid = table();
        ensure_hypervisor_leaves(&mut cpuid).expect("room");
        let leaf = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == LEAF_HYPERVISOR)
            .expect("leaf added");
        assert_eq!(&leaf.ebx.to_le_bytes(), b"KVMK");
    }
}
