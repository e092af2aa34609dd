package vpcd

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// testATR is virt_cacard's ATR as vpcd reads it (peers.md §2.1).
var testATR = []byte{0x3b, 0x89, 0x00, 0x56, 0x43, 0x41, 0x52, 0x44, 0x5f, 0x4e, 0x53, 0x53}

// fakeCard is a card.Card that records what the transport did to it.
// transmit, if set, computes responses; the default answers 90 00.
type fakeCard struct {
	mu       sync.Mutex
	calls    []string
	atr      []byte
	transmit func(ctx context.Context, cmd []byte) ([]byte, error)
}

func (c *fakeCard) record(s string) {
	c.mu.Lock()
	c.calls = append(c.calls, s)
	c.mu.Unlock()
}

func (c *fakeCard) ATR() []byte {
	c.record("atr")
	if c.atr != nil {
		return c.atr
	}
	return testATR
}
func (c *fakeCard) PowerOn()  { c.record("on") }
func (c *fakeCard) PowerOff() { c.record("off") }
func (c *fakeCard) Reset()    { c.record("reset") }

func (c *fakeCard) Transmit(ctx context.Context, cmd []byte) ([]byte, error) {
	c.record(fmt.Sprintf("tx:%X", cmd))
	if c.transmit != nil {
		return c.transmit(ctx, cmd)
	}
	return []byte{0x90, 0x00}, nil
}

func (c *fakeCard) Calls() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.calls)
}

// fakeVPCD plays vpcd: it listens, and drives the card that connects in.
type fakeVPCD struct {
	t  testing.TB
	ln net.Listener
}

func newFakeVPCD(t testing.TB) *fakeVPCD {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &fakeVPCD{t: t, ln: ln}
}

// listenOn makes a fakeVPCD on a given address, retrying briefly in case
// the previous listener's port is still being released.
func listenOn(t testing.TB, addr string) *fakeVPCD {
	t.Helper()
	var err error
	for range 50 {
		var ln net.Listener
		if ln, err = net.Listen("tcp", addr); err == nil {
			t.Cleanup(func() { ln.Close() })
			return &fakeVPCD{t: t, ln: ln}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("listen %s: %v", addr, err)
	return nil
}

func (v *fakeVPCD) addr() string { return v.ln.Addr().String() }

// accept waits for the card to connect. split selects vpcd's own way of
// writing (length and payload in two writes, Nagle on: peers.md §4.1).
func (v *fakeVPCD) accept(split bool) *vpcdConn {
	v.t.Helper()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := v.ln.Accept()
		ch <- res{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			v.t.Fatalf("accept: %v", r.err)
		}
		if split {
			r.c.(*net.TCPConn).SetNoDelay(false)
		}
		v.t.Cleanup(func() { r.c.Close() })
		return &vpcdConn{t: v.t, c: r.c, split: split}
	case <-time.After(10 * time.Second):
		v.ln.Close()
		v.t.Fatal("card did not connect within 10s")
		return nil
	}
}

type vpcdConn struct {
	t     testing.TB
	c     net.Conn
	split bool
	wbuf  []byte
	rbuf  []byte
}

func (p *vpcdConn) send(payload []byte) error {
	p.c.SetDeadline(time.Now().Add(10 * time.Second))
	var hdr [2]byte
	binary.BigEndian.PutUint16(hdr[:], uint16(len(payload)))
	if p.split {
		if _, err := p.c.Write(hdr[:]); err != nil {
			return err
		}
		_, err := p.c.Write(payload)
		return err
	}
	p.wbuf = append(append(p.wbuf[:0], hdr[:]...), payload...)
	_, err := p.c.Write(p.wbuf)
	return err
}

func (p *vpcdConn) recv() ([]byte, error) {
	p.c.SetDeadline(time.Now().Add(10 * time.Second))
	var hdr [2]byte
	if _, err := io.ReadFull(p.c, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if cap(p.rbuf) < n {
		p.rbuf = make([]byte, n)
	}
	p.rbuf = p.rbuf[:n]
	_, err := io.ReadFull(p.c, p.rbuf)
	return p.rbuf, err
}

// must* fail the test on I/O errors.
func (p *vpcdConn) mustSend(payload []byte) {
	p.t.Helper()
	if err := p.send(payload); err != nil {
		p.t.Fatalf("vpcd send: %v", err)
	}
}

func (p *vpcdConn) mustRecv() []byte {
	p.t.Helper()
	b, err := p.recv()
	if err != nil {
		p.t.Fatalf("vpcd recv: %v", err)
	}
	return slices.Clone(b)
}

func (p *vpcdConn) transmit(apdu []byte) []byte {
	p.t.Helper()
	p.mustSend(apdu)
	return p.mustRecv()
}

// expectClosed checks that the card side closed the connection.
func (p *vpcdConn) expectClosed() {
	p.t.Helper()
	p.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 1)
	n, err := p.c.Read(b)
	if err == nil || n > 0 {
		p.t.Fatalf("connection still open: read %d bytes, err %v", n, err)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		p.t.Fatal("card side did not close the connection within 5s")
	}
}

// startServe runs Serve in the background; stop cancels it and returns
// its result, failing the test if Serve does not return promptly.
func startServe(t testing.TB, addr string, c *fakeCard, o *Options) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, addr, c, o) }()
	var once sync.Once
	var result error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case result = <-done:
			case <-time.After(2 * time.Second):
				t.Error("Serve did not return within 2s of cancel")
			}
		})
		return result
	}
	t.Cleanup(func() { stop() })
	return stop
}

// fastBackoff keeps reconnect tests quick.
func fastBackoff(log *slog.Logger) *Options {
	return &Options{Logger: log, MinBackoff: 2 * time.Millisecond, MaxBackoff: 20 * time.Millisecond}
}

// checkGoroutines fails the test if goroutines started during it are still
// running shortly after it ends. Call it first, so that its cleanup runs
// last.
func checkGoroutines(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(3 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("goroutine leak: %d before, %d after\n%s", before, n, buf)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// logRecorder is a slog.Handler that keeps records for inspection.
type logRecorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (h *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecorder) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.recs = append(h.recs, r.Clone())
	h.mu.Unlock()
	return nil
}
func (h *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *logRecorder) WithGroup(string) slog.Handler      { return h }

// levels returns the level of each record whose message is msg.
func (h *logRecorder) levels(msg string) []slog.Level {
	h.mu.Lock()
	defer h.mu.Unlock()
	var l []slog.Level
	for _, r := range h.recs {
		if r.Message == msg {
			l = append(l, r.Level)
		}
	}
	return l
}

// waitFor polls cond for up to 5 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func hexs(b []byte) string { return strings.ToUpper(fmt.Sprintf("%x", b)) }

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}
