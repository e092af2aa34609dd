package vscard

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// recordConn is a net.Conn whose reads come from a fixed stream and whose
// writes are recorded one by one.
type recordConn struct {
	r      io.Reader
	writes [][]byte
}

func (c *recordConn) Read(b []byte) (int, error) { return c.r.Read(b) }
func (c *recordConn) Write(b []byte) (int, error) {
	c.writes = append(c.writes, bytes.Clone(b))
	return len(b), nil
}
func (c *recordConn) Close() error                     { return nil }
func (c *recordConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *recordConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *recordConn) SetDeadline(time.Time) error      { return nil }
func (c *recordConn) SetReadDeadline(time.Time) error  { return nil }
func (c *recordConn) SetWriteDeadline(time.Time) error { return nil }

// checkWrites asserts that every write is exactly one well-formed message
// within QEMU's limits, and that no APDU response is 54 bytes.
func checkWrites(t *testing.T, writes [][]byte, no54 bool) {
	for _, w := range writes {
		m, _, err := ReadMessage(bytes.NewReader(w), nil)
		if err != nil {
			t.Fatalf("wrote a malformed message %X: %v", w, err)
		}
		if HeaderSize+len(m.Payload) != len(w) {
			t.Fatalf("one write carried more than one message: %X", w)
		}
		if len(m.Payload) > maxQEMUPayload {
			t.Fatalf("wrote %d payload bytes", len(m.Payload))
		}
		if m.Type == MsgInit && len(m.Payload) < initPayloadSize {
			t.Fatalf("wrote a short Init")
		}
		if no54 && m.Type == MsgAPDU && len(m.Payload) == qemuBadLen {
			t.Fatalf("wrote a 54-byte response with the workaround on")
		}
	}
}

// FuzzClientSession feeds a host stream to a client session whose card
// answers with bytes taken from the input. The client must never panic,
// write anything but single well-formed messages, or send a 54-byte
// response with the workaround on.
func FuzzClientSession(f *testing.F) {
	hs := msg(MsgInit, UndefinedReaderID, InitPayload(0))
	ok := msg(MsgError, 0, ErrorPayload(CodeOK))
	var seed []byte
	seed = append(seed, hs...)
	seed = append(seed, ok...)
	seed = append(seed, ok...)
	seed = append(seed, ok...)
	seed = append(seed, msg(MsgAPDU, 0, mustHex("00b0000034"))...)
	seed = append(seed, msg(MsgAPDU, 0, mustHex("00c0000010"))...)
	seed = append(seed, msg(MsgFlush, 0, nil)...)
	f.Add(seed, bytes.Repeat([]byte{0x42}, 54), true)
	f.Add(append(hs, msg(MsgType(77), 3, []byte{1})...), []byte{0x90, 0x00}, false)
	f.Add(append(hs, mustHex("00000002 00000000 00000004 01000000")...), []byte{}, true)
	f.Fuzz(func(t *testing.T, stream, resp []byte, workaround bool) {
		cd := &fakeCard{respond: func(context.Context, []byte) ([]byte, error) {
			return bytes.Clone(resp), nil
		}}
		c := NewClient(nil, cd, &ClientOptions{QEMU54Workaround: workaround, Logger: slog.New(slog.DiscardHandler)})
		rc := &recordConn{r: bytes.NewReader(stream)}
		s := &session{c: c, ctx: context.Background(), raw: rc, conn: rc, log: c.o.Logger}
		c.sess = s
		var buf []byte
		for range 1000 {
			m, nb, err := ReadMessage(rc, buf)
			buf = nb
			if err != nil {
				break
			}
			c.mu.Lock()
			err = s.handle(m)
			c.mu.Unlock()
			if err != nil {
				break
			}
		}
		checkWrites(t, rc.writes, workaround)
	})
}

// FuzzHostSession feeds a client stream to a Host: it must never panic,
// and every reply must be one well-formed message.
func FuzzHostSession(f *testing.F) {
	f.Add(append(msg(MsgInit, 0, InitPayload(0)), msg(MsgATR, 0, cacATR)...))
	f.Add(append(msg(MsgReaderAdd, 0, []byte("r\xff")), msg(MsgAPDU, 0, []byte{0x90, 0})...))
	f.Add(mustHex("00000005 00000000 00000004 3bf0ffff"))
	f.Fuzz(func(t *testing.T, stream []byte) {
		rc := &recordConn{r: bytes.NewReader(stream)}
		h := NewHost(rc, nil)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() {
			for range h.Events() {
			}
		}()
		err := h.Serve(ctx)
		if err == nil {
			t.Fatal("Serve returned nil at end of stream")
		}
		checkWrites(t, rc.writes, false)
	})
}
