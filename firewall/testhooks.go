package firewall

import (
	"os"
	"strconv"
)

// Test hooks: environment variables that egressd reads only so that the
// end-to-end tests (test/, which run the real binary) can provoke kernel
// conditions that take hours or far more memory to reach otherwise. They
// are not configuration: not in config/default.yaml, not for operators,
// and unset (the normal case) they change nothing. This file is their only
// home: add any new one here, with the test that needs it.
//
//   - EGRESSD_TEST_SET_SIZE=N gives the learned sets (allow4, allow6) a
//     kernel size limit of N elements, so that the kernel refuses new
//     elements after N: TestSetAtSizeLimit (test/faults_test.go) checks
//     that such answers become SERVFAIL, logged and counted, and work
//     again once elements expire. firewall.max_learned cannot stand in:
//     egressd enforces it itself, before the kernel would refuse.
//   - EGRESSD_TEST_EVENT_BUFFER=BYTES sets the receive buffer of the
//     nftables event socket (normally 8 MiB, which absorbs any flood the
//     lab can make: the kernel coalesces element notifications), so that
//     another table's element notifications overflow it (ENOBUFS):
//     TestEventsLostForceAudit (test/faults_test.go) checks that lost
//     events force a resync of the learned sets.

// testSetSize is EGRESSD_TEST_SET_SIZE; false when unset or not a number.
func testSetSize() (uint32, bool) {
	n, err := strconv.ParseUint(os.Getenv("EGRESSD_TEST_SET_SIZE"), 10, 32)
	return uint32(n), err == nil
}

// testEventBuffer is EGRESSD_TEST_EVENT_BUFFER; false when unset or not a
// number.
func testEventBuffer() (int, bool) {
	n, err := strconv.Atoi(os.Getenv("EGRESSD_TEST_EVENT_BUFFER"))
	return n, err == nil
}
