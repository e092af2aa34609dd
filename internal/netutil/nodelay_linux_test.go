//go:build linux

package netutil

import "syscall"

func getNoDelay(rc syscall.RawConn) (int, error) {
	var v int
	var serr error
	err := rc.Control(func(fd uintptr) {
		v, serr = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_NODELAY)
	})
	if err == nil {
		err = serr
	}
	return v, err
}
