//go:build !linux

package netutil

// TCP_QUICKACK is Linux-only. Elsewhere the peers' split writes still stall
// on delayed ACKs; the only cure there is on the peer's side (nodelay=on for
// QEMU's chardev).
const quickAckSupported = false

func setQuickAck(fd uintptr) error { return nil }
