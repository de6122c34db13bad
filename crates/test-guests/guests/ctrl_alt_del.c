/*
 * ctrl-alt-del: waits for the i8042 to deliver the scancode-set-2 make codes of Ctrl, Alt and
 * Del (0x14 0x11 0xe0 0x71), which kiln-vmm pushes for `SendCtrlAltDel`, then resets.
 * Interrupts stay off: the guest polls the controller's status register (port 0x64, bit 0 =
 * output buffer full) and reads the data port 0x60.
 */
#include "rt.h"

#define I8042_DATA 0x60
#define I8042_STATUS 0x64
#define I8042_OBF 0x01

static const u8 expected[] = { 0x14, 0x11, 0xe0, 0x71 };

void guest_main(u8 *zero_page)
{
	(void)zero_page;
	/* Drain anything already queued so that only the host's keys count. */
	for (int i = 0; i < 16 && (inb(I8042_STATUS) & I8042_OBF); i++)
		(void)inb(I8042_DATA);

	kprintf("ctrl-alt-del: waiting for Ctrl+Alt+Del on the i8042\n");
	usize matched = 0;
	u32 received = 0;
	while (matched < sizeof(expected)) {
		if (!(inb(I8042_STATUS) & I8042_OBF))
			continue;
		u8 code = inb(I8042_DATA);
		received++;
		kprintf("ctrl-alt-del: scancode 0x%02x\n", code);
		if (code == expected[matched])
			matched++;
		else
			matched = code == expected[0] ? 1 : 0;
	}
	kprintf("ctrl-alt-del: got Ctrl+Alt+Del (%u scancodes), resetting\n", received);
	reset();
}
