package vscard

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// hostRig runs a Host on one end of a loopback TCP connection; the test
// plays the client on the other.
type hostRig struct {
	h      *Host
	client net.Conn
	served chan error
	cancel context.CancelFunc
}

func startHost(t *testing.T, opts *HostOptions) *hostRig {
	t.Helper()
	ln, _ := listen(t)
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	srv := accept(t, ln)
	h := NewHost(srv, opts)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	r := &hostRig{h: h, client: client, served: make(chan error, 1), cancel: cancel}
	go func() { r.served <- h.Serve(ctx) }()
	return r
}

// nextEvent returns the host's next event.
func (r *hostRig) nextEvent(t *testing.T) HostEvent {
	t.Helper()
	select {
	case ev, ok := <-r.h.Events():
		if !ok {
			t.Fatal("events channel closed")
		}
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no host event")
		return nil
	}
}

// TestHostAnswersLikeQEMU checks every reply against QEMU 7.2's, byte for
// byte where peers.md §1.3 captured them.
func TestHostAnswersLikeQEMU(t *testing.T) {
	ok0 := "00000002 00000000 00000004 00000000"
	general := func(reader string) string { return "00000002 " + reader + " 00000004 00000001" }
	tests := []struct {
		name string
		send string // hex, from the client
		want string // hex, the host's reply ("" = none)
	}{
		{"Init", "00000001 00000000 0000000c 565343440000000200000000",
			"00000001 ffffffff 0000000c 565343440000000200000000"},
		{"Init shorter than 12 bytes", "00000001 00000000 0000000b 5653434400000002000000", general("00000000")},
		{"ReaderRemove before any reader", "00000004 00000000 00000000", ok0},
		{"ReaderAdd", "00000003 00000000 00000000", ok0},
		{"ReaderAdd with name and odd id", "00000003 00000005 00000003 616263", ok0},
		{"ATR CAC", "00000005 00000000 0000000f 3b7a18000073667465206364313434", ok0},
		{"ATR longer than 40", "00000005 00000000 00000029 3b" + string(bytes.Repeat([]byte("00"), 40)), general("00000000")},
		{"ATR with bad TS", "00000005 00000003 00000002 3a00", general("00000003")},
		{"CardRemove", "00000006 00000000 00000000", ok0},
		{"Flush from a client", "00000008 00000000 00000000", "00000009 00000000 00000000"},
		{"unknown type", "00000063 00000002 00000001 ff", general("00000002")},
		{"type 0", "00000000 00000000 00000000", general("00000000")},
	}
	r := startHost(t, nil)
	go func() {
		for range r.h.Events() {
		}
	}()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r.client.Write(mustHex(tt.send))
			want := mustHex(tt.want)
			got := readExactly(t, r.client, len(want))
			if !bytes.Equal(got, want) {
				t.Fatalf("host answered %X, want %X", got, want)
			}
		})
	}
	// Messages the host answers with nothing: a response nobody asked
	// for, an Error from the client, FlushComplete. The next Init's reply
	// must be the very next bytes.
	r.client.Write(mustHex("00000007 00000000 00000002 9000" + "00000002 00000000 00000004 01000000" + "00000009 00000000 00000000"))
	r.client.Write(mustHex(tests[0].send))
	if got, want := readExactly(t, r.client, 24), mustHex(tests[0].want); !bytes.Equal(got, want) {
		t.Fatalf("after silent messages: %X", got)
	}
}

// TestHostClientEndToEnd runs vscard's client against vscard's host over
// loopback TCP: the handshake, Transmit through both, card removal and
// insertion, and a clean shutdown, all seen as host events.
func TestHostClientEndToEnd(t *testing.T) {
	ln, dial := listen(t)
	cd := &fakeCard{respond: func(_ context.Context, cmd []byte) ([]byte, error) {
		return append([]byte{cmd[1]}, 0x90, 0x00), nil
	}}
	cl := NewClient(dial, cd, &ClientOptions{ReaderName: "Virtual Reader", QEMU54Workaround: true})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runDone := make(chan error, 1)
	go func() { runDone <- cl.Run(ctx) }()

	srv := accept(t, ln)
	h := NewHost(srv, nil)
	hctx, hcancel := context.WithCancel(context.Background())
	defer hcancel()
	served := make(chan error, 1)
	go func() { served <- h.Serve(hctx) }()
	next := func() HostEvent {
		t.Helper()
		select {
		case ev := <-h.Events():
			return ev
		case <-time.After(5 * time.Second):
			t.Fatal("no host event")
			return nil
		}
	}

	if ev, ok := next().(ReaderAdded); !ok || ev.Name != "Virtual Reader" || ev.ID != 0 {
		t.Fatalf("first event %#v", ev)
	}
	if ev, ok := next().(CardInserted); !ok || !bytes.Equal(ev.ATR, cacATR) {
		t.Fatalf("second event %#v", ev)
	}
	for _, cmd := range [][]byte{mustHex("00a4040007a0000000790100"), mustHex("80420000ff" + string(bytes.Repeat([]byte("5a"), 255)))} {
		resp, err := h.Transmit(ctx, 0, cmd)
		if err != nil || !bytes.Equal(resp, []byte{cmd[1], 0x90, 0x00}) {
			t.Fatalf("Transmit %X: %X %v", cmd[:4], resp, err)
		}
	}

	if err := cl.Remove(); err != nil {
		t.Fatal(err)
	}
	if ev, ok := next().(CardRemoved); !ok {
		t.Fatalf("after Remove: %#v", ev)
	}
	if _, err := h.Transmit(ctx, 0, mustHex("00a4040000")); !errors.Is(err, ErrNoCardPresent) {
		t.Fatalf("Transmit without card: %v", err)
	}
	if err := cl.Insert(nil); err != nil {
		t.Fatal(err)
	}
	if ev, ok := next().(CardInserted); !ok {
		t.Fatalf("after Insert: %#v", ev)
	}
	if resp, err := h.Transmit(ctx, 0, mustHex("00b0000000")); err != nil || resp[0] != 0xb0 {
		t.Fatalf("Transmit after re-insert: %X %v", resp, err)
	}

	cancel()
	if ev, ok := next().(CardRemoved); !ok {
		t.Fatalf("after shutdown: %#v", ev)
	}
	if ev, ok := next().(ReaderRemoved); !ok {
		t.Fatalf("after shutdown: %#v", ev)
	}
	ev, ok := next().(Closed)
	if !ok || !errors.Is(ev.Err, io.EOF) {
		t.Fatalf("last event %#v", ev)
	}
	if _, open := <-h.Events(); open {
		t.Fatal("events channel still open")
	}
	waitRun(t, runDone)
	if err := <-served; !errors.Is(err, io.EOF) {
		t.Fatalf("Serve: %v", err)
	}
	if _, err := h.Transmit(context.Background(), 0, []byte{0, 0, 0, 0}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Transmit after close: %v", err)
	}
}

// TestHostMaxAPDU: vscclient has a static 270-byte receive buffer without
// a bounds check (protocols.md §2.3): the host must never send it more.
func TestHostMaxAPDU(t *testing.T) {
	tests := []struct {
		name    string
		max     int
		len     int
		tooLong bool
	}{
		{"default, 263-byte extended SIGN (peers.md §1.4)", 0, 263, false},
		{"default, 270", 0, 270, false},
		{"default, 271", 0, 271, true},
		{"raised, 271", 4096, 271, false},
		{"raised beyond QEMU's buffer", 1 << 20, MaxPayload, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := startHost(t, &HostOptions{MaxAPDU: tt.max})
			go func() {
				for range r.h.Events() {
				}
			}()
			r.client.Write(msg(MsgATR, 0, cacATR))
			expectMsg(t, r.client, MsgError, 0, ErrorPayload(CodeOK))
			cmd := bytes.Repeat([]byte{0x5a}, tt.len)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			result := make(chan error, 1)
			go func() {
				_, err := r.h.Transmit(ctx, 0, cmd)
				result <- err
			}()
			if tt.tooLong {
				if err := <-result; !errors.Is(err, ErrAPDUTooLong) {
					t.Fatalf("Transmit: %v", err)
				}
				// Nothing reached the client.
				r.client.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
				var b [1]byte
				if n, _ := r.client.Read(b[:]); n != 0 {
					t.Fatal("host sent an oversized APDU")
				}
				return
			}
			expectMsg(t, r.client, MsgAPDU, 0, cmd)
			r.client.Write(msg(MsgAPDU, 0, []byte{0x90, 0x00}))
			if err := <-result; err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestHostTransmitErrors: vscclient's Error answer (host byte order) fails
// the command; a cancelled Transmit's late response is not handed to the
// next one.
func TestHostTransmitErrors(t *testing.T) {
	r := startHost(t, nil)
	go func() {
		for range r.h.Events() {
		}
	}()
	r.client.Write(msg(MsgATR, 0, cacATR))
	expectMsg(t, r.client, MsgError, 0, ErrorPayload(CodeOK))

	go func() {
		expectMsg(t, r.client, MsgAPDU, 0, []byte{0, 1, 2, 3})
		r.client.Write(msg(MsgError, 0, []byte{1, 0, 0, 0})) // VREADER_NO_CARD, little-endian
	}()
	if _, err := r.h.Transmit(context.Background(), 0, []byte{0, 1, 2, 3}); err == nil {
		t.Fatal("Transmit succeeded on an Error answer")
	}

	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() {
		_, err := r.h.Transmit(ctx, 0, []byte{0xA, 0, 0, 0})
		first <- err
	}()
	expectMsg(t, r.client, MsgAPDU, 0, []byte{0xA, 0, 0, 0})
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Transmit: %v", err)
	}
	second := make(chan []byte, 1)
	go func() {
		resp, _ := r.h.Transmit(context.Background(), 0, []byte{0xB, 0, 0, 0})
		second <- resp
	}()
	// The second command waits for the first's late response.
	r.client.Write(msg(MsgAPDU, 0, []byte{0xA, 0x90, 0x00}))
	expectMsg(t, r.client, MsgAPDU, 0, []byte{0xB, 0, 0, 0})
	r.client.Write(msg(MsgAPDU, 0, []byte{0xB, 0x90, 0x00}))
	if resp := <-second; !bytes.Equal(resp, []byte{0xB, 0x90, 0x00}) {
		t.Fatalf("second Transmit got %X", resp)
	}
}

func TestHostBadStreams(t *testing.T) {
	tests := []struct {
		name string
		send string
		want error
	}{
		{"oversized length", "00000007 00000000 00010001", ErrTooLarge},
		{"half a message, then close", "00000005 00000000 0000000f 3b7a18", io.ErrUnexpectedEOF},
		{"half a header, then close", "0000", io.ErrUnexpectedEOF},
		{"clean close", "", io.EOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := startHost(t, nil)
			r.client.Write(mustHex(tt.send))
			r.client.(*net.TCPConn).CloseWrite()
			select {
			case err := <-r.served:
				if !errors.Is(err, tt.want) {
					t.Fatalf("Serve: %v, want %v", err, tt.want)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Serve did not return")
			}
			if ev, ok := r.nextEvent(t).(Closed); !ok || !errors.Is(ev.Err, tt.want) {
				t.Fatalf("last event %#v", ev)
			}
		})
	}
}

func TestValidATR(t *testing.T) {
	tests := []struct {
		atr  string
		want bool
	}{
		{"3b7a18000073667465206364313434", true}, // libcacard CAC (QEMU: 10 historical, 3 optional)
		{"3b89005643415244 5f4e5353", true},      // VCARD_NSS
		{"3bd518ff8091fe1fc38073c8211308", true}, // QEMU's default "Athena" ATR
		{"3f00", true},
		{"3b", false},
		{"", false},
		{"3a00", false},
		{"3b0f01", false}, // 15 historical bytes announced, 1 present
		{"3b00" + string(bytes.Repeat([]byte("00"), 39)), false}, // 41 bytes
	}
	for _, tt := range tests {
		if got := validATR(mustHex(tt.atr)); got != tt.want {
			t.Errorf("validATR(%s) = %v, want %v", tt.atr, got, tt.want)
		}
	}
}
