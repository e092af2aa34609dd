package pcsc

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// fakeD is an in-process pcscd for unit tests: it speaks the socket
// protocol of pcsc-lite 1.9.9 (or a 4.5 daemon) closely enough for the
// client, and lets a test replace the answer to any command.
type fakeD struct {
	t      *testing.T
	path   string
	ln     net.Listener
	minor  int32 // the daemon's IPC minor
	strict bool  // refuse any other client minor (1.8.24 to 2.4.0)

	mu       sync.Mutex
	table    []readerEntry
	events   uint32 // reader-events counter (IPC 4.5)
	nextCtx  uint32
	sessions map[uint32]*fakeSession // by hContext
	conns    int                     // connections accepted
	offered  []int32                 // client minors offered, in order

	// override, when set, may answer a command itself (returning true).
	override func(s *fakeSession, cmd uint32, body []byte) bool
}

type fakeSession struct {
	d          *fakeD
	conn       net.Conn
	wmu        sync.Mutex
	registered bool // guarded by d.mu
}

func (s *fakeSession) write(b []byte) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.conn.Write(b)
}

func newFakeD(t *testing.T, minor int32, strict bool) *fakeD {
	t.Helper()
	d := &fakeD{t: t, minor: minor, strict: strict, nextCtx: 0x1000, sessions: map[uint32]*fakeSession{}}
	d.path = filepath.Join(t.TempDir(), "pcscd.comm")
	ln, err := net.Listen("unix", d.path)
	if err != nil {
		t.Fatal(err)
	}
	d.ln = ln
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		d.mu.Lock()
		for _, s := range d.sessions {
			s.conn.Close()
		}
		d.mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d.mu.Lock()
			d.conns++
			d.mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				d.serve(&fakeSession{d: d, conn: c})
			}()
		}
	}()
	return d
}

func (d *fakeD) opts() *Options { return &Options{Socket: d.path} }

func (d *fakeD) setTable(t []readerEntry) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(t) != len(d.table) {
		d.events++
	}
	d.table = t
}

// signal tells every waiting client that something changed, as pcscd's
// event handler does, and unregisters them.
func (d *fakeD) signal() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.sessions {
		if s.registered {
			s.registered = false
			s.write(le.AppendUint32(le.AppendUint32(nil, 0), 0))
		}
	}
}

func (d *fakeD) waiting() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, s := range d.sessions {
		if s.registered {
			n++
		}
	}
	return n
}

func words(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = le.AppendUint32(b, v)
	}
	return b
}

func (d *fakeD) serve(s *fakeSession) {
	defer s.conn.Close()
	var hctx uint32
	for {
		var hdr [8]byte
		if _, err := io.ReadFull(s.conn, hdr[:]); err != nil {
			return
		}
		size, cmd := le.Uint32(hdr[:]), le.Uint32(hdr[4:])
		if size > 1<<20 {
			return
		}
		body := make([]byte, size)
		if _, err := io.ReadFull(s.conn, body); err != nil {
			return
		}
		// Transmit and Control carry their send buffer after the struct.
		switch cmd {
		case cmdTransmit, cmdControl:
			extra := make([]byte, u32(body, 3-cmdAdj(cmd)))
			if _, err := io.ReadFull(s.conn, extra); err != nil {
				return
			}
			body = append(body, extra...)
		}
		if d.override != nil && d.override(s, cmd, body) {
			continue
		}
		switch cmd {
		case cmdVersion:
			minor := int32(u32(body, 1))
			d.mu.Lock()
			d.offered = append(d.offered, minor)
			d.mu.Unlock()
			var rv uint32
			if u32(body, 0) != 4 || (d.strict && minor != d.minor) || minor > d.minor {
				rv = uint32(ErrServiceStopped)
			}
			s.write(words(4, uint32(d.minor), rv))
		case cmdEstablishContext:
			d.mu.Lock()
			d.nextCtx++
			hctx = d.nextCtx
			d.sessions[hctx] = s
			d.mu.Unlock()
			s.write(words(u32(body, 0), hctx, 0))
		case cmdReleaseContext:
			s.write(words(u32(body, 0), 0))
		case cmdGetReadersState:
			d.mu.Lock()
			t := encodeReaderTable(d.table)
			d.mu.Unlock()
			s.write(t)
		case cmdWaitReaderStateChange:
			d.mu.Lock()
			s.registered = true
			t := encodeReaderTable(d.table)
			d.mu.Unlock()
			s.write(t)
		case cmdStopWaiting:
			d.mu.Lock()
			was := s.registered
			s.registered = false
			d.mu.Unlock()
			if was {
				s.write(words(0, 0))
			}
		case cmdGetReaderEvents:
			d.mu.Lock()
			ev := d.events
			d.mu.Unlock()
			s.write(words(ev, 0))
		case cmdCancel:
			target := u32(body, 0)
			rv := uint32(ErrInvalidHandle)
			d.mu.Lock()
			if ts := d.sessions[target]; ts != nil && ts.registered {
				ts.registered = false
				ts.write(words(0, uint32(ErrCancelled)))
				rv = 0
			}
			d.mu.Unlock()
			s.write(words(target, rv))
		case cmdConnect:
			r := bytes.Clone(body)
			le.PutUint32(r[4+maxReaderName+8:], 0x77)                // hCard
			le.PutUint32(r[4+maxReaderName+12:], uint32(ProtocolT1)) // active protocol
			s.write(r)
		case cmdTransmit:
			// Echo the command back with 90 00.
			r := bytes.Clone(body[:transmitLen])
			data := append(bytes.Clone(body[transmitLen:]), 0x90, 0x00)
			le.PutUint32(r[24:], uint32(len(data)))
			s.write(append(r, data...))
		case cmdBeginTransaction, cmdStatus:
			s.write(words(u32(body, 0), 0))
		case cmdEndTransaction, cmdDisconnect:
			s.write(words(u32(body, 0), u32(body, 1), 0))
		default:
			return // pcscd drops a client sending an unknown command
		}
	}
}

// cmdAdj: the send length is field 3 of transmit_struct, field 2 of
// control_struct.
func cmdAdj(cmd uint32) int {
	if cmd == cmdControl {
		return 1
	}
	return 0
}

func bg() context.Context { return context.Background() }

var vReader = readerEntry{name: "Virtual PCD 00 00", eventCounter: 1, state: cardPresent | cardPowered | cardNegotiable,
	sharing: 0, atr: []byte{0x3B, 0x02, 0x14, 0x50}, protocol: uint32(ProtocolT1)}

func TestVersionNegotiation(t *testing.T) {
	tests := []struct {
		name      string
		minor     int32
		strict    bool
		wantMinor int32
		offered   []int32
		wantErr   error
	}{
		// pcsc-lite 1.8.24 to 2.2.x: 4.4, accepted at once.
		{"4.4 daemon", 4, true, 4, []int32{4}, nil},
		// pcsc-lite 2.3.0 to 2.4.0: refuses 4.4, says 5; we reconnect as 4.5.
		{"strict 4.5 daemon", 5, true, 5, []int32{4, 5}, nil},
		// pcsc-lite 2.4.1+: accepts 4.4 though it speaks 4.5.
		{"lenient 4.5 daemon", 5, false, 4, []int32{4}, nil},
		// A strict daemon of a later protocol: refused, no endless retry.
		{"strict 4.6 daemon", 6, true, 0, []int32{4}, ErrServiceStopped},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := newFakeD(t, tc.minor, tc.strict)
			c, err := EstablishContext(bg(), d.opts())
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("EstablishContext: %v, want %v", err, tc.wantErr)
			}
			d.mu.Lock()
			offered := d.offered
			d.mu.Unlock()
			if !equalInt32(offered, tc.offered) {
				t.Errorf("client offered minors %v, want %v", offered, tc.offered)
			}
			if err != nil {
				return
			}
			defer c.Release()
			if c.minor != tc.wantMinor {
				t.Errorf("negotiated 4.%d, want 4.%d", c.minor, tc.wantMinor)
			}
			// A reconnect means a fresh socket, not a retry on the refused one.
			d.mu.Lock()
			conns := d.conns
			d.mu.Unlock()
			if conns != len(tc.offered) {
				t.Errorf("%d connections for %d offers", conns, len(tc.offered))
			}
			if _, err := c.ListReaders(); !errors.Is(err, ErrNoReadersAvailable) {
				t.Errorf("ListReaders on an empty daemon: %v, want ErrNoReadersAvailable", err)
			}
		})
	}
}

func equalInt32(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestSocketPath(t *testing.T) {
	t.Setenv("PCSCLITE_CSOCK_NAME", "")
	if got := SocketPath(); got != DefaultSocket {
		t.Errorf("SocketPath() = %q, want %q", got, DefaultSocket)
	}
	d := newFakeD(t, 4, true)
	t.Setenv("PCSCLITE_CSOCK_NAME", d.path)
	if got := SocketPath(); got != d.path {
		t.Errorf("SocketPath() = %q with PCSCLITE_CSOCK_NAME=%q", got, d.path)
	}
	c, err := EstablishContext(bg(), nil) // nil options: the variable decides
	if err != nil {
		t.Fatalf("EstablishContext via PCSCLITE_CSOCK_NAME: %v", err)
	}
	c.Release()
}

func TestNoDaemon(t *testing.T) {
	_, err := EstablishContext(bg(), &Options{Socket: filepath.Join(t.TempDir(), "none.comm")})
	if !errors.Is(err, ErrNoService) {
		t.Fatalf("EstablishContext without a daemon: %v, want ErrNoService", err)
	}
}

func TestDaemonGone(t *testing.T) {
	d := newFakeD(t, 4, true)
	d.setTable([]readerEntry{vReader})
	c, err := EstablishContext(bg(), d.opts())
	if err != nil {
		t.Fatal(err)
	}
	k, err := c.Connect(vReader.name, ShareShared, ProtocolAny)
	if err != nil {
		t.Fatal(err)
	}
	// pcscd exits: every connection drops.
	d.ln.Close()
	d.mu.Lock()
	for _, s := range d.sessions {
		s.conn.Close()
	}
	d.mu.Unlock()

	calls := []struct {
		name string
		call func() error
	}{
		{"ListReaders", func() error { _, err := c.ListReaders(); return err }},
		{"Readers", func() error { _, err := c.Readers(); return err }},
		{"Transmit", func() error { _, err := k.Transmit([]byte{0, 0xA4, 4, 0}); return err }},
		{"Status", func() error { _, err := k.Status(); return err }},
		{"BeginTransaction", func() error { return k.BeginTransaction(bg()) }},
		{"GetStatusChange", func() error {
			return c.GetStatusChange(bg(), -1, []ReaderState{{Reader: vReader.name}})
		}},
		{"Connect", func() error { _, err := c.Connect(vReader.name, ShareShared, ProtocolAny); return err }},
	}
	for _, tc := range calls {
		if err := tc.call(); !errors.Is(err, ErrNoService) {
			t.Errorf("%s after the daemon went away: %v, want ErrNoService", tc.name, err)
		}
	}
	if err := c.Release(); err != nil {
		t.Errorf("Release after the daemon went away: %v", err)
	}
	if err := c.Cancel(); err != nil {
		t.Errorf("Cancel with nothing waiting: %v", err)
	}
}

// malformedCase sets up a daemon whose answer to one command is broken.
type malformedCase struct {
	name  string
	cmd   uint32
	reply func(body []byte) []byte // the whole broken answer
	call  func(c *Context, k *Card) error
	want  error
}

func TestMalformedReplies(t *testing.T) {
	noNUL := encodeReaderTable([]readerEntry{vReader})
	for i := 0; i < maxReaderName; i++ {
		noNUL[i] = 'A'
	}
	longATR := encodeReaderTable([]readerEntry{vReader})
	le.PutUint32(longATR[176:], 34)
	twice := encodeReaderTable([]readerEntry{vReader, vReader})
	transmit := func(c *Context, k *Card) error { _, err := k.Transmit([]byte{0, 0xB0, 0, 0, 0}); return err }
	list := func(c *Context, k *Card) error { _, err := c.ListReaders(); return err }

	tests := []malformedCase{
		{"table short then EOF", cmdGetReadersState, func([]byte) []byte { return make([]byte, 100) }, list, ErrNoService},
		{"reader name without NUL", cmdGetReadersState, func([]byte) []byte { return noNUL }, list, ErrCommError},
		{"ATR longer than 33", cmdGetReadersState, func([]byte) []byte { return longATR }, list, ErrCommError},
		{"reader listed twice", cmdGetReadersState, func([]byte) []byte { return twice }, list, ErrCommError},
		{"wait table without NUL", cmdWaitReaderStateChange, func([]byte) []byte { return noNUL },
			func(c *Context, k *Card) error {
				return c.GetStatusChange(bg(), 0, []ReaderState{{Reader: vReader.name}})
			}, ErrCommError},
		{"transmit: response beyond the buffer", cmdTransmit, func(b []byte) []byte {
			r := bytes.Clone(b[:transmitLen])
			le.PutUint32(r[24:], MaxAPDU+1)
			return r
		}, transmit, ErrCommError},
		{"transmit: another handle", cmdTransmit, func(b []byte) []byte {
			r := bytes.Clone(b[:transmitLen])
			le.PutUint32(r[0:], 0x78)
			return r
		}, transmit, ErrCommError},
		{"transmit: send length not echoed", cmdTransmit, func(b []byte) []byte {
			r := bytes.Clone(b[:transmitLen])
			le.PutUint32(r[12:], 1)
			return r
		}, transmit, ErrCommError},
		{"transmit: data cut short", cmdTransmit, func(b []byte) []byte {
			r := bytes.Clone(b[:transmitLen])
			le.PutUint32(r[24:], 10)
			return append(r, 0x90)
		}, transmit, ErrNoService},
		{"control: answer beyond the buffer", cmdControl, func(b []byte) []byte {
			r := bytes.Clone(b[:controlLen])
			le.PutUint32(r[16:], MaxAPDU+1)
			return r
		}, func(c *Context, k *Card) error { _, err := k.Control(CtlCode(1), []byte{1}); return err }, ErrCommError},
		{"control: code not echoed", cmdControl, func(b []byte) []byte {
			r := bytes.Clone(b[:controlLen])
			le.PutUint32(r[4:], 0)
			return r
		}, func(c *Context, k *Card) error { _, err := k.Control(CtlCode(1), nil); return err }, ErrCommError},
		{"get attrib: length beyond pbAttr", cmdGetAttrib, func(b []byte) []byte {
			r := bytes.Clone(b)
			le.PutUint32(r[8+maxBufferSize:], maxBufferSize+1)
			return r
		}, func(c *Context, k *Card) error { _, err := k.GetAttrib(AttrATRString); return err }, ErrCommError},
		{"get attrib: attribute not echoed", cmdGetAttrib, func(b []byte) []byte {
			r := bytes.Clone(b)
			le.PutUint32(r[4:], 1)
			return r
		}, func(c *Context, k *Card) error { _, err := k.GetAttrib(AttrATRString); return err }, ErrCommError},
		{"connect: context not echoed", cmdConnect, func(b []byte) []byte {
			r := bytes.Clone(b)
			le.PutUint32(r[0:], 5)
			return r
		}, func(c *Context, k *Card) error {
			_, err := c.Connect(vReader.name, ShareShared, ProtocolAny)
			return err
		}, ErrCommError},
		{"connect: short", cmdConnect, func(b []byte) []byte { return b[:20] },
			func(c *Context, k *Card) error {
				_, err := c.Connect(vReader.name, ShareShared, ProtocolAny)
				return err
			}, ErrNoService},
		{"begin: another handle", cmdBeginTransaction, func(b []byte) []byte { return words(1, 0) },
			func(c *Context, k *Card) error { return k.BeginTransaction(bg()) }, ErrCommError},
		{"status: another handle", cmdStatus, func(b []byte) []byte { return words(1, 0) },
			func(c *Context, k *Card) error { _, err := k.Status(); return err }, ErrCommError},
		{"disconnect: another handle", cmdDisconnect, func(b []byte) []byte { return words(1, 0, 0) },
			func(c *Context, k *Card) error { return k.Disconnect(LeaveCard) }, ErrCommError},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := newFakeD(t, 4, true)
			d.setTable([]readerEntry{vReader})
			c, err := EstablishContext(bg(), d.opts())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Release()
			var k *Card
			if tc.cmd != cmdConnect {
				if k, err = c.Connect(vReader.name, ShareShared, ProtocolAny); err != nil {
					t.Fatal(err)
				}
			}
			d.override = func(s *fakeSession, cmd uint32, body []byte) bool {
				if cmd != tc.cmd {
					return false
				}
				s.write(tc.reply(body))
				if tc.want == ErrNoService {
					s.conn.Close() // the daemon dies mid-answer
				}
				return true
			}
			err = tc.call(c, k)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want an error wrapping %v", err, tc.want)
			}
			// The stream is out of step: the context is closed for good.
			if _, err := c.ListReaders(); !errors.Is(err, ErrNoService) {
				t.Errorf("ListReaders after a malformed reply: %v, want ErrNoService", err)
			}
		})
	}
}

func TestMalformedVersion(t *testing.T) {
	d := newFakeD(t, 4, true)
	d.override = func(s *fakeSession, cmd uint32, body []byte) bool {
		if cmd == cmdVersion {
			s.write(words(3, 4, 0)) // major 3
			return true
		}
		return false
	}
	if _, err := EstablishContext(bg(), d.opts()); !errors.Is(err, ErrCommError) {
		t.Fatalf("EstablishContext with major 3: %v, want ErrCommError", err)
	}
}

func TestCardCalls(t *testing.T) {
	d := newFakeD(t, 4, true)
	d.setTable([]readerEntry{vReader})
	c, err := EstablishContext(bg(), d.opts())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	if _, err := c.Connect("", ShareShared, ProtocolAny); !errors.Is(err, ErrInvalidValue) {
		t.Errorf("Connect(\"\"): %v", err)
	}
	if _, err := c.Connect(string(make([]byte, 200)), ShareShared, ProtocolAny); !errors.Is(err, ErrInvalidValue) {
		t.Errorf("Connect(long name): %v", err)
	}
	k, err := c.Connect(vReader.name, ShareShared, ProtocolAny)
	if err != nil {
		t.Fatal(err)
	}
	if k.Protocol() != ProtocolT1 {
		t.Errorf("protocol %v", k.Protocol())
	}
	// Extended APDU both ways: 65535 data bytes out, the same back.
	cmd := append([]byte{0x00, 0xD6, 0x00, 0x00, 0x00, 0xFF, 0xFF}, bytes.Repeat([]byte{0xA5}, 0xFFFF)...)
	resp, err := k.Transmit(cmd)
	if err != nil {
		t.Fatalf("extended Transmit: %v", err)
	}
	if !bytes.Equal(resp[:len(resp)-2], cmd) || sw(resp) != 0x9000 {
		t.Errorf("extended Transmit: %d bytes back", len(resp))
	}
	if _, err := k.Transmit(make([]byte, MaxAPDU+1)); !errors.Is(err, ErrInsufficientBuffer) {
		t.Errorf("oversized Transmit: %v", err)
	}
	st, err := k.Status()
	if err != nil {
		t.Fatal(err)
	}
	want := CardStatus{Reader: vReader.name, State: 1<<16 | vReader.state, Protocol: ProtocolT1, ATR: vReader.atr}
	if st.Reader != want.Reader || st.State != want.State || st.Protocol != want.Protocol || !bytes.Equal(st.ATR, want.ATR) {
		t.Errorf("Status = %+v, want %+v", st, want)
	}
	// The reader vanished: SCardStatus says SCARD_E_READER_UNAVAILABLE.
	d.setTable(nil)
	if _, err := k.Status(); !errors.Is(err, ErrReaderUnavailable) {
		t.Errorf("Status without the reader: %v", err)
	}
	// pcscd's own error codes come back as Error values.
	d.override = func(s *fakeSession, cmd uint32, body []byte) bool {
		if cmd == cmdTransmit {
			r := bytes.Clone(body[:transmitLen])
			le.PutUint32(r[28:], uint32(ErrRemovedCard))
			s.write(r)
			return true
		}
		return false
	}
	if _, err := k.Transmit([]byte{0, 0xB0, 0, 0, 0}); err != ErrRemovedCard {
		t.Errorf("Transmit: %v, want ErrRemovedCard", err)
	}
	if err := k.Disconnect(LeaveCard); err != nil {
		t.Errorf("Disconnect: %v", err)
	}
}

// TestBeginTransactionPolls checks the fast poll: a daemon that answers
// SCARD_E_SHARING_VIOLATION a few times is asked again within milliseconds.
func TestBeginTransactionPolls(t *testing.T) {
	d := newFakeD(t, 4, true)
	d.setTable([]readerEntry{vReader})
	c, err := EstablishContext(bg(), d.opts())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	k, err := c.Connect(vReader.name, ShareShared, ProtocolAny)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var times []time.Time
	d.override = func(s *fakeSession, cmd uint32, body []byte) bool {
		if cmd != cmdBeginTransaction {
			return false
		}
		mu.Lock()
		times = append(times, time.Now())
		n := len(times)
		mu.Unlock()
		rv := uint32(ErrSharingViolation)
		if n == 5 {
			rv = 0
		}
		s.write(words(u32(body, 0), rv))
		return true
	}
	start := time.Now()
	if err := k.BeginTransaction(bg()); err != nil {
		t.Fatal(err)
	}
	// 1+2+4+8 ms of sleeps; libpcsclite's 100 ms poll would take 400 ms.
	if d := time.Since(start); d > 200*time.Millisecond {
		t.Errorf("5 tries took %v", d)
	}
	mu.Lock()
	n := len(times)
	mu.Unlock()
	if n != 5 {
		t.Errorf("%d tries, want 5", n)
	}
	// A context that ends stops the polling.
	d.override = func(s *fakeSession, cmd uint32, body []byte) bool {
		if cmd != cmdBeginTransaction {
			return false
		}
		s.write(words(u32(body, 0), uint32(ErrSharingViolation)))
		return true
	}
	ctx, cancel := context.WithTimeout(bg(), 50*time.Millisecond)
	defer cancel()
	if err := k.BeginTransaction(ctx); !errors.Is(err, ErrCancelled) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("BeginTransaction with an ending ctx: %v", err)
	}
}

// TestEstablishDeadline: a daemon that accepts but never answers does not
// hang EstablishContext past its ctx deadline.
func TestEstablishDeadline(t *testing.T) {
	for _, silent := range []uint32{cmdVersion, cmdEstablishContext} {
		d := newFakeD(t, 4, true)
		d.override = func(s *fakeSession, cmd uint32, body []byte) bool { return cmd == silent }
		ctx, cancel := context.WithTimeout(bg(), 100*time.Millisecond)
		start := time.Now()
		_, err := EstablishContext(ctx, d.opts())
		cancel()
		if !errors.Is(err, ErrNoService) || !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("silent on %#x: %v, want ErrNoService and a deadline error", silent, err)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Errorf("silent on %#x: returned after %v", silent, el)
		}
	}
}
