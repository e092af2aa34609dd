// Package netutil tunes vscard's TCP links for request/response latency.
//
// Both reference peers vscard talks to (vsmartcard's vpcd and QEMU's
// ccid-card-passthru) write each message as a header write followed by a
// payload write without TCP_NODELAY. Nagle then holds the payload until the
// header is ACKed, and the receiver's delayed-ACK timer (about 40 ms) decides
// when that happens: every APDU costs ~44 ms (peers.md §4.1). The receiver
// can defeat the stall on its own by acknowledging at once, which on Linux
// means setting TCP_QUICKACK again after every read, because the kernel
// clears the flag as it sees fit (tcp(7)).
//
// LowLatency wraps a connection so that both halves of the fix happen
// without the protocol code having to think about them.
package netutil

import (
	"net"
	"syscall"
)

// LowLatency turns on TCP_NODELAY (so vscard's own single-write messages
// leave at once) and returns a net.Conn whose Read re-arms TCP_QUICKACK
// after every read that returned data. Callers should read through the
// returned conn only; reading through c directly would skip the re-arm.
//
// For connections that are not TCP (net.Pipe in tests, Unix sockets) and on
// systems without TCP_QUICKACK, the wrapper only passes calls through.
func LowLatency(c net.Conn) net.Conn {
	q := &quickAckConn{Conn: c}
	if tc, ok := c.(*net.TCPConn); ok {
		// Go sets TCP_NODELAY by default; say so explicitly, since the whole
		// point of vscard's transport is not to depend on that default.
		_ = tc.SetNoDelay(true)
		if rc, err := tc.SyscallConn(); err == nil && quickAckSupported {
			q.rc = rc
			// Built once: a closure passed to RawConn.Control per read would
			// otherwise be a heap allocation per message.
			q.rearmFn = func(fd uintptr) { q.sockErr = setQuickAck(fd) }
			q.rearm()
		}
	}
	return q
}

// quickAckConn is the net.Conn returned by LowLatency.
type quickAckConn struct {
	net.Conn
	rc      syscall.RawConn // nil: nothing to re-arm
	rearmFn func(fd uintptr)
	sockErr error // last setsockopt error; reported by QuickAckErr
}

func (c *quickAckConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.rearm()
	}
	return n, err
}

// rearm sets TCP_QUICKACK. Setting it also flushes an ACK the kernel is
// holding back, which is exactly the ACK the peer's Nagle is waiting for.
func (c *quickAckConn) rearm() {
	if c.rc == nil {
		return
	}
	if err := c.rc.Control(c.rearmFn); err != nil {
		// The socket is closed; the next Read reports that.
		c.sockErr = err
	}
}

// QuickAckActive reports whether c was made by LowLatency and re-arms
// TCP_QUICKACK after each read, and the last error from doing so. It exists
// for diagnostics and tests.
func QuickAckActive(c net.Conn) (active bool, lastErr error) {
	q, ok := c.(*quickAckConn)
	if !ok || q.rc == nil {
		return false, nil
	}
	return true, q.sockErr
}
