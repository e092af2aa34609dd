package vscard

import (
	"bytes"
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// clientRig is a Client under test connected to a test-controlled host.
type clientRig struct {
	cl     *Client
	ln     net.Listener
	conn   net.Conn // the host side of the current connection
	cancel context.CancelFunc
	done   chan error
	dials  *atomic.Int32
}

// startClient runs a Client against a loopback listener and accepts its
// first connection. The handshake is left to the test.
func startClient(t *testing.T, cd *fakeCard, opts *ClientOptions) *clientRig {
	t.Helper()
	ln, dial := listen(t)
	var dials atomic.Int32
	counting := func(ctx context.Context) (net.Conn, error) {
		dials.Add(1)
		return dial(ctx)
	}
	if opts == nil {
		opts = &ClientOptions{}
	}
	if opts.MinBackoff == 0 {
		opts.MinBackoff = 5 * time.Millisecond
		opts.MaxBackoff = 20 * time.Millisecond
	}
	var c *Client
	if cd == nil {
		c = NewClient(counting, nil, opts)
	} else {
		c = NewClient(counting, cd, opts)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &clientRig{cl: c, ln: ln, cancel: cancel, done: make(chan error, 1), dials: &dials}
	stopped := make(chan struct{})
	go func() {
		r.done <- c.Run(ctx)
		close(stopped)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	r.conn = accept(t, ln)
	return r
}

func TestClientUnknownAndMisdirectedTypes(t *testing.T) {
	cd := &fakeCard{}
	r := startClient(t, cd, nil)
	handshake(t, r.conn, true, cacATR)
	general := ErrorPayload(CodeGeneralError)
	for _, m := range []Message{
		{Type: MsgType(42), ReaderID: 7, Payload: []byte{1, 2, 3}},
		{Type: MsgType(0), ReaderID: 0},
		{Type: MsgReaderAdd, ReaderID: 0, Payload: []byte("x")},
		{Type: MsgATR, ReaderID: 1, Payload: cacATR},
		{Type: MsgFlushComplete, ReaderID: 0},
	} {
		r.conn.Write(AppendMessage(nil, m))
		// QEMU's answer to the unexpected: a general error echoing the
		// reader id (protocols.md §1.5); the client then keeps reading.
		expectMsg(t, r.conn, MsgError, m.ReaderID, general)
	}
	r.conn.Write(msg(MsgAPDU, 0, mustHex("00a4040007a0000000790100")))
	expectMsg(t, r.conn, MsgAPDU, 0, []byte{0x90, 0x00})
}

// TestClientDropsBadLink covers streams the client cannot go on with: it
// must drop the connection, dial again after a backoff and replay the
// whole sequence, without panicking or allocating the claimed size.
func TestClientDropsBadLink(t *testing.T) {
	tests := []struct {
		name string
		// play runs after the client's Init; it may write anything.
		play func(t *testing.T, c net.Conn)
	}{
		{"Init shorter than 12 bytes", func(t *testing.T, c net.Conn) {
			c.Write(msg(MsgInit, UndefinedReaderID, mustHex("5653434400000002000000")))
		}},
		{"Init with wrong magic", func(t *testing.T, c net.Conn) {
			c.Write(msg(MsgInit, UndefinedReaderID, mustHex("565343450000000200000000")))
		}},
		{"oversized length", func(t *testing.T, c net.Conn) {
			c.Write(mustHex("00000007 00000000 00010001"))
		}},
		{"4 GiB length", func(t *testing.T, c net.Conn) {
			c.Write(mustHex("00000007 00000000 ffffffff 00a4"))
		}},
		{"half a header, then close", func(t *testing.T, c net.Conn) {
			c.Write(mustHex("000000010000"))
			c.Close()
		}},
		{"half a payload, then close", func(t *testing.T, c net.Conn) {
			c.Write(mustHex("00000001 ffffffff 0000000c 5653434400"))
			c.Close()
		}},
		{"clean close after handshake", func(t *testing.T, c net.Conn) {
			c.Write(msg(MsgInit, UndefinedReaderID, InitPayload(0)))
			expectMsg(t, c, MsgReaderRemove, 0, nil)
			expectMsg(t, c, MsgReaderAdd, 0, nil)
			c.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
			c.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
			expectMsg(t, c, MsgATR, 0, cacATR)
			c.Close()
		}},
		{"reader refused", func(t *testing.T, c net.Conn) {
			c.Write(msg(MsgInit, UndefinedReaderID, InitPayload(0)))
			expectMsg(t, c, MsgReaderRemove, 0, nil)
			expectMsg(t, c, MsgReaderAdd, 0, nil)
			c.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
			c.Write(msg(MsgError, UndefinedReaderID, ErrorPayload(CodeCannotAddReaders)))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cd := &fakeCard{}
			r := startClient(t, cd, nil)
			expectMsg(t, r.conn, MsgInit, 0, InitPayload(0))
			tt.play(t, r.conn)
			// The client gives up on this connection ...
			expectDropped(t, r.conn)
			// ... and comes back with the full sequence.
			c2 := accept(t, r.ln)
			handshake(t, c2, true, cacATR)
			c2.Write(msg(MsgAPDU, 0, []byte{0x00, 0xb0, 0x00, 0x00, 0x01}))
			expectMsg(t, c2, MsgAPDU, 0, []byte{0x90, 0x00})
			if st := r.cl.Status(); st.LastError == "" {
				t.Errorf("status has no LastError after a dropped link: %+v", st)
			}
		})
	}
}

// TestClientReconnectNoBusyLoop: a host that accepts and closes at once
// (QEMU gone, port taken by something else) must cost a bounded number of
// dial attempts, growing apart with the backoff; vscclient spins at 100%
// CPU on EOF instead (peers.md §1.3).
func TestClientReconnectNoBusyLoop(t *testing.T) {
	ln, dial := listen(t)
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	var dials atomic.Int32
	cl := NewClient(func(ctx context.Context) (net.Conn, error) {
		dials.Add(1)
		return dial(ctx)
	}, &fakeCard{}, &ClientOptions{MinBackoff: 10 * time.Millisecond, MaxBackoff: 80 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := cl.Run(ctx); err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	n := dials.Load()
	// Waits (jittered to [d/2,d]): 10,20,40,80,80,... ms → at most
	// 3 + 700/40 attempts; a busy loop would make thousands.
	if n < 4 || n > 22 {
		t.Errorf("%d dial attempts in %v, want between 4 and 22", n, elapsed)
	}
	if accepted.Load() < 3 {
		t.Errorf("host saw only %d connections", accepted.Load())
	}
	if elapsed > 2*time.Second {
		t.Errorf("Run took %v to return after its context ended", elapsed)
	}
}

// TestClientHostRestart: QEMU restarting while the client runs: the client
// reconnects and replays Init, ReaderRemove, ReaderAdd and ATR, and powers
// the card off in between (volatile card state must not survive).
func TestClientHostRestart(t *testing.T) {
	cd := &fakeCard{}
	r := startClient(t, cd, nil)
	for i := range 3 {
		handshake(t, r.conn, true, cacATR)
		r.conn.Write(msg(MsgAPDU, 0, []byte{0x00, 0x20, 0x00, 0x00, 0x00}))
		expectMsg(t, r.conn, MsgAPDU, 0, []byte{0x90, 0x00})
		eventually(t, "connected status", func() bool { return r.cl.Status().Connected })
		r.conn.Close()
		if i < 2 {
			r.conn = accept(t, r.ln)
		}
	}
	eventually(t, "disconnected status", func() bool { return !r.cl.Status().Connected })
	if got, want := cd.powerCalls(), []string{"on", "off", "on", "off", "on", "off"}; !slices.Equal(got, want) {
		t.Errorf("power events %v, want %v", got, want)
	}
	if st := r.cl.Status(); st.Connects != 3 || st.APDUs != 3 {
		t.Errorf("status %+v, want 3 connects and 3 APDUs", st)
	}
}

func TestClientFlush(t *testing.T) {
	release := make(chan struct{})
	cd := &fakeCard{respond: func(ctx context.Context, cmd []byte) ([]byte, error) {
		if cmd[1] == 0x42 {
			<-release // a slow signature
		}
		return []byte{0x61, 0x00}, nil
	}}
	r := startClient(t, cd, nil)
	handshake(t, r.conn, true, cacATR)

	// A Flush with nothing after it is answered at once (vscclient waits
	// for more bytes, peers.md §1.4).
	r.conn.Write(msg(MsgFlush, 0, nil))
	expectMsg(t, r.conn, MsgFlushComplete, 0, nil)

	// A Flush behind an outstanding APDU is answered after the APDU.
	var both []byte
	both = append(both, msg(MsgAPDU, 0, mustHex("8042000000"))...)
	both = append(both, msg(MsgFlush, 0, nil)...)
	r.conn.Write(both)
	r.conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	var b [1]byte
	if n, _ := r.conn.Read(b[:]); n != 0 {
		t.Fatal("client answered while the APDU was outstanding")
	}
	close(release)
	expectMsg(t, r.conn, MsgAPDU, 0, []byte{0x61, 0x00})
	expectMsg(t, r.conn, MsgFlushComplete, 0, nil)
}

func TestClientInsertRemove(t *testing.T) {
	r := startClient(t, nil, nil)
	if err := r.cl.Remove(); !errors.Is(err, ErrNoCard) {
		t.Errorf("Remove with no card: %v", err)
	}
	if err := r.cl.Insert(nil); !errors.Is(err, ErrNoCard) {
		t.Errorf("Insert(nil) with nothing to re-insert: %v", err)
	}
	// No card: the handshake ends at the reader.
	handshake(t, r.conn, false, nil)
	// An APDU without a card gets vscclient's answer: an Error.
	r.conn.Write(msg(MsgAPDU, 0, mustHex("00a4040000")))
	expectMsg(t, r.conn, MsgError, 0, ErrorPayload(CodeGeneralError))

	a := &fakeCard{atr: mustHex("3b8900 5643 4152 445f 4e53 53")}
	b := &fakeCard{}
	if err := r.cl.Insert(a); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, r.conn, MsgATR, 0, a.atr)
	r.conn.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	if err := r.cl.Insert(b); !errors.Is(err, ErrCardInserted) {
		t.Errorf("second Insert: %v", err)
	}
	if !r.cl.Status().CardInserted {
		t.Error("status: no card after Insert")
	}
	if err := r.cl.Remove(); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, r.conn, MsgCardRemove, 0, nil)
	r.conn.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	if err := r.cl.Insert(b); err != nil {
		t.Fatal(err)
	}
	expectMsg(t, r.conn, MsgATR, 0, cacATR)
	r.conn.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	r.conn.Write(msg(MsgAPDU, 0, mustHex("00a4040000")))
	expectMsg(t, r.conn, MsgAPDU, 0, []byte{0x90, 0x00})
	if got, want := a.powerCalls(), []string{"on", "off"}; !slices.Equal(got, want) {
		t.Errorf("card a power %v, want %v", got, want)
	}
	if got := b.powerCalls(); !slices.Equal(got, []string{"on"}) {
		t.Errorf("card b power %v", got)
	}

	// Shutdown with card b in: CardRemove then ReaderRemove, acked, then EOF.
	r.cancel()
	expectMsg(t, r.conn, MsgCardRemove, 0, nil)
	expectMsg(t, r.conn, MsgReaderRemove, 0, nil)
	r.conn.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	r.conn.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	expectEOF(t, r.conn)
	waitRun(t, r.done)
	if got := b.powerCalls(); !slices.Equal(got, []string{"on", "off"}) {
		t.Errorf("card b power after shutdown %v", got)
	}
}

// TestClientShutdownWithoutAcks: a host that never acknowledges must not
// hold the shutdown longer than the linger time, and the messages must
// still arrive before EOF. Over net.Pipe there is no half-close at all.
func TestClientShutdownWithoutAcks(t *testing.T) {
	for _, transport := range []string{"tcp", "pipe"} {
		t.Run(transport, func(t *testing.T) {
			var hostSide net.Conn
			var cl *Client
			if transport == "tcp" {
				r := startClient(t, &fakeCard{}, nil)
				cl, hostSide = r.cl, r.conn
				handshake(t, hostSide, true, cacATR)
				start := time.Now()
				r.cancel()
				expectMsg(t, hostSide, MsgCardRemove, 0, nil)
				expectMsg(t, hostSide, MsgReaderRemove, 0, nil)
				expectEOF(t, hostSide)
				waitRun(t, r.done)
				if d := time.Since(start); d > 3*linger {
					t.Errorf("shutdown took %v", d)
				}
				_ = cl
				return
			}
			c1, c2 := net.Pipe()
			t.Cleanup(func() { c1.Close(); c2.Close() })
			used := false
			cl = NewClient(func(ctx context.Context) (net.Conn, error) {
				if used {
					<-ctx.Done()
					return nil, ctx.Err()
				}
				used = true
				return c1, nil
			}, &fakeCard{}, nil)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- cl.Run(ctx) }()
			handshake(t, c2, true, cacATR)
			cancel()
			expectMsg(t, c2, MsgCardRemove, 0, nil)
			expectMsg(t, c2, MsgReaderRemove, 0, nil)
			waitRun(t, done)
		})
	}
}

func TestClientCardFailure(t *testing.T) {
	cd := &fakeCard{respond: func(ctx context.Context, cmd []byte) ([]byte, error) {
		return nil, errors.New("key store vanished")
	}}
	r := startClient(t, cd, nil)
	handshake(t, r.conn, true, cacATR)
	r.conn.Write(msg(MsgAPDU, 0, mustHex("00a4040000")))
	expectMsg(t, r.conn, MsgError, 0, ErrorPayload(CodeGeneralError))
	expectMsg(t, r.conn, MsgCardRemove, 0, nil)
	r.conn.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	eventually(t, "card out", func() bool { return !r.cl.Status().CardInserted })
	if st := r.cl.Status(); !strings.Contains(st.LastError, "key store vanished") {
		t.Errorf("LastError %q", st.LastError)
	}
}

func TestClientReaderNameAndTrace(t *testing.T) {
	var events []TraceEvent
	var buf bytes.Buffer
	jt := JSONTrace(&buf)
	cd := &fakeCard{}
	r := startClient(t, cd, &ClientOptions{ReaderName: "vscard reader", Trace: func(e TraceEvent) {
		events = append(events, e)
		jt(e)
	}})
	expectMsg(t, r.conn, MsgInit, 0, InitPayload(0))
	r.conn.Write(msg(MsgInit, UndefinedReaderID, InitPayload(0)))
	expectMsg(t, r.conn, MsgReaderRemove, 0, nil)
	expectMsg(t, r.conn, MsgReaderAdd, 0, []byte("vscard reader"))
	r.conn.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	r.conn.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	expectMsg(t, r.conn, MsgATR, 0, cacATR)
	verify := mustHex("0020000008313233343536ffff")
	r.conn.Write(msg(MsgAPDU, 0, verify))
	expectMsg(t, r.conn, MsgAPDU, 0, []byte{0x90, 0x00})
	r.cancel()
	waitRun(t, r.done)

	var v *TraceEvent
	for i := range events {
		if events[i].Type == MsgAPDU {
			v = &events[i]
		}
	}
	if v == nil {
		t.Fatalf("no APDU in trace: %+v", events)
	}
	if !bytes.Equal(v.Command, verify[:4]) || v.Redacted != len(verify)-4 || !bytes.Equal(v.Response, []byte{0x90, 0x00}) || v.Dir != "in" {
		t.Errorf("VERIFY trace event %+v", v)
	}
	if strings.Contains(buf.String(), "313233") {
		t.Errorf("PIN in JSON trace: %s", buf.String())
	}
	if !strings.Contains(buf.String(), `"type":"ReaderAdd"`) || !strings.Contains(buf.String(), `"cmd":"00200000","redacted":9`) {
		t.Errorf("JSON trace lacks expected lines:\n%s", buf.String())
	}
}

// TestClientWaitsForHost: while the host is not there (QEMU not started
// yet), dial failures are retried with backoff; Insert and Remove work
// offline; the card goes in once the link comes up.
func TestClientWaitsForHost(t *testing.T) {
	ln, dial := listen(t)
	var dials atomic.Int32
	cl := NewClient(func(ctx context.Context) (net.Conn, error) {
		if dials.Add(1) <= 3 {
			return nil, errors.New("connect: connection refused")
		}
		return dial(ctx)
	}, nil, &ClientOptions{MinBackoff: time.Millisecond, MaxBackoff: 4 * time.Millisecond})
	cd := &fakeCard{}
	if err := cl.Insert(cd); err != nil {
		t.Fatal(err)
	}
	if err := cl.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := cl.Insert(nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cl.Run(ctx) }()
	c := accept(t, ln)
	if n := dials.Load(); n != 4 {
		t.Errorf("connected on dial %d, want 4", n)
	}
	if st := cl.Status(); !strings.Contains(st.LastError, "refused") || st.Connected {
		t.Errorf("status while connecting: %+v", st)
	}
	// A host speaking another version is only warned about; a repeated
	// Init is ignored.
	expectMsg(t, c, MsgInit, 0, InitPayload(0))
	other := InitPayload(0)
	other[7] = 3
	c.Write(msg(MsgInit, UndefinedReaderID, other))
	c.Write(msg(MsgInit, UndefinedReaderID, other))
	expectMsg(t, c, MsgReaderRemove, 0, nil)
	expectMsg(t, c, MsgReaderAdd, 0, nil)
	c.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	c.Write(msg(MsgError, 0, ErrorPayload(CodeOK)))
	expectMsg(t, c, MsgATR, 0, cacATR)
	// The host refuses the ATR: logged and kept in LastError.
	c.Write(msg(MsgError, 0, ErrorPayload(CodeGeneralError)))
	eventually(t, "ATR refusal in status", func() bool {
		return strings.Contains(cl.Status().LastError, "refused the card's ATR")
	})
	if got := cd.powerCalls(); !slices.Equal(got, []string{"off", "on"}) {
		t.Errorf("power events %v", got)
	}
	cancel()
	waitRun(t, done)
}
