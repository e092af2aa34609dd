package usbredir

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/usb"
)

// syncBuffer is a bytes.Buffer safe for a logger and a reader at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// TestQEMUSmoke puts the fake reader behind a real QEMU usb-redir on an
// xHCI controller, with no guest OS: only the firmware (SeaBIOS, which
// drives xHCI) enumerates it. It checks what the guest test bed cannot
// isolate: QEMU's hello arrives, QEMU accepts our announcement (no
// "rejected" on its stderr, protocols.md §6.4 step 1 lists what it
// rejects on an xHCI port), the firmware's GET_DESCRIPTOR reaches the
// device through a control_packet, and the unplug on ctx end is clean.
func TestQEMUSmoke(t *testing.T) {
	if os.Getenv("VSCARD_E2E") != "1" {
		t.Skip("set VSCARD_E2E=1 to run against qemu-system-x86_64")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatalf("VSCARD_E2E=1 but qemu-system-x86_64 is missing: %v", err)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "redir.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var stderr syncBuffer
	cmd := exec.CommandContext(ctx, qemu,
		"-M", "pc", "-m", "64", "-nodefaults", "-nographic",
		"-display", "none", "-serial", "none", "-monitor", "none",
		"-device", "qemu-xhci",
		"-chardev", "socket,id=r0,path="+sock,
		// debug=4: QEMU logs its view of the attach, transfers and detach.
		"-device", "usb-redir,chardev=r0,debug=4",
	)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()

	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	dev := newFakeDev()
	sctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- Serve(sctx, conn, dev, &Options{Logger: log}) }()

	// Wait for the firmware to ask for the device descriptor.
	deadline := time.Now().Add(60 * time.Second)
	for {
		dev.mu.Lock()
		n := 0
		for _, s := range dev.setups {
			if s.Request == usb.ReqGetDescriptor && s.Value == 0x0100 {
				n++
			}
		}
		dev.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no GET_DESCRIPTOR from the firmware\nserve log:\n%s\nqemu stderr:\n%s", logs.String(), stderr.String())
		}
		select {
		case err := <-done:
			t.Fatalf("Serve returned early: %v\nserve log:\n%s\nqemu stderr:\n%s", err, logs.String(), stderr.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
	stop()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after ctx end")
	}
	l := logs.String()
	if !strings.Contains(l, `version="qemu usb-redir guest`) {
		t.Errorf("no QEMU hello in the log:\n%s", l)
	}
	if strings.Contains(l, "no device_disconnect_ack") {
		t.Errorf("QEMU did not ack the disconnect:\n%s", l)
	}
	if strings.Contains(l, "malformed") {
		t.Errorf("QEMU sent a packet we call malformed:\n%s", l)
	}
	e := stderr.String()
	if strings.Contains(strings.ToLower(e), "reject") || strings.Contains(e, "usb-redir error") {
		t.Errorf("QEMU complains:\n%s", e)
	}
	// QEMU accepted our announcement as a full-speed device with our
	// VID:PID, and saw the unplug (before the link closed).
	for _, want := range []string{"attaching full speed device 08e6:4433", "detaching device"} {
		if !strings.Contains(e, want) {
			t.Errorf("QEMU stderr lacks %q:\n%s", want, e)
		}
	}
	t.Logf("serve log:\n%s", l)
}
