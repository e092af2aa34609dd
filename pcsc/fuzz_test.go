package pcsc

import (
	"bufio"
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"
)

// FuzzReaderTable: any bytes pcscd might send as its reader table decode
// to an error or to entries that respect the protocol's bounds, and
// GetStatusChange's evaluation of them never panics.
func FuzzReaderTable(f *testing.F) {
	// Seeds of one or two records: decodeReaderTable takes any multiple of
	// 184 bytes, and small inputs keep the fuzzer's minimizer quick (it
	// stalled for minutes on 2944-byte full tables).
	f.Add(encodeReaderTable([]readerEntry{vReader})[:readerStateLen], uint32(0))
	f.Add(encodeReaderTable([]readerEntry{vReader, {name: "Virtual PCD 00 01", state: cardAbsent}})[:2*readerStateLen], uint32(StatePresent|1<<16))
	f.Add(make([]byte, readerStateLen), uint32(StateUnknown))
	f.Fuzz(func(t *testing.T, b []byte, cur uint32) {
		if len(b) > readerTableLen {
			return
		}
		entries, err := decodeReaderTable(b)
		if err != nil {
			return
		}
		if len(entries) > len(b)/readerStateLen {
			t.Fatalf("%d entries from %d bytes", len(entries), len(b))
		}
		states := []ReaderState{{Reader: PnPNotification, CurrentState: State(cur)}}
		for _, e := range entries {
			if len(e.atr) > maxATRSize || e.name == "" || len(e.name) >= maxReaderName {
				t.Fatalf("entry out of bounds: %+v", e)
			}
			states = append(states, ReaderState{Reader: e.name, CurrentState: State(cur)})
		}
		w := watch{states: states, readers: 0}
		w.evaluate(entries)
		w.evaluate(nil) // every reader gone
		if len(entries) <= maxReaders {
			again, err := decodeReaderTable(encodeReaderTable(entries))
			if err != nil || len(again) != len(entries) {
				t.Fatalf("re-encoded table: %v, %d entries of %d", err, len(again), len(entries))
			}
			for i := range again {
				if again[i].name != entries[i].name || !bytes.Equal(again[i].atr, entries[i].atr) ||
					again[i].state != entries[i].state || again[i].eventCounter != entries[i].eventCounter {
					t.Fatalf("round trip changed entry %d: %+v -> %+v", i, entries[i], again[i])
				}
			}
		}
	})
}

// fuzzOps are the calls FuzzReplies drives against a stream of replies.
var fuzzOps = []func(c *Context, k *Card){
	func(c *Context, k *Card) { c.ListReaders() },
	func(c *Context, k *Card) { c.Readers() },
	func(c *Context, k *Card) { c.Connect(vReader.name, ShareShared, ProtocolAny) },
	func(c *Context, k *Card) { k.Transmit([]byte{0x00, 0xA4, 0x04, 0x00, 0x00}) },
	func(c *Context, k *Card) { k.Status() },
	func(c *Context, k *Card) { k.Reconnect(ShareShared, ProtocolAny, ResetCard) },
	func(c *Context, k *Card) { k.Disconnect(LeaveCard) },
	func(c *Context, k *Card) { k.BeginTransaction(context.Background()) },
	func(c *Context, k *Card) { k.EndTransaction(LeaveCard) },
	func(c *Context, k *Card) { k.Control(CtlCode(3400), nil) },
	func(c *Context, k *Card) { k.GetAttrib(AttrATRString) },
	func(c *Context, k *Card) {
		c.GetStatusChange(context.Background(), 0, []ReaderState{{Reader: vReader.name}, {Reader: PnPNotification}})
	},
	func(c *Context, k *Card) {
		c.GetStatusChange(context.Background(), 0, []ReaderState{{Reader: vReader.name, CurrentState: StatePresent}})
	},
	func(c *Context, k *Card) { c.Release() },
}

// FuzzReplies feeds arbitrary bytes to the client as pcscd's replies to
// each call: every decoder of daemon data runs on them, and the client
// must answer with values or errors, never panic or allocate beyond the
// protocol's buffers.
func FuzzReplies(f *testing.F) {
	table := []byte{0xFE, 0xFE, 0} // expandTables: vReader's table
	tr := words(0x77, 2, 16, 5, 3, 16, 2, 0)
	f.Add(uint8(0), uint8(4), table)
	f.Add(uint8(3), uint8(4), append(tr, 0x90, 0x00))
	f.Add(uint8(4), uint8(4), append(bytes.Clone(table), words(0x77, 0)...))
	f.Add(uint8(7), uint8(4), words(0x77, uint32(ErrSharingViolation), 0x77, 0))
	f.Add(uint8(9), uint8(4), append(words(0x77, CtlCode(3400), 0, MaxAPDU, 2, 0), 1, 2))
	f.Add(uint8(11), uint8(5), append(append(words(3, 0), table...), words(0, 0)...))
	f.Add(uint8(12), uint8(4), append(append(bytes.Clone(table), words(0, 0)...), table...))
	f.Fuzz(func(t *testing.T, op, minor uint8, replies []byte) {
		if len(replies) > 4<<10 {
			return // longer streams only repeat the same decoders, slowly
		}
		conn := &replayConn{r: bytes.NewReader(expandTables(replies))}
		c := &Context{socket: "/nonexistent/pcscd.comm", log: slog.New(slog.DiscardHandler),
			minor: int32(4 + minor%2), hctx: 1, conn: conn, r: bufio.NewReader(conn), pollMax: -1}
		k := &Card{c: c, h: 0x77, reader: vReader.name, proto: ProtocolT1}
		fuzzOps[int(op)%len(fuzzOps)](c, k)
	})
}

// replayConn is a net.Conn whose peer has sent replies and closed: reads
// return them and then EOF, writes vanish. A read deadline in the past
// fails reads the way a socket's does. (No goroutines: fuzzing stays fast.)
type replayConn struct {
	r        *bytes.Reader
	deadline time.Time
	closed   bool
}

func (c *replayConn) Read(b []byte) (int, error) {
	if c.closed {
		return 0, net.ErrClosed
	}
	if !c.deadline.IsZero() && !time.Now().Before(c.deadline) {
		return 0, os.ErrDeadlineExceeded
	}
	return c.r.Read(b)
}

func (c *replayConn) Write(b []byte) (int, error) {
	if c.closed {
		return 0, net.ErrClosed
	}
	return len(b), nil
}

func (c *replayConn) Close() error                       { c.closed = true; return nil }
func (c *replayConn) LocalAddr() net.Addr                { return nil }
func (c *replayConn) RemoteAddr() net.Addr               { return nil }
func (c *replayConn) SetDeadline(t time.Time) error      { c.deadline = t; return nil }
func (c *replayConn) SetReadDeadline(t time.Time) error  { c.deadline = t; return nil }
func (c *replayConn) SetWriteDeadline(t time.Time) error { return nil }

// fuzzTables are the reader tables expandTables inserts.
var fuzzTables = [][]byte{
	encodeReaderTable([]readerEntry{vReader}),
	encodeReaderTable(nil),
	encodeReaderTable([]readerEntry{vReader, {name: "Virtual PCD 00 01", state: cardAbsent}}),
	encodeReaderTable([]readerEntry{{name: vReader.name, eventCounter: 2, state: cardAbsent}}),
	encodeReaderTable([]readerEntry{{name: vReader.name, eventCounter: 9, state: cardPresent | cardSwallowed, sharing: -1}}),
}

// expandTables replaces each FE FE n in a fuzz input with reader table
// n%len(fuzzTables). A table is 2944 bytes; spelling them out made every
// input huge and the fuzzer spent its time minimizing them (each run of
// the minimizer removes one byte at a time). Raw table bytes still reach
// the decoder here, and FuzzReaderTable fuzzes it directly.
func expandTables(b []byte) []byte {
	var out []byte
	for i := 0; i < len(b); i++ {
		if i+2 < len(b) && b[i] == 0xFE && b[i+1] == 0xFE {
			out = append(out, fuzzTables[int(b[i+2])%len(fuzzTables)]...)
			i += 2
			continue
		}
		out = append(out, b[i])
	}
	return out
}
