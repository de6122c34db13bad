/*
 * A minimal ring-3 runtime for the test guests.
 *
 * On this project's KVM hosts (kvm_pvm) guest kernel-mode code is emulated one instruction at
 * a time while guest user-mode code runs natively, so a guest that wants to measure a device
 * rather than the emulator runs its hot loop in ring 3.  usermode_run() builds its own
 * identity page tables (the low 4 GiB in 2 MiB pages, every one user-accessible, the
 * virtio-mmio window included), a GDT with user code/data segments and a TSS (RSP0 for
 * exceptions), an IDT, and then `iretq`s into `fn(arg)` at CPL3 with IOPL=3.
 *
 * kvm_pvm runs ring 3 with the host's IOPL of 0, so `in`/`out` from ring 3 raise #GP despite
 * IOPL=3; the #GP handler performs the port access in ring 0 (emulated: a few hundred
 * instructions per access) and returns past the instruction, so serial output and the i8042
 * reset work unchanged, only slower.  MMIO (virtio notify) and rdtsc need no help.  Any other
 * exception is reported on the serial port and resets the VM.  `fn` must never return (end
 * with reset()); there are no interrupts and no syscalls.
 */
#ifndef KILN_USERMODE_H
#define KILN_USERMODE_H

#include "rt.h"

/* Whether the command line asks for ring 3 (kiln.user=1). */
int usermode_requested(void);

/* Runs fn(arg) in ring 3 as described above; never returns. */
__attribute__((noreturn)) void usermode_run(void (*fn)(void *), void *arg);

/* The current privilege level (the low two bits of CS). */
static inline u32 current_cpl(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return cs & 3;
}

#endif
