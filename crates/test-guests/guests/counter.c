/*
 * counter: prints `counter: N` a few times a second, forever.  The host pauses and resumes the
 * VM and checks that the lines stop and then continue from where they were (not from 0).
 *
 * The pace comes from the TSC so that it does not depend on how fast the vCPU executes;
 * `kiln.delay_ticks=N` on the command line overrides the default.
 */
#include "rt.h"

void guest_main(u8 *zero_page)
{
	(void)zero_page;
	u64 ticks = cmdline_u64("kiln.delay_ticks", 600000000UL);
	kprintf("counter: starting, %lu TSC ticks between lines\n", ticks);
	for (u64 n = 0;; n++) {
		kprintf("counter: %lu\n", n);
		delay_tsc(ticks);
	}
}
