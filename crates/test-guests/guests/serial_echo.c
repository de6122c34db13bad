/*
 * serial-echo: copies every byte the host sends to COM1's input back to COM1's output until
 * an EOT byte (0x04), then reports how many bytes it echoed and resets.  Proves that host
 * input reaches the guest whole and in order even when the host sends far more at once than
 * the UART's 64-byte FIFO holds.  Polls the line status register; no interrupts.
 */
#include "rt.h"

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_DATA_READY 0x01
#define EOT 0x04

void guest_main(u8 *zero_page)
{
	(void)zero_page;
	u64 count = 0;

	kprintf("serial-echo: ready\n");
	for (;;) {
		if (!(inb(COM1_LSR) & LSR_DATA_READY))
			continue;
		u8 c = inb(COM1);
		if (c == EOT)
			break;
		serial_putc((char)c);
		count++;
	}
	kprintf("\nserial-echo: done echoed=%lu\n", count);
	reset();
}
