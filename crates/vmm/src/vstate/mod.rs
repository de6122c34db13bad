//! KVM state: the VM (memory, irqchip, PIT), its vCPU threads, and why the VM ended.

pub mod exit;
pub mod vcpu;
pub mod vm;
