/*
 * vsock-bench: the `vsock` guest (vsock.c, same command line) with one more knob,
 * kiln.user=1, which runs the whole program in ring 3 (usermode.h), where this host runs guest
 * code natively instead of emulating it.  Used by bench/devices.py.
 */
#define guest_main vsock_guest_main
#include "vsock.c"
#undef guest_main

#include "usermode.h"

static void run(void *zp)
{
	vsock_guest_main(zp);
	reset();
}

void guest_main(u8 *zp)
{
	if (usermode_requested())
		usermode_run(run, zp);
	run(zp);
}
