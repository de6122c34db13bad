/*
 * hello: the smallest useful guest and the README's demo.  Prints a greeting and the command
 * line it was booted with, then resets the machine so that kiln-vmm exits with status 0.
 */
#include "rt.h"

void guest_main(u8 *zero_page)
{
	(void)zero_page;
	kprintf("Hello from a kiln test guest!\n");
	kprintf("hello: booted in 64-bit long mode, command line: \"%s\"\n", cmdline());
	kprintf("hello: resetting the machine, goodbye\n");
	reset();
}
