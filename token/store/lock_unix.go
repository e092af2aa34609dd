//go:build unix

package store

import (
	"os"
	"syscall"
)

// lockDir takes an exclusive advisory flock(2) on the card directory,
// waiting for another process (a second "vscard serve" on the same card)
// to finish its PIN check. The lock goes away with the descriptor, so a
// crashed holder never leaves the card locked.
func lockDir(dir string) (unlock func(), err error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		// Closing the descriptor releases the lock.
		f.Close()
	}, nil
}
