package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/fakehost"
)

// TestPassthruWithoutDaemon: -e passthru with no pcscd links up with the
// host, adds no reader until one exists, says what it waits for, and exits
// cleanly. (test/e2e/passthru_test.go covers a real pcscd.)
func TestPassthruWithoutDaemon(t *testing.T) {
	for _, emul := range []string{"passthru", "use_hw=yes hw_type=PASSTHRU"} {
		t.Run(emul, func(t *testing.T) {
			t.Setenv("PCSCLITE_CSOCK_NAME", filepath.Join(t.TempDir(), "none.comm"))
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			host, port, _ := net.SplitHostPort(ln.Addr().String())
			stdinR, stdinW := io.Pipe()
			defer stdinW.Close()
			var stdout, stderr syncBuffer
			done := make(chan int, 1)
			go func() { done <- run(context.Background(), []string{"-e", emul, host, port}, stdinR, &stdout, &stderr) }()
			h := fakehost.Accept(t, ln)
			h.Expect(fakehost.TInit)
			h.Expect(fakehost.TReaderRemove)
			waitFor(t, "the wait for pcscd in the log", func() bool { return strings.Contains(stderr.String(), "waiting for pcscd") })
			io.WriteString(stdinW, "list\n")
			waitFor(t, "list", func() bool { return strings.Contains(stdout.String(), "(no PC/SC reader yet)") })
			io.WriteString(stdinW, "insert\n")
			waitFor(t, "insert", func() bool { return strings.Contains(stdout.String(), "error: no card to insert") })
			io.WriteString(stdinW, "exit\n")
			h.Expect(fakehost.TReaderRemove)
			h.ExpectClose()
			select {
			case code := <-done:
				if code != exitOK {
					t.Errorf("exit %d\n%s", code, stderr.String())
				}
			case <-time.After(20 * time.Second):
				t.Fatal("vscclient did not exit")
			}
		})
	}
}

// TestMirrorWithoutDaemon: -p with no physical card still serves the soft
// card and says that nothing is mirrored.
func TestMirrorWithoutDaemon(t *testing.T) {
	t.Setenv("PCSCLITE_CSOCK_NAME", filepath.Join(t.TempDir(), "none.comm"))
	dir := testStore(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	var stdout, stderr syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"-p", "-e", `db="` + dir + `" use_hw=no soft=(,Test,CAC,,id)`, host, port},
			strings.NewReader(""), &stdout, &stderr)
	}()
	h := fakehost.Accept(t, ln)
	h.Handshake("Test")
	if got := h.APDU(fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
		t.Errorf("SELECT ACA: % x, want 61 0d", got)
	}
	if !strings.Contains(stderr.String(), "-p: no pcscd") {
		t.Errorf("log does not say why nothing is mirrored:\n%s", stderr.String())
	}
	cancel()
	h.Expect(fakehost.TCardRemove)
	h.Expect(fakehost.TReaderRemove)
	select {
	case code := <-done:
		if code != exitOK {
			t.Errorf("exit %d\n%s", code, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("vscclient did not exit")
	}
}
