//go:build unix

package ctl

import (
	"net"
	"sync"
	"syscall"
)

var umaskMu sync.Mutex

// listenPrivate binds the socket with umask 077, so it is never reachable
// by others, not even between bind and chmod. The umask is process-wide;
// the mutex keeps two Listen calls from interleaving, and callers listen
// at startup, before other goroutines create files.
func listenPrivate(path string) (net.Listener, error) {
	umaskMu.Lock()
	defer umaskMu.Unlock()
	old := syscall.Umask(0o177)
	defer syscall.Umask(old)
	return net.Listen("unix", path)
}
