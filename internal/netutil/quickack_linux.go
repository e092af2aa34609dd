//go:build linux

package netutil

import "syscall"

const quickAckSupported = true

// setQuickAck is setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, 1).
func setQuickAck(fd uintptr) error {
	return syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 1)
}
