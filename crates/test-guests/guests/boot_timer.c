/*
 * boot-timer: signals "boot finished" the way Firecracker's guests do, by writing the magic
 * value 123 to the boot-timer MMIO byte at 0xc0000000, then resets.  kiln-vmm started with
 * --boot-timer must log a `Guest-boot-time` line when it sees the write.
 */
#include "rt.h"

#define BOOT_TIMER_MAGIC 123

void guest_main(u8 *zero_page)
{
	(void)zero_page;
	kprintf("boot-timer: writing %u to 0x%lx\n", BOOT_TIMER_MAGIC, BOOT_TIMER_ADDR);
	mmio_write8(BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC);
	kprintf("boot-timer: done\n");
	reset();
}
