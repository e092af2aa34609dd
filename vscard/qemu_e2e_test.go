package vscard

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// qemuInstance is a qemu-system-x86_64 with usb-ccid and
// ccid-card-passthru and no guest OS: QEMU answers the VSCard handshake
// by itself (peers.md §1.1).
type qemuInstance struct {
	cmd *exec.Cmd
	out *lockedBuffer
}

// lockedBuffer collects QEMU's output for failure messages.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startQEMU starts QEMU with its passthru chardev listening on port.
func startQEMU(t *testing.T, bin string, port int) *qemuInstance {
	t.Helper()
	out := &lockedBuffer{}
	cmd := exec.Command(bin,
		"-M", "q35", "-m", "64", "-nodefaults", "-display", "none", "-nographic", "-accel", "tcg",
		// Paused: chardevs are served by the main loop while the CPU is
		// stopped, and a stopped CPU costs no TCG time.
		"-S",
		"-device", "qemu-xhci", "-device", "usb-ccid",
		"-chardev", fmt.Sprintf("socket,id=ccid,host=127.0.0.1,port=%d,server=on,wait=off,nodelay=on", port),
		"-device", "ccid-card-passthru,chardev=ccid",
		"-monitor", "none", "-serial", "none")
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start QEMU: %v", err)
	}
	q := &qemuInstance{cmd: cmd, out: out}
	t.Cleanup(func() { q.stop() })
	return q
}

func (q *qemuInstance) stop() {
	if q.cmd.ProcessState == nil {
		q.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { q.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			q.cmd.Process.Kill()
			<-done
		}
	}
}

// freePort picks a loopback port nobody listens on right now.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// traceLog collects trace events of messages from the host.
type traceLog struct {
	mu sync.Mutex
	in []TraceEvent
}

func (l *traceLog) add(e TraceEvent) {
	if e.Dir == "in" {
		l.mu.Lock()
		l.in = append(l.in, e)
		l.mu.Unlock()
	}
}

func (l *traceLog) snapshot() []TraceEvent {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]TraceEvent(nil), l.in...)
}

// describe renders host messages as "Init/ffffffff/565343...", one per
// element.
func describe(evs []TraceEvent) []string {
	var out []string
	for _, e := range evs {
		out = append(out, fmt.Sprintf("%v/%08x/%X", e.Type, e.ReaderID, e.Command))
	}
	return out
}

// TestRealQEMU runs the client against QEMU 7.2's ccid-card-passthru and
// checks QEMU's answers (peers.md §1.3): Init with reader 0xFFFFFFFF, then
// Error(ok) for ReaderRemove, ReaderAdd and ATR; Error(ok) for CardRemove
// and a re-inserted ATR; a second client after the first quit; and a
// reconnect after QEMU restarts on the same port.
//
// It needs VSCARD_E2E=1 and the Debian package qemu-system-x86.
func TestRealQEMU(t *testing.T) {
	if os.Getenv("VSCARD_E2E") != "1" {
		t.Skip("set VSCARD_E2E=1 to run against a real QEMU")
	}
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal("VSCARD_E2E=1 but qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
	}
	port := freePort(t)
	q := startQEMU(t, bin, port)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	var d net.Dialer
	dial := func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }

	initMsg := fmt.Sprintf("Init/ffffffff/%X", InitPayload(0))
	ok := "Error/00000000/00000000"
	expectLog := func(t *testing.T, l *traceLog, want []string) {
		t.Helper()
		var got []string
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if got = describe(l.snapshot()); strings.Join(got, " ") == strings.Join(want, " ") {
				return
			}
		}
		t.Fatalf("QEMU sent\n%s\nwant\n%s\nQEMU output:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"), q.out)
	}

	for round := range 2 {
		// Round 1 is a reconnect to a QEMU whose previous client left.
		var l traceLog
		cd := &fakeCard{}
		cl := NewClient(dial, cd, &ClientOptions{MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, Trace: l.add, QEMU54Workaround: true})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- cl.Run(ctx) }()
		expectLog(t, &l, []string{initMsg, ok, ok, ok})
		if err := cl.Remove(); err != nil {
			t.Fatal(err)
		}
		expectLog(t, &l, []string{initMsg, ok, ok, ok, ok})
		if err := cl.Insert(nil); err != nil {
			t.Fatal(err)
		}
		expectLog(t, &l, []string{initMsg, ok, ok, ok, ok, ok})
		cancel()
		// The shutdown's CardRemove and ReaderRemove reached QEMU: both acked.
		expectLog(t, &l, []string{initMsg, ok, ok, ok, ok, ok, ok, ok})
		waitRun(t, done)
		t.Logf("round %d: %d messages from QEMU as expected", round, len(l.snapshot()))
	}

	// QEMU restarts while the client runs: the client comes back by itself.
	var l traceLog
	cl := NewClient(dial, &fakeCard{}, &ClientOptions{MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, Trace: l.add})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- cl.Run(ctx) }()
	expectLog(t, &l, []string{initMsg, ok, ok, ok})
	q.stop()
	q = startQEMU(t, bin, port)
	expectLog(t, &l, []string{initMsg, ok, ok, ok, initMsg, ok, ok, ok})
	if st := cl.Status(); st.Connects != 2 {
		t.Errorf("status after QEMU restart: %+v", st)
	}
	cancel()
	waitRun(t, done)
}
