package guest

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// writeCPIO writes files as a "newc" cpio archive (the format the kernel
// unpacks into its initramfs), with the parent directories each path needs.
// Names are relative to the archive root, like "vscard/script". Every file
// gets mode 0755 so scripts are executable.
func writeCPIO(w io.Writer, files map[string][]byte) error {
	bw := bufio.NewWriter(w)
	names := make([]string, 0, len(files))
	dirs := map[string]bool{}
	for name := range files {
		clean := path.Clean(strings.TrimPrefix(name, "/"))
		if clean == "." || strings.HasPrefix(clean, "..") {
			return fmt.Errorf("guest: cpio: bad file name %q", name)
		}
		names = append(names, name)
		for d := path.Dir(clean); d != "."; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	sort.Strings(names)
	dirList := make([]string, 0, len(dirs))
	for d := range dirs {
		dirList = append(dirList, d)
	}
	sort.Strings(dirList) // parents sort before their children
	ino := 1
	for _, d := range dirList {
		if err := cpioEntry(bw, ino, d, 0o040755, nil); err != nil {
			return err
		}
		ino++
	}
	for _, name := range names {
		clean := path.Clean(strings.TrimPrefix(name, "/"))
		if err := cpioEntry(bw, ino, clean, 0o100755, files[name]); err != nil {
			return err
		}
		ino++
	}
	if err := cpioEntry(bw, 0, "TRAILER!!!", 0, nil); err != nil {
		return err
	}
	return bw.Flush()
}

// cpioEntry writes one newc header, name and data, each padded to 4 bytes.
func cpioEntry(w *bufio.Writer, ino int, name string, mode uint32, data []byte) error {
	nlink := 1
	if mode&0o040000 != 0 {
		nlink = 2
	}
	// magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
	// devminor, rdevmajor, rdevminor, namesize, check.
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	if _, err := w.WriteString(hdr); err != nil {
		return fmt.Errorf("guest: cpio: %w", err)
	}
	w.WriteString(name)
	w.WriteByte(0)
	pad(w, len(hdr)+len(name)+1)
	w.Write(data)
	return pad(w, len(data))
}

func pad(w *bufio.Writer, n int) error {
	for ; n%4 != 0; n++ {
		if err := w.WriteByte(0); err != nil {
			return fmt.Errorf("guest: cpio: %w", err)
		}
	}
	return nil
}
