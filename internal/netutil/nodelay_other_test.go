//go:build !linux

package netutil

import (
	"errors"
	"syscall"
)

func getNoDelay(syscall.RawConn) (int, error) {
	return 0, errors.New("no portable TCP_NODELAY getter in syscall")
}
