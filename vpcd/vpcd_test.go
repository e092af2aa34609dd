package vpcd

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// msg is one message vpcd sends in a scripted exchange, and what the card
// side must answer (nil: no reply expected).
type msg struct {
	send  string // hex payload
	reply []byte
}

func TestControlSequence(t *testing.T) {
	atr := testATR
	tests := []struct {
		name  string
		msgs  []msg
		calls []string // card calls, in order, before the connection closes
	}{
		{
			// What vpcd does when a card connects (peers.md §2.2).
			name:  "connect",
			msgs:  []msg{{"04", atr}, {"04", atr}, {"01", nil}, {"04", atr}},
			calls: []string{"atr", "atr", "on", "atr"},
		},
		{
			// A PC/SC client session: power on, APDUs, release.
			name: "client session",
			msgs: []msg{{"01", nil}, {"04", atr}, {"00A4040007A0000000790100", []byte{0x90, 0x00}},
				{"00", nil}, {"04", atr}},
			calls: []string{"on", "atr", "tx:00A4040007A0000000790100", "off", "atr"},
		},
		{
			name:  "reset",
			msgs:  []msg{{"01", nil}, {"02", nil}, {"04", atr}},
			calls: []string{"on", "reset", "atr"},
		},
		{
			// Unknown control bytes and empty frames get no reply; the
			// GetATR after them proves the stream is still in step.
			name:  "unknown control and empty frame ignored",
			msgs:  []msg{{"03", nil}, {"FF", nil}, {"", nil}, {"04", atr}},
			calls: []string{"atr"},
		},
	}
	for _, split := range []bool{false, true} {
		for _, tc := range tests {
			name := tc.name
			if split {
				name += "/split writes"
			}
			t.Run(name, func(t *testing.T) {
				checkGoroutines(t)
				v := newFakeVPCD(t)
				c := &fakeCard{}
				stop := startServe(t, v.addr(), c, nil)
				p := v.accept(split)
				for _, m := range tc.msgs {
					p.mustSend(mustHex(t, m.send))
					if m.reply != nil {
						if got := p.mustRecv(); !bytes.Equal(got, m.reply) {
							t.Fatalf("after %s: reply %X, want %X", m.send, got, m.reply)
						}
					}
				}
				waitFor(t, "card calls", func() bool { return len(c.Calls()) >= len(tc.calls) })
				if err := stop(); err != nil {
					t.Fatalf("Serve: %v", err)
				}
				p.expectClosed()
				// Leaving the reader powers the card off.
				want := append(slices.Clone(tc.calls), "off")
				if got := c.Calls(); !slices.Equal(got, want) {
					t.Errorf("card calls\n got %q\nwant %q", got, want)
				}
			})
		}
	}
}

// lenCard answers each command with n bytes of pattern and 90 00, n taken
// from P1 P2, so that tests can ask for any response size.
func lenCard() *fakeCard {
	return &fakeCard{transmit: func(_ context.Context, cmd []byte) ([]byte, error) {
		if len(cmd) < 4 {
			return []byte{0x67, 0x00}, nil
		}
		n := int(binary.BigEndian.Uint16(cmd[2:4]))
		if cmd[1] == 0xEE {
			// Invalid responses: 0 = empty, 1 = one byte, else 65536 bytes.
			switch n {
			case 0:
				return nil, nil
			case 1:
				return []byte{0x90}, nil
			default:
				return make([]byte, MaxPayload+1), nil
			}
		}
		return append(pattern(n), 0x90, 0x00), nil
	}}
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

func TestAPDURoundTrip(t *testing.T) {
	ok := []byte{0x90, 0x00}
	ext := append([]byte{0x00, 0xD6, 0x00, 0x00, 0x00, 0x01, 0x00}, pattern(256)...) // 263 bytes, extended Lc
	maxCmd := append([]byte{0x80, 0xD6, 0x00, 0x00, 0x00, 0xFF, 0xF8}, pattern(MaxPayload-7)...)
	tests := []struct {
		name string
		cmd  []byte
		want []byte
	}{
		{"case 1", []byte{0x00, 0xA4, 0x00, 0x00}, ok},
		{"short response", []byte{0x00, 0xB0, 0x00, 0x10, 0x10}, append(pattern(16), 0x90, 0x00)},
		{"extended command 263 bytes", ext, append(pattern(0), 0x90, 0x00)},
		{"4 KiB response", []byte{0x00, 0xB0, 0x10, 0x00, 0x00, 0x10, 0x00}, append(pattern(4096), 0x90, 0x00)},
		{"largest frame response", []byte{0x00, 0xB0, 0xFF, 0xFD, 0x00, 0x00, 0x00}, append(pattern(MaxPayload-2), 0x90, 0x00)},
		{"largest frame command", maxCmd, append(pattern(0), 0x90, 0x00)},
		// Card bugs must not put unframeable or empty answers on the wire:
		// an empty reply would make vpcd eject the card.
		{"empty card response", []byte{0x00, 0xEE, 0x00, 0x00}, []byte{0x6F, 0x00}},
		{"1-byte card response", []byte{0x00, 0xEE, 0x00, 0x01}, []byte{0x6F, 0x00}},
		{"oversized card response", []byte{0x00, 0xEE, 0x00, 0x02}, []byte{0x6F, 0x00}},
	}
	for _, split := range []bool{false, true} {
		checkGoroutines(t)
		v := newFakeVPCD(t)
		c := lenCard()
		stop := startServe(t, v.addr(), c, nil)
		p := v.accept(split)
		for _, tc := range tests {
			name := tc.name
			if split {
				name += "/split writes"
			}
			t.Run(name, func(t *testing.T) {
				got := p.transmit(tc.cmd)
				if !bytes.Equal(got, tc.want) {
					t.Errorf("response: %d bytes %.40X..., want %d bytes %.40X...", len(got), got, len(tc.want), tc.want)
				}
				calls := c.Calls()
				if last := calls[len(calls)-1]; last != "tx:"+hexs(tc.cmd) {
					t.Errorf("card saw %.60s..., want tx:%.60X...", last, tc.cmd)
				}
			})
		}
		// Everything after an oversized answer is still in step.
		if got := p.transmit([]byte{0x00, 0xB0, 0x00, 0x01}); !bytes.Equal(got, []byte{0x00, 0x90, 0x00}) {
			t.Errorf("after the table: %X", got)
		}
		if err := stop(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestBrokenPeer covers a vpcd that hangs up mid-message: Serve must not
// panic, must remove the card, and must come back on a new connection.
func TestBrokenPeer(t *testing.T) {
	tests := []struct {
		name  string
		bytes string // raw bytes vpcd writes before closing
	}{
		{"clean close", ""},
		{"half a header", "00"},
		{"header only", "0005"},
		{"half a payload", "000500A4"},
		{"half an extended payload", "0107" + strings.Repeat("00", 100)},
		{"control byte missing", "0001"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			checkGoroutines(t)
			v := newFakeVPCD(t)
			c := &fakeCard{}
			rec := &logRecorder{}
			stop := startServe(t, v.addr(), c, fastBackoff(slog.New(rec)))
			p := v.accept(false)
			if _, err := p.c.Write(mustHex(t, tc.bytes)); err != nil {
				t.Fatal(err)
			}
			p.c.Close()

			p2 := v.accept(false)
			p2.mustSend([]byte{ctrlATR})
			if got := p2.mustRecv(); !bytes.Equal(got, testATR) {
				t.Fatalf("ATR after reconnect: %X", got)
			}
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			if got := rec.levels("vpcd dropped the connection before polling the card"); len(got) != 1 {
				t.Errorf("logged the lost connection %d times, want once", len(got))
			}
			// The first connection never got a complete message, so
			// the card was never inserted on it.
			if n := len(rec.levels("card inserted in vpcd")); n != 1 {
				t.Errorf("logged %d insertions, want 1", n)
			}
			if calls := c.Calls(); calls[0] != "off" {
				t.Errorf("card not powered off when vpcd went away: %q", calls)
			}
		})
	}
}

func TestServeConnErrors(t *testing.T) {
	tests := []struct {
		name  string
		bytes string
		want  error
	}{
		{"clean close", "", io.EOF},
		{"clean close after a message", "000104", io.EOF},
		{"header only", "0005", io.ErrUnexpectedEOF},
		{"half a header", "00", io.ErrUnexpectedEOF},
		{"half a payload", "000500A4", io.ErrUnexpectedEOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			checkGoroutines(t)
			cardSide, vpcdSide := net.Pipe()
			go func() {
				vpcdSide.Write(mustHex(t, tc.bytes))
				// Swallow the ATR reply, if any, then hang up.
				vpcdSide.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
				io.Copy(io.Discard, vpcdSide)
				vpcdSide.Close()
			}()
			err := ServeConn(context.Background(), cardSide, &fakeCard{}, nil)
			if !errors.Is(err, tc.want) {
				t.Errorf("ServeConn = %v, want %v", err, tc.want)
			}
		})
	}
}

// TestPeerVanishesMidAPDU closes the vpcd side while the card is still
// working on an APDU (pcscd killed during a signature).
func TestPeerVanishesMidAPDU(t *testing.T) {
	checkGoroutines(t)
	v := newFakeVPCD(t)
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	c := &fakeCard{transmit: func(ctx context.Context, cmd []byte) ([]byte, error) {
		entered <- struct{}{}
		<-release
		return []byte{0x90, 0x00}, nil
	}}
	stop := startServe(t, v.addr(), c, fastBackoff(nil))
	p := v.accept(true)
	p.mustSend([]byte{0x00, 0x2A, 0x9E, 0x9A, 0x01, 0x00})
	<-entered
	p.c.Close()
	close(release)

	p2 := v.accept(true)
	p2.mustSend([]byte{ctrlATR})
	if got := p2.mustRecv(); !bytes.Equal(got, testATR) {
		t.Fatalf("ATR after reconnect: %X", got)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// TestWaitForVPCD starts the card before pcscd: Serve keeps retrying and
// says so once at Info, then quietly, and connects when vpcd appears.
func TestWaitForVPCD(t *testing.T) {
	checkGoroutines(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	rec := &logRecorder{}
	stop := startServe(t, addr, &fakeCard{}, fastBackoff(slog.New(rec)))
	waitFor(t, "three connection attempts", func() bool { return len(rec.levels("waiting for vpcd")) >= 3 })
	v := listenOn(t, addr)
	p := v.accept(false)
	p.mustSend([]byte{ctrlATR})
	if got := p.mustRecv(); !bytes.Equal(got, testATR) {
		t.Fatalf("ATR: %X", got)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	levels := rec.levels("waiting for vpcd")
	if levels[0] != slog.LevelInfo {
		t.Errorf("first wait logged at %v, want INFO", levels[0])
	}
	for i, l := range levels[1:] {
		if l != slog.LevelDebug {
			t.Errorf("wait %d logged at %v, want DEBUG", i+2, l)
		}
	}
	if got := rec.levels("card inserted in vpcd"); !slices.Equal(got, []slog.Level{slog.LevelInfo}) {
		t.Errorf("insertion logged at %v, want once at INFO", got)
	}
}

// TestUnpolled connects to a vpcd that accepts but never polls, as a second
// card in an occupied slot sees it: Serve must say so instead of claiming
// the card is inserted.
func TestUnpolled(t *testing.T) {
	checkGoroutines(t)
	v := newFakeVPCD(t)
	rec := &logRecorder{}
	o := fastBackoff(slog.New(rec))
	o.firstPoll = 20 * time.Millisecond
	stop := startServe(t, v.addr(), &fakeCard{}, o)
	p := v.accept(false)
	const warning = "connected to vpcd, but it has not polled the card; is another card in this slot?"
	waitFor(t, "the warning", func() bool { return len(rec.levels(warning)) > 0 })
	if n := len(rec.levels("card inserted in vpcd")); n != 0 {
		t.Errorf("insertion logged %d times before any poll", n)
	}
	p.mustSend([]byte{ctrlATR})
	p.mustRecv()
	waitFor(t, "insertion", func() bool { return len(rec.levels("card inserted in vpcd")) == 1 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if got := rec.levels(warning); !slices.Equal(got, []slog.Level{slog.LevelWarn}) {
		t.Errorf("warning logged at %v, want once at WARN", got)
	}
}

// TestPCSCDRestart drops the listener and the connection, then brings vpcd
// back on the same port.
func TestPCSCDRestart(t *testing.T) {
	checkGoroutines(t)
	v := newFakeVPCD(t)
	addr := v.addr()
	c := &fakeCard{}
	stop := startServe(t, addr, c, fastBackoff(nil))
	p := v.accept(true)
	p.mustSend([]byte{ctrlOn})
	if got := p.transmit([]byte{0x00, 0xA4, 0x04, 0x00}); !bytes.Equal(got, []byte{0x90, 0x00}) {
		t.Fatalf("APDU: %X", got)
	}
	v.ln.Close()
	p.c.Close()
	time.Sleep(30 * time.Millisecond) // a few failed attempts against no listener

	v2 := listenOn(t, addr)
	p2 := v2.accept(true)
	if got := p2.transmit([]byte{0x00, 0xA4, 0x04, 0x00}); !bytes.Equal(got, []byte{0x90, 0x00}) {
		t.Fatalf("APDU after restart: %X", got)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

func TestCancel(t *testing.T) {
	t.Run("while connected", func(t *testing.T) {
		checkGoroutines(t)
		v := newFakeVPCD(t)
		stop := startServe(t, v.addr(), &fakeCard{}, nil)
		p := v.accept(false)
		p.mustSend([]byte{ctrlATR})
		p.mustRecv()
		if err := stop(); err != nil {
			t.Fatalf("Serve = %v, want nil", err)
		}
		p.expectClosed()
	})
	t.Run("while waiting for vpcd", func(t *testing.T) {
		checkGoroutines(t)
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		ln.Close()
		rec := &logRecorder{}
		// A backoff far longer than the test: cancel must cut it short.
		stop := startServe(t, addr, &fakeCard{}, &Options{Logger: slog.New(rec), MinBackoff: time.Hour})
		waitFor(t, "first attempt", func() bool { return len(rec.levels("waiting for vpcd")) > 0 })
		start := time.Now()
		if err := stop(); err != nil {
			t.Fatalf("Serve = %v, want nil", err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("Serve took %v to return", d)
		}
	})
	t.Run("while the card is busy", func(t *testing.T) {
		checkGoroutines(t)
		v := newFakeVPCD(t)
		entered := make(chan struct{})
		c := &fakeCard{transmit: func(ctx context.Context, cmd []byte) ([]byte, error) {
			close(entered)
			<-ctx.Done()
			return nil, ctx.Err()
		}}
		stop := startServe(t, v.addr(), c, nil)
		p := v.accept(false)
		p.mustSend([]byte{0x00, 0x2A, 0x9E, 0x9A, 0x00})
		<-entered
		if err := stop(); err != nil {
			t.Fatalf("Serve = %v, want nil (a cancelled card is not a failed card)", err)
		}
		p.expectClosed()
	})
}

func TestCardFailed(t *testing.T) {
	checkGoroutines(t)
	v := newFakeVPCD(t)
	boom := errors.New("key store vanished")
	c := &fakeCard{transmit: func(context.Context, []byte) ([]byte, error) { return nil, boom }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, v.addr(), c, fastBackoff(nil)) }()
	p := v.accept(false)
	p.mustSend([]byte{0x00, 0xA4, 0x04, 0x00})
	p.expectClosed()
	select {
	case err := <-done:
		if !errors.Is(err, ErrCardFailed) || !errors.Is(err, boom) {
			t.Errorf("Serve = %v, want ErrCardFailed wrapping %v", err, boom)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Serve kept going with a failed card")
	}
}

func TestBadAddress(t *testing.T) {
	for _, addr := range []string{"", "127.0.0.1", "localhost:notaport:1", "127.0.0.1:nosuchservice"} {
		t.Run(addr, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			if err := Serve(ctx, addr, &fakeCard{}, nil); err == nil {
				t.Errorf("Serve(%q) = nil, want an address error", addr)
			}
			if ctx.Err() != nil {
				t.Errorf("Serve(%q) retried instead of failing", addr)
			}
		})
	}
}

func TestTrace(t *testing.T) {
	checkGoroutines(t)
	v := newFakeVPCD(t)
	var buf bytes.Buffer
	var events []TraceEvent
	var mu sync.Mutex
	jt := JSONTrace(&buf)
	trace := func(e TraceEvent) {
		mu.Lock()
		events = append(events, e)
		mu.Unlock()
		jt(e)
	}
	stop := startServe(t, v.addr(), &fakeCard{}, &Options{Trace: trace})
	p := v.accept(false)
	pin := "3132333435363738"    // "12345678"
	newPIN := "3837363534333231" // "87654321"
	puk := "4142434445464748"    // "ABCDEFGH"
	p.mustSend([]byte{ctrlOn})
	p.mustSend([]byte{ctrlATR})
	p.mustRecv()
	p.transmit(mustHex(t, "00A4040007A0000000790100"))
	p.transmit(mustHex(t, "0020008008"+pin))
	p.transmit(mustHex(t, "8024008010"+pin+newPIN))
	p.transmit(mustHex(t, "002C000010"+puk+newPIN))
	p.transmit(mustHex(t, "00200080")) // PIN status: nothing to redact
	p.mustSend([]byte{ctrlOff})
	p.mustSend([]byte{ctrlATR})
	p.mustRecv()
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	out := buf.String()
	for _, secret := range []string{pin, newPIN, puk} {
		if strings.Contains(strings.ToUpper(out), secret) {
			t.Errorf("trace contains PIN bytes %s:\n%s", secret, out)
		}
	}
	want := []struct {
		event    string
		cmd      string
		redacted int
		rsp      string
	}{
		{"power-on", "", 0, ""},
		{"get-atr", "", 0, hexs(testATR)},
		{"apdu", "00A4040007A0000000790100", 0, "9000"},
		{"apdu", "00200080", 9, "9000"},
		{"apdu", "80240080", 17, "9000"},
		{"apdu", "002C0000", 17, "9000"},
		{"apdu", "00200080", 0, "9000"},
		{"power-off", "", 0, ""},
		{"get-atr", "", 0, hexs(testATR)},
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(want) {
		t.Fatalf("%d trace lines, want %d:\n%s", len(lines), len(want), out)
	}
	for i, line := range lines {
		var l traceLine
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("line %d: %v: %s", i, err, line)
		}
		w := want[i]
		if l.Event != w.event || l.Command != w.cmd || l.Redacted != w.redacted || l.Response != w.rsp {
			t.Errorf("line %d = %s\nwant event %s cmd %q redacted %d rsp %q", i, line, w.event, w.cmd, w.redacted, w.rsp)
		}
		ts, err := time.Parse(time.RFC3339Nano, l.Time)
		if err != nil || time.Since(ts) > time.Minute || l.Micros < 0 {
			t.Errorf("line %d: bad time %q or duration %v", i, l.Time, l.Micros)
		}
	}
	// Events own their bytes: later traffic must not rewrite them.
	mu.Lock()
	defer mu.Unlock()
	if got := hexs(events[2].Command); got != "00A4040007A0000000790100" {
		t.Errorf("retained event command changed to %s", got)
	}
}

// TestTraceAfterAnswer: the trace runs once the answer is on the wire, so
// its cost never sits in an APDU's round trip. A Trace that blocks until
// vpcd has read the answer would otherwise hold the answer back for good.
func TestTraceAfterAnswer(t *testing.T) {
	checkGoroutines(t)
	v := newFakeVPCD(t)
	answered := make(chan struct{})
	trace := func(e TraceEvent) {
		if e.Event != EventAPDU {
			return
		}
		select {
		case <-answered:
		case <-time.After(5 * time.Second):
			t.Error("trace called before vpcd had the answer")
		}
	}
	stop := startServe(t, v.addr(), &fakeCard{}, &Options{Trace: trace})
	p := v.accept(false)
	p.mustSend([]byte{ctrlOn})
	if got := p.transmit(mustHex(t, "00A4040007A0000000790100")); len(got) < 2 {
		t.Fatalf("answer %X", got)
	}
	close(answered)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}
