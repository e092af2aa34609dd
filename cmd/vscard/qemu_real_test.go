package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/ctl"
)

// TestConnectRealQEMU connects "vscard connect" to QEMU 7.2's
// ccid-card-passthru over every transport QEMU offers: TCP, a unix socket,
// and TLS against QEMU's tls-creds-x509 with verify-peer=on (peers.md
// §7.3). QEMU has no TLS on unix sockets ("'tls_creds' option is
// incompatible with 'unix' address type"), so qemu-args refuses that. QEMU runs paused with no guest OS; it
// answers the VSCard handshake by itself (peers.md §1.1). The QEMU options
// come from qemuArgs, so "vscard qemu-args" is checked against QEMU too.
//
// It needs VSCARD_E2E=1 and the Debian package qemu-system-x86.
func TestConnectRealQEMU(t *testing.T) {
	bin := realQEMU(t)
	dir := testCard(t)
	p := newPKI(t)
	for _, tc := range []struct {
		name      string
		unix, tls bool
	}{
		{"tcp", false, false},
		{"unix", true, false},
		{"tls", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var tgt target
			if tc.unix {
				// shortSocket's parent directory exists; its own does not.
				tgt = target{Network: "unix", Addr: filepath.Join(filepath.Dir(filepath.Dir(shortSocket(t))), "q.sock")}
			} else {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				tgt = target{Network: "tcp", Addr: ln.Addr().String()}
				ln.Close()
			}
			tlsDir := ""
			if tc.tls {
				tlsDir = p.dir
			}
			line, _ := qemuArgs(tgt, tlsDir, "ccid", false)
			qemu := append([]string{"-M", "q35", "-m", "64", "-nodefaults", "-display", "none", "-nographic",
				"-accel", "tcg", "-S", "-monitor", "none", "-serial", "none", "-device", "qemu-xhci"},
				strings.Fields(line)...)
			var qout syncBuffer
			cmd := exec.Command(bin, qemu...)
			cmd.Stdout, cmd.Stderr = &qout, &qout
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			if err := cmd.Start(); err != nil {
				t.Fatalf("start QEMU: %v", err)
			}
			defer func() { cmd.Process.Kill(); cmd.Wait() }()

			sock := shortSocket(t)
			trace := filepath.Join(t.TempDir(), "trace.jsonl")
			args := []string{"--card", dir, "--control", sock, "--no-stdin", "--trace", trace, "--log-level", "debug"}
			if tc.tls {
				args = append(args, "--tls-ca", p.caFile, "--tls-cert", p.certFile, "--tls-key", p.keyFile)
			}
			args = append(args, tgt.String())
			var stdout, stderr syncBuffer
			env := &environ{stdin: strings.NewReader(""), stdout: &stdout, stderr: &stderr}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- runConnect(ctx, env, args) }()

			// QEMU acknowledges each of ReaderRemove, ReaderAdd and ATR
			// with Error(ok), after answering Init (peers.md §1.3).
			waitAcks := func(n int) {
				t.Helper()
				deadline := time.Now().Add(30 * time.Second)
				for {
					inits, acks := hostMessages(t, trace)
					if inits >= 1 && acks >= n {
						return
					}
					if time.Now().After(deadline) {
						t.Fatalf("QEMU sent %d Init and %d Error(ok), want 1 and %d\nvscard log:\n%s\nQEMU:\n%s",
							inits, acks, n, stderr.String(), qout.String())
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			waitAcks(3)
			if a, err := ctl.Send(ctx, sock, "remove"); err != nil || a != "card removed\n" {
				t.Fatalf("ctl remove: %q, %v", a, err)
			}
			waitAcks(4)
			if a, err := ctl.Send(ctx, sock, "insert"); err != nil || a != "card inserted\n" {
				t.Fatalf("ctl insert: %q, %v", a, err)
			}
			waitAcks(5)
			cancel() // SIGTERM: CardRemove and ReaderRemove, both acknowledged
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("vscard connect: %v\n%s", err, stderr.String())
				}
			case <-time.After(20 * time.Second):
				t.Fatal("vscard connect did not stop")
			}
			waitAcks(7)
		})
	}
}

// hostMessages counts the Init and Error(ok) messages the trace recorded
// from the host.
func hostMessages(t *testing.T, trace string) (inits, acks int) {
	t.Helper()
	b, err := os.ReadFile(trace)
	if err != nil {
		return 0, 0
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var l struct{ Dir, Type, Cmd string }
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.Dir != "in" {
			continue
		}
		switch {
		case l.Type == "Init":
			inits++
		case l.Type == "Error" && l.Cmd == "00000000":
			acks++
		case l.Type == "Error":
			t.Fatalf("QEMU refused a message: %s", fmt.Sprint(l))
		}
	}
	return inits, acks
}

// TestReaderRealQEMUTLS exports the reader over usbredir with TLS to QEMU
// 7.2's usb-redir, both ways round: QEMU's server chardev with
// tls-creds-x509 endpoint=server,verify-peer=on (as `vscard qemu-args
// --usbredir --tls-dir` prints it) and the reader connecting,
// and QEMU's client chardev (endpoint=client) dialling `--listen`. One
// directory in QEMU's layout serves both ends. QEMU runs with no guest OS
// (the firmware enumerates the xHCI port); debug=4 makes it log the
// device it attaches.
func TestReaderRealQEMUTLS(t *testing.T) {
	bin := realQEMU(t)
	p := newPKI(t)
	for _, listen := range []bool{false, true} {
		name := map[bool]string{false: "qemu-server", true: "qemu-client"}[listen]
		t.Run(name, func(t *testing.T) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			addr := l.Addr().(*net.TCPAddr)
			l.Close()
			tgt := target{Network: "tcp", Addr: addr.String(), Host: "127.0.0.1"}
			// QEMU's side: what `vscard qemu-args --usbredir --tls-dir`
			// prints, or a client chardev for --listen.
			line, _ := qemuArgs(tgt, p.dir, "r0", true)
			if listen {
				line = "-object tls-creds-x509,id=t0,dir=" + qemuEscape(p.dir) + ",endpoint=client" +
					fmt.Sprintf(" -chardev socket,id=r0,host=127.0.0.1,port=%d,server=off,reconnect=1,nodelay=on,tls-creds=t0", addr.Port) +
					" -device usb-redir,chardev=r0"
			}
			qargs := append([]string{"-M", "pc", "-m", "64", "-nodefaults", "-nographic", "-display", "none",
				"-accel", "tcg", "-serial", "none", "-monitor", "none", "-device", "qemu-xhci"}, strings.Fields(line)...)
			// debug=4: QEMU logs the device it attaches.
			qargs[len(qargs)-1] += ",debug=4"
			var qout syncBuffer
			cmd := exec.Command(bin, qargs...)
			cmd.Stdout, cmd.Stderr = &qout, &qout
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			if listen {
				// The reader listens first; QEMU's client chardev then
				// connects at once instead of after its reconnect delay.
				defer func() { cmd.Process.Kill(); cmd.Wait() }()
			}
			if !listen {
				if err := cmd.Start(); err != nil {
					t.Fatalf("start QEMU: %v", err)
				}
				defer func() { cmd.Process.Kill(); cmd.Wait() }()
			}
			app, logBuf := tlsReaderApp(t, tgt, listen, p.dir)
			if listen {
				if err := cmd.Start(); err != nil {
					t.Fatalf("start QEMU: %v", err)
				}
			}
			deadline := time.Now().Add(60 * time.Second)
			for !strings.Contains(qout.String(), "attaching full speed device 08e6:4433") {
				if time.Now().After(deadline) {
					t.Fatalf("QEMU did not attach the reader over TLS\nQEMU:\n%s\nvscard:\n%s", qout.String(), logBuf.String())
				}
				time.Sleep(50 * time.Millisecond)
			}
			if who := app.att.holder(); who != "usbredir" {
				t.Errorf("reader attached over %q, want usbredir", who)
			}
			if l := logBuf.String(); strings.Contains(l, "TLS handshake") {
				t.Errorf("a TLS handshake failed on the way:\n%s", l)
			}
		})
	}
}

// realQEMU skips outside VSCARD_E2E=1 and returns qemu-system-x86_64's
// path; under VSCARD_E2E=1 a missing QEMU fails the test.
func realQEMU(t *testing.T) string {
	t.Helper()
	if os.Getenv("VSCARD_E2E") != "1" {
		t.Skip("set VSCARD_E2E=1 to run against a real QEMU")
	}
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal("VSCARD_E2E=1 but qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
	}
	return bin
}
