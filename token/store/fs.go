package store

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// File modes. Secrets are 0600 from the moment they exist; certificates are
// public and 0644 (the directory is 0700 anyway).
const (
	dirMode    fs.FileMode = 0o700
	secretMode fs.FileMode = 0o600
	publicMode fs.FileMode = 0o644
)

// writeNew creates dir/name with mode perm, failing if it exists, and
// syncs it. The mode is given to open(2), so the file is never readable by
// others, not even for a moment (the umask can only narrow it).
func writeNew(dir, name string, data []byte, perm fs.FileMode) error {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// writeAtomic replaces dir/name with data so that a crash leaves either the
// old or the new content: temporary file in the same directory, fsync,
// rename, fsync of the directory (without the last step the rename itself
// may be lost on power failure).
func writeAtomic(dir, name string, data []byte) (err error) {
	// CreateTemp makes the file 0600.
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err = f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// readLimited reads a whole file of at most max bytes.
func readLimited(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("larger than %d bytes", max)
	}
	return b, nil
}

// errPermissions is wrapped by Open's error for a card whose secrets are
// open to group or others.
var errPermissions = errors.New("permissions too open")

// checkPrivate refuses a path whose group/other bits are set (see the
// package doc: like ssh, an exposed key is not served).
func checkPrivate(path string, isDir bool) error {
	// The card directory itself may be a symbolic link (~/cards on
	// another disk); the files inside may not, so a link cannot swap in
	// a key from elsewhere.
	stat := os.Lstat
	if isDir {
		stat = os.Stat
	}
	fi, err := stat(path)
	if err != nil {
		return err
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("%s is a symbolic link; a card's files must be regular files inside it", path)
	}
	if isDir != fi.IsDir() {
		if isDir {
			return fmt.Errorf("%s is not a directory", path)
		}
		return fmt.Errorf("%s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		want := secretMode
		if isDir {
			want = dirMode
		}
		return fmt.Errorf("%w: %s has mode %04o, so group or others can reach it; run: chmod %04o %s", errPermissions, path, perm, want, path)
	}
	return nil
}
