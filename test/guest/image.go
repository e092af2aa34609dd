package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Image is a built guest: a kernel booted through PVH and its initramfs.
type Image struct {
	Dir    string // the cache directory holding both
	Kernel string // uncompressed ELF vmlinux (guest-vm.md §2.3)
	Initrd string // uncompressed newc cpio
	Key    string // hash of package versions and the builder script
}

// BuildImage runs the builder script (scripts/guest-image), which reuses the
// cached image when its key matches, and returns the image it names. The
// script's progress messages go to log, which may be nil.
func BuildImage(ctx context.Context, script string, log io.Writer) (Image, error) {
	if log == nil {
		log = io.Discard
	}
	var stdout bytes.Buffer
	cmd := exec.CommandContext(ctx, script)
	cmd.Stdout = &stdout
	cmd.Stderr = log
	if err := cmd.Run(); err != nil {
		return Image{}, fmt.Errorf("guest: %s: %w", script, err)
	}
	lines := strings.Fields(stdout.String())
	if len(lines) == 0 {
		return Image{}, fmt.Errorf("guest: %s printed no image directory", script)
	}
	return OpenImage(lines[len(lines)-1])
}

// OpenImage checks that dir holds a built image.
func OpenImage(dir string) (Image, error) {
	img := Image{
		Dir:    dir,
		Kernel: filepath.Join(dir, "vmlinux"),
		Initrd: filepath.Join(dir, "initramfs.cpio"),
	}
	for _, f := range []string{img.Kernel, img.Initrd} {
		st, err := os.Stat(f)
		if err != nil {
			return Image{}, fmt.Errorf("guest: image: %w", err)
		}
		if st.Size() == 0 {
			return Image{}, fmt.Errorf("guest: image: %s is empty", f)
		}
	}
	key, err := os.ReadFile(filepath.Join(dir, "key"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return Image{}, fmt.Errorf("guest: image: %w", err)
	}
	img.Key = strings.TrimSpace(string(key))
	return img, nil
}

// initrdWith writes the image's initramfs followed by a second archive
// holding files, to a new file in dir. The kernel unpacks concatenated
// archives in order, so files land on top of the image's rootfs.
func (img Image) initrdWith(dir string, files map[string][]byte) (string, error) {
	out := filepath.Join(dir, "initrd.cpio")
	f, err := os.Create(out)
	if err != nil {
		return "", fmt.Errorf("guest: initrd: %w", err)
	}
	defer f.Close()
	base, err := os.Open(img.Initrd)
	if err != nil {
		return "", fmt.Errorf("guest: initrd: %w", err)
	}
	defer base.Close()
	n, err := io.Copy(f, base)
	if err != nil {
		return "", fmt.Errorf("guest: initrd: %w", err)
	}
	// Archives start on a 4-byte boundary (the kernel's initramfs
	// unpacker skips zero padding between them).
	if n%4 != 0 {
		if _, err := f.Write(make([]byte, 4-n%4)); err != nil {
			return "", fmt.Errorf("guest: initrd: %w", err)
		}
	}
	if err := writeCPIO(f, files); err != nil {
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("guest: initrd: %w", err)
	}
	return out, nil
}
