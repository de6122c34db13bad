/*
 * triple-fault: loads from a non-canonical address.  With no usable IDT the resulting #GP
 * escalates to a triple fault (shutdown), and kiln-vmm must end with a non-zero status rather
 * than hang or report a clean reset.  If the load somehow succeeds the guest says so and
 * resets, which the host test treats as a failure.
 */
#include "rt.h"

#define NON_CANONICAL 0x8000000000000000UL

void guest_main(u8 *zero_page)
{
	(void)zero_page;
	kprintf("triple-fault: loading from non-canonical address 0x%lx\n", NON_CANONICAL);
	u64 value = *(volatile u64 *)NON_CANONICAL;
	kprintf("triple-fault: still alive after the load (read 0x%lx)\n", value);
	reset();
}
