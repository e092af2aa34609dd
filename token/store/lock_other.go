//go:build !unix

package store

// lockDir is a no-op where flock(2) does not exist: only the in-process
// mutex serialises PIN checks there (see the package doc).
func lockDir(string) (func(), error) { return func() {}, nil }
