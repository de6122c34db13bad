/*
 * A minimal ring-3 runtime for the test guests.
 *
 * On this project's KVM hosts (kvm_pvm) guest kernel-mode code is emulated one instruction at
 * a time while guest user-mode code runs natively, so a guest that wants to measure a device
 * rather than the emulator runs its hot loop in ring 3.  usermode_run() builds its own
 * identity page tables (the low 4 GiB in 2 MiB pages, every one user-accessible, the
 * virtio-mmio window included), a GDT with user code/data segments and a TSS, and then
 * `iretq`s into `fn(arg)` at CPL3 with IOPL=3, so the serial port and the i8042 reset still
 * work from ring 3.  There is no IDT, no interrupt and no syscall: `fn` must never return
 * (end with reset()), and any exception in ring 3 triple-faults the VM.
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
