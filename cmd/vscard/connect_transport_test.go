package main

import (
	"bytes"
	"context"
	"github.com/vscard/vscard/internal/fakehost"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestConnectTransports serves the card over each kind of target, and
// checks that a dropped connection (QEMU restarted) is followed by a new
// connection that replays the whole sequence.
func TestConnectTransports(t *testing.T) {
	dir := testCard(t)
	p := newPKI(t)
	for _, tc := range []struct {
		name   string
		listen func(t *testing.T) (ln net.Listener, target string, extra []string)
	}{
		{"tcp", func(t *testing.T) (net.Listener, string, []string) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			return ln, "tcp:" + ln.Addr().String(), nil
		}},
		{"tcp6", func(t *testing.T) (net.Listener, string, []string) {
			ln, err := net.Listen("tcp", "[::1]:0")
			if err != nil {
				t.Skipf("no IPv6 loopback: %v", err)
			}
			return ln, "tcp:" + ln.Addr().String(), nil
		}},
		{"unix", func(t *testing.T) (net.Listener, string, []string) {
			path := filepath.Join(filepath.Dir(filepath.Dir(shortSocket(t))), "qemu.sock")
			ln, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			return ln, "unix:" + path, nil
		}},
		{"tls", func(t *testing.T) (net.Listener, string, []string) {
			ln := p.tlsHost(t)
			return ln, "tcp:" + ln.Addr().String(), []string{"--tls-ca", p.caFile, "--tls-cert", p.certFile, "--tls-key", p.keyFile}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, tgt, extra := tc.listen(t)
			defer ln.Close()
			var stdout, stderr syncBuffer
			env := &environ{stdin: strings.NewReader(""), stdout: &stdout, stderr: &stderr}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			args := append([]string{"--card", dir, "--control", shortSocket(t)}, extra...)
			go func() { done <- runConnect(ctx, env, append(args, tgt)) }()

			h := fakehost.Accept(t, ln)
			atr := h.Handshake("vscard")
			if got := h.APDU(fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
				t.Errorf("SELECT ACA: % x", got)
			}
			// QEMU goes away: the client must come back by itself.
			h.Close()
			h2 := fakehost.Accept(t, ln)
			if got := h2.Handshake("vscard"); !bytes.Equal(got, atr) {
				t.Errorf("ATR after reconnect % x, want % x", got, atr)
			}
			if got := h2.APDU(fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
				t.Errorf("SELECT ACA after reconnect: % x", got)
			}
			cancel()
			h2.Expect(fakehost.TCardRemove)
			h2.Expect(fakehost.TReaderRemove)
			h2.ExpectClose()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("runConnect: %v\n%s", err, stderr.String())
				}
			case <-time.After(20 * time.Second):
				t.Fatal("no return after cancel")
			}
		})
	}
}

// TestConnectSIGTERM runs the built command, with stdin at EOF: it must not
// spin, and SIGTERM must deliver CardRemove and ReaderRemove and exit 0.
func TestConnectSIGTERM(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the command")
	}
	dir := testCard(t)
	bin := filepath.Join(t.TempDir(), "vscard")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var stderr syncBuffer
	sock := shortSocket(t)
	cmd := exec.Command(bin, "connect", "--card", dir, "--control", sock, ln.Addr().String())
	cmd.Stderr = &stderr // stdin: /dev/null
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	h := fakehost.Accept(t, ln)
	h.Handshake("vscard")
	before := procCPU(t, cmd.Process.Pid)
	time.Sleep(500 * time.Millisecond)
	if used := procCPU(t, cmd.Process.Pid) - before; used > 100*time.Millisecond {
		t.Errorf("idle with stdin at EOF: %v of CPU in 500 ms (busy loop?)", used)
	}
	// ctl against the real process.
	var out bytes.Buffer
	if code := run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out},
		[]string{"ctl", "--control", sock, "status"}); code != exitOK || !strings.Contains(out.String(), "link: connected") {
		t.Errorf("ctl status: exit %d\n%s", code, out.String())
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	h.Expect(fakehost.TCardRemove)
	h.Expect(fakehost.TReaderRemove)
	h.ExpectClose()
	if err := cmd.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v\n%s", err, stderr.String())
	}
	if _, err := os.Stat(sock); err == nil {
		t.Error("control socket left behind after SIGTERM")
	}
}

// procCPU reads a process's user+system CPU time from /proc/PID/stat.
func procCPU(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	var ticks int64
	for _, v := range f[11:13] { // utime and stime, fields 14 and 15 of stat
		var n int64
		for _, c := range v {
			n = n*10 + int64(c-'0')
		}
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond // USER_HZ is 100 on Linux
}
