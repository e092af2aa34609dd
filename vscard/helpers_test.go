package vscard

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// cacATR is the ATR vscclient sends for a libcacard CAC card (peers.md §1.3).
var cacATR = mustHex("3b7a18000073667465206364313434")

func mustHex(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

// fakeCard is a card.Card that records what the transport did to it and
// answers with respond (default: 90 00).
type fakeCard struct {
	atr     []byte
	respond func(ctx context.Context, cmd []byte) ([]byte, error)

	mu    sync.Mutex
	calls []string
}

func (c *fakeCard) record(s string) {
	c.mu.Lock()
	c.calls = append(c.calls, s)
	c.mu.Unlock()
}

func (c *fakeCard) ATR() []byte {
	if c.atr != nil {
		return c.atr
	}
	return cacATR
}
func (c *fakeCard) PowerOn()  { c.record("on") }
func (c *fakeCard) PowerOff() { c.record("off") }
func (c *fakeCard) Reset()    { c.record("reset") }
func (c *fakeCard) Transmit(ctx context.Context, cmd []byte) ([]byte, error) {
	c.record(fmt.Sprintf("tx:%X", cmd))
	if c.respond != nil {
		return c.respond(ctx, cmd)
	}
	return []byte{0x90, 0x00}, nil
}

// powerCalls returns the power events only.
func (c *fakeCard) powerCalls() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, s := range c.calls {
		if !strings.HasPrefix(s, "tx:") {
			out = append(out, s)
		}
	}
	return out
}

// listen returns a loopback TCP listener and a dial function for Client.
func listen(t testing.TB) (net.Listener, func(ctx context.Context) (net.Conn, error)) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var d net.Dialer
	return ln, func(ctx context.Context) (net.Conn, error) {
		return d.DialContext(ctx, "tcp", ln.Addr().String())
	}
}

// accept waits for one connection on ln.
func accept(t testing.TB, ln net.Listener) net.Conn {
	t.Helper()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatal(r.err)
		}
		t.Cleanup(func() { r.c.Close() })
		return r.c
	case <-time.After(5 * time.Second):
		t.Fatal("no connection from the client")
		return nil
	}
}

// msg encodes one message.
func msg(t MsgType, reader uint32, payload []byte) []byte {
	return AppendMessage(nil, Message{Type: t, ReaderID: reader, Payload: payload})
}

// readMsg reads one message from c with a deadline.
func readMsg(t testing.TB, c net.Conn) Message {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, _, err := ReadMessage(c, nil)
	if err != nil {
		t.Fatalf("reading from client: %v", err)
	}
	m.Payload = slices.Clone(m.Payload)
	return m
}

// expectMsg reads one message and checks its type, reader and payload.
func expectMsg(t testing.TB, c net.Conn, typ MsgType, reader uint32, payload []byte) {
	t.Helper()
	m := readMsg(t, c)
	if m.Type != typ || m.ReaderID != reader || !bytes.Equal(m.Payload, payload) {
		t.Fatalf("client sent %v reader %d payload %X; want %v reader %d payload %X",
			m.Type, m.ReaderID, m.Payload, typ, reader, payload)
	}
}

// handshake plays QEMU's side of the handshake and returns once the ATR
// (if withCard) has been acknowledged.
func handshake(t testing.TB, c net.Conn, withCard bool, atr []byte) {
	t.Helper()
	expectMsg(t, c, MsgInit, 0, InitPayload(0))
	c.Write(msg(MsgInit, UndefinedReaderID, InitPayload(0)))
	expectMsg(t, c, MsgReaderRemove, 0, nil)
	expectMsg(t, c, MsgReaderAdd, 0, nil)
	ok := msg(MsgError, 0, ErrorPayload(CodeOK))
	c.Write(ok)
	c.Write(ok)
	if withCard {
		expectMsg(t, c, MsgATR, 0, atr)
		c.Write(ok)
	}
}

// step is one line of a replay script (testdata/qemu72-session.txt).
type step struct {
	dir    string   // "C", "Q", "Q@rr", "!", "EOF"
	writes [][]byte // C: one element; Q: the separate writes
	action string   // for "!"
	line   int
}

// loadScript parses a replay script; see the file's header for the format.
func loadScript(t testing.TB, path string) []step {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var steps []step
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		s := step{dir: fields[0], line: n}
		switch s.dir {
		case "!":
			s.action = fields[1]
		case "EOF":
		case "C", "Q", "Q@rr":
			var cur []byte
			for _, f := range fields[1:] {
				if f == "|" {
					s.writes = append(s.writes, cur)
					cur = nil
					continue
				}
				if rep, ok := strings.CutPrefix(f, "*"); ok {
					cnt, val, _ := strings.Cut(rep, ":")
					k, err1 := strconv.Atoi(cnt)
					v, err2 := hex.DecodeString(val)
					if err1 != nil || err2 != nil || len(v) != 1 {
						t.Fatalf("%s:%d: bad repeat %q", path, n, f)
					}
					cur = append(cur, bytes.Repeat(v, k)...)
					continue
				}
				b, err := hex.DecodeString(f)
				if err != nil {
					t.Fatalf("%s:%d: %v", path, n, err)
				}
				cur = append(cur, b...)
			}
			s.writes = append(s.writes, cur)
		default:
			t.Fatalf("%s:%d: unknown step %q", path, n, s.dir)
		}
		steps = append(steps, s)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return steps
}

// joined returns all bytes of a step.
func (s step) joined() []byte { return bytes.Join(s.writes, nil) }

// scriptResponses maps each command APDU the script's host sends to the
// response APDU the client must send back next, so that a fake card can
// answer as libcacard did in the capture.
func scriptResponses(t testing.TB, steps []step) map[string][]byte {
	t.Helper()
	resp := map[string][]byte{}
	for i, s := range steps {
		b := s.joined()
		if s.dir != "Q" || MsgType(be32(b)) != MsgAPDU {
			continue
		}
		for _, n := range steps[i+1:] {
			if n.dir == "C" {
				nb := n.joined()
				if MsgType(be32(nb)) == MsgAPDU {
					resp[string(b[HeaderSize:])] = nb[HeaderSize:]
				}
				break
			}
		}
	}
	return resp
}

func be32(b []byte) uint32 {
	if len(b) < 4 {
		return 0
	}
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// readExactly reads n bytes from c or fails the test.
func readExactly(t testing.TB, c net.Conn, n int) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, n)
	if k, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes from client: got %d (%X): %v", n, k, b[:k], err)
	}
	return b
}

// expectEOF checks that the client closed its side.
func expectEOF(t testing.TB, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [64]byte
	n, err := c.Read(b[:])
	if n > 0 || err != io.EOF {
		t.Fatalf("want EOF from client, got %d bytes %X, err %v", n, b[:n], err)
	}
}

// waitRun waits for Run's result.
func waitRun(t testing.TB, ch <-chan error) {
	t.Helper()
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("Run did not return; goroutines:\n%s", buf[:runtime.Stack(buf, true)])
	}
}

// eventually polls cond until it holds or a deadline passes.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// expectDropped checks that the client closed the connection (EOF, or a
// reset when it closed with our bytes unread), or that the test did.
func expectDropped(t testing.TB, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [64]byte
	for {
		_, err := c.Read(b[:])
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed) {
			return
		}
		t.Fatalf("want the client to drop the connection, got %v", err)
	}
}
