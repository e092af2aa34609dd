package passthru

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/pcsc"
)

// fakeHandle is a PC/SC card handle to a card with one PIN (reference 80,
// "12345678") that answers an empty VERIFY with its tries left unless
// noProbe is set, answers 00 CA with 300 bytes through a 61 xx chain, and
// records every call.
type fakeHandle struct {
	mu       sync.Mutex
	calls    []string
	tries    int
	maxTries int
	verified bool
	noProbe  bool
	// probeCounts makes the card behave like vsmartcard's vicc: an empty
	// VERIFY is a wrong PIN, answered 63 00, and wrong PINs say 63 00 too.
	probeCounts bool
	pending     []byte // rest of a response chain
	inTx        bool
	// failNext makes the next call of that name fail with the error.
	failNext map[string]error
	atr      []byte
}

func newFake(tries int) *fakeHandle {
	return &fakeHandle{tries: tries, maxTries: 3, failNext: map[string]error{}, atr: []byte{0x3B, 0x00}}
}

func (f *fakeHandle) record(s string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, s)
	name, _, _ := strings.Cut(s, ":")
	if err, ok := f.failNext[name]; ok {
		delete(f.failNext, name)
		return err
	}
	return nil
}

func (f *fakeHandle) log() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func (f *fakeHandle) reset() {
	f.mu.Lock()
	f.calls = nil
	f.mu.Unlock()
}

func (f *fakeHandle) Transmit(cmd []byte) ([]byte, error) {
	if err := f.record(fmt.Sprintf("tx:%X", cmd)); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(cmd) < 4 || (len(cmd) > 5 && int(cmd[4])+5 != len(cmd) && int(cmd[4])+6 != len(cmd)) {
		return []byte{0x67, 0x00}, nil
	}
	if cmd[0] == 0xFF {
		return []byte{0x6E, 0x00}, nil
	}
	switch cmd[1] {
	case 0x20, 0x24:
		if cmd[3] != 0x80 {
			return []byte{0x6A, 0x88}, nil
		}
		if f.probeCounts && (len(cmd) == 4 || string(cmd[5:]) != "12345678") {
			if f.tries == 0 {
				return []byte{0x69, 0x83}, nil
			}
			f.tries--
			return []byte{0x63, 0x00}, nil
		}
		if len(cmd) == 4 {
			if f.noProbe {
				return []byte{0x6D, 0x00}, nil
			}
			if f.verified {
				return []byte{0x90, 0x00}, nil
			}
			return []byte{0x63, 0xC0 | byte(f.tries)}, nil
		}
		if len(cmd) == 5 || cmd[4] == 0 {
			return []byte{0x67, 0x00}, nil
		}
		if f.tries == 0 {
			return []byte{0x69, 0x83}, nil
		}
		pin := cmd[5 : 5+int(cmd[4])]
		if cmd[1] == 0x24 && len(pin) >= 8 {
			pin = pin[:8]
		}
		if string(pin) == "12345678" {
			f.tries, f.verified = f.maxTries, true
			return []byte{0x90, 0x00}, nil
		}
		f.tries--
		f.verified = false
		return []byte{0x63, 0xC0 | byte(f.tries)}, nil
	case 0xCA:
		f.pending = bytes.Repeat([]byte{0xAB}, 300)
		return f.chunk(), nil
	case 0xB0:
		// READ BINARY of a 16-byte file with the wrong Le: 6C 10.
		if len(cmd) == 5 && cmd[4] == 0x10 {
			return append(bytes.Repeat([]byte{0xCD}, 16), 0x90, 0x00), nil
		}
		return []byte{0x6C, 0x10}, nil
	case 0xC0:
		if f.pending == nil {
			return []byte{0x69, 0x85}, nil
		}
		return f.chunk(), nil
	}
	return []byte{0x90, 0x00}, nil
}

func (f *fakeHandle) chunk() []byte {
	n := min(len(f.pending), 256)
	out := append([]byte(nil), f.pending[:n]...)
	f.pending = f.pending[n:]
	if len(f.pending) == 0 {
		f.pending = nil
		return append(out, 0x90, 0x00)
	}
	return append(out, 0x61, byte(min(len(f.pending), 256)))
}

func (f *fakeHandle) BeginTransaction(ctx context.Context) error {
	if err := f.record("begin"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.inTx {
		return errors.New("fake: nested transaction")
	}
	f.inTx = true
	return nil
}

func (f *fakeHandle) EndTransaction(d pcsc.Disposition) error {
	if err := f.record(fmt.Sprintf("end:%d", d)); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.inTx {
		return pcsc.ErrNotTransacted
	}
	f.inTx = false
	return nil
}

func (f *fakeHandle) Reconnect(mode pcsc.ShareMode, p pcsc.Protocol, d pcsc.Disposition) error {
	if err := f.record(fmt.Sprintf("reconnect:%d,%d", mode, d)); err != nil {
		return err
	}
	f.mu.Lock()
	f.inTx = false
	f.mu.Unlock()
	return nil
}

func (f *fakeHandle) Status() (pcsc.CardStatus, error) {
	return pcsc.CardStatus{Reader: "R", ATR: f.atr, Protocol: pcsc.ProtocolT1}, nil
}

func (f *fakeHandle) Disconnect(d pcsc.Disposition) error {
	return f.record(fmt.Sprintf("disconnect:%d", d))
}

// logBuf collects log lines for checks (and for the never-log-a-PIN test).
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newTestCard(t *testing.T, f *fakeHandle, o Options) (*Card, *logBuf) {
	t.Helper()
	lb := &logBuf{}
	o.Logger = slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug}))
	mode := pcsc.ShareShared
	if o.Exclusive {
		mode = pcsc.ShareExclusive
	}
	c, err := newCard(f, "R", mode, &o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, lb
}

func h(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

func verify(pin string) []byte {
	return append([]byte{0x00, 0x20, 0x00, 0x80, byte(len(pin))}, pin...)
}

func TestGuard(t *testing.T) {
	wrong, right := verify("87654321"), verify("12345678")
	change := append([]byte{0x00, 0x24, 0x00, 0x80, 16}, "8765432112345678"...)
	tests := []struct {
		name    string
		tries   int
		noProbe bool
		// probeCounts: the card takes an empty VERIFY as a wrong PIN.
		probeCounts bool
		allow       bool
		excl        bool
		cmds        [][]byte
		want        []string // the answers, hex
		card        int      // the card's tries left afterwards
		refused     bool     // a refusal is logged
	}{
		{name: "wrong PINs stop at one try left", tries: 3, cmds: [][]byte{wrong, wrong, wrong, wrong},
			want: []string{"63C2", "63C1", "6983", "6983"}, card: 1, refused: true},
		{name: "right PIN at one try left is refused too", tries: 1, cmds: [][]byte{right},
			want: []string{"6983"}, card: 1, refused: true},
		{name: "right PIN resets the counter", tries: 3, cmds: [][]byte{wrong, right, wrong},
			want: []string{"63C2", "9000", "63C2"}, card: 2},
		{name: "CHANGE REFERENCE DATA is guarded", tries: 1, cmds: [][]byte{change},
			want: []string{"6983"}, card: 1, refused: true},
		{name: "allow-last-pin-try forwards", tries: 1, allow: true, cmds: [][]byte{wrong, wrong},
			want: []string{"63C0", "6983"}, card: 0},
		{name: "card that does not answer the probe: learns from 63 Cx", tries: 2, noProbe: true,
			cmds: [][]byte{wrong, wrong}, want: []string{"63C1", "6983"}, card: 1, refused: true},
		// vicc counts the probe as a wrong PIN: the guard spends one try
		// finding that out, and never probes again, so wrong-then-right
		// still works with 3 tries (probing each time would block it).
		{name: "card that counts the probe as a wrong PIN is probed once", tries: 3, probeCounts: true,
			cmds: [][]byte{wrong, right, wrong}, want: []string{"6300", "9000", "6300"}, card: 2},
		{name: "exclusive mode probes once", tries: 3, excl: true, cmds: [][]byte{wrong, wrong, wrong},
			want: []string{"63C2", "63C1", "6983"}, card: 1, refused: true},
		{name: "empty VERIFY is forwarded", tries: 1, cmds: [][]byte{h("00200080")},
			want: []string{"63C1"}, card: 1},
		{name: "other reference is not ours", tries: 1, cmds: [][]byte{h("0020008104 31323334")},
			want: []string{"6A88"}, card: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(tc.tries)
			f.noProbe = tc.noProbe
			f.probeCounts = tc.probeCounts
			c, lb := newTestCard(t, f, Options{AllowLastPINTry: tc.allow, Exclusive: tc.excl})
			for i, cmd := range tc.cmds {
				resp, err := c.Transmit(context.Background(), cmd)
				if err != nil {
					t.Fatal(err)
				}
				if got := fmt.Sprintf("%X", resp); got != tc.want[i] {
					t.Errorf("command %d: answer %s, want %s", i, got, tc.want[i])
				}
			}
			if f.tries != tc.card {
				t.Errorf("card has %d tries left, want %d", f.tries, tc.card)
			}
			logs := lb.String()
			if got := strings.Contains(logs, "one PIN try left"); got != tc.refused {
				t.Errorf("refusal logged: %v, want %v; log:\n%s", got, tc.refused, logs)
			}
			if tc.refused && !strings.Contains(logs, "--allow-last-pin-try") {
				t.Errorf("refusal does not say how to override it:\n%s", logs)
			}
			for _, pin := range []string{"87654321", "12345678", "3837363534333231", "3132333435363738"} {
				if strings.Contains(strings.ToUpper(logs), pin) {
					t.Errorf("log contains PIN bytes %s:\n%s", pin, logs)
				}
			}
			if tc.excl {
				probes := 0
				for _, s := range f.log() {
					if s == "tx:00200080" {
						probes++
					}
					if s == "begin" {
						t.Errorf("exclusive mode began a transaction")
					}
				}
				if probes != 1 {
					t.Errorf("exclusive mode probed %d times, want 1", probes)
				}
			}
		})
	}
}

// TestGuardProbesInsideTransaction checks that the probe and the VERIFY it
// guards are one transaction, so no other program's VERIFY can come
// between them.
func TestGuardProbesInsideTransaction(t *testing.T) {
	f := newFake(3)
	c, _ := newTestCard(t, f, Options{})
	if _, err := c.Transmit(context.Background(), verify("11111111")); err != nil {
		t.Fatal(err)
	}
	want := []string{"begin", "tx:00200080", "tx:00200080083131313131313131", "end:0"}
	if got := f.log(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("calls %q, want %q", got, want)
	}
}

func TestChainKeepsTransaction(t *testing.T) {
	f := newFake(3)
	c, _ := newTestCard(t, f, Options{ChainHold: time.Hour})
	ctx := context.Background()
	resp, err := c.Transmit(ctx, h("00CA000000"))
	if err != nil || !bytes.Equal(resp[len(resp)-2:], []byte{0x61, 44}) {
		t.Fatalf("first part: %X, %v", resp, err)
	}
	resp, err = c.Transmit(ctx, h("00C000002C"))
	if err != nil || len(resp) != 46 || resp[44] != 0x90 {
		t.Fatalf("GET RESPONSE: %X, %v", resp, err)
	}
	if _, err := c.Transmit(ctx, h("00A4040000")); err != nil {
		t.Fatal(err)
	}
	want := []string{"begin", "tx:00CA000000", "tx:00C000002C", "end:0", "begin", "tx:00A4040000", "end:0"}
	if got := f.log(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("calls %q, want %q", got, want)
	}
}

// TestWrongLeKeepsTransaction: after 6C xx the guest re-sends the command
// with the right Le inside the same transaction.
func TestWrongLeKeepsTransaction(t *testing.T) {
	f := newFake(3)
	c, _ := newTestCard(t, f, Options{ChainHold: time.Hour})
	ctx := context.Background()
	if r, err := c.Transmit(ctx, h("00B0000000")); err != nil || !bytes.Equal(r, []byte{0x6C, 0x10}) {
		t.Fatalf("READ BINARY: %X, %v", r, err)
	}
	if r, err := c.Transmit(ctx, h("00B0000010")); err != nil || len(r) != 18 {
		t.Fatalf("READ BINARY again: %X, %v", r, err)
	}
	want := []string{"begin", "tx:00B0000000", "tx:00B0000010", "end:0"}
	if got := f.log(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("calls %q, want %q", got, want)
	}
}

func TestChainHoldExpires(t *testing.T) {
	f := newFake(3)
	c, _ := newTestCard(t, f, Options{ChainHold: 20 * time.Millisecond})
	if _, err := c.Transmit(context.Background(), h("00CA000000")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		l := f.log()
		if l[len(l)-1] == "end:0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("transaction not released after the chain hold: %q", l)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The next command starts a new transaction.
	f.reset()
	if _, err := c.Transmit(context.Background(), h("00C000002C")); err != nil {
		t.Fatal(err)
	}
	if l := f.log(); len(l) == 0 || l[0] != "begin" {
		t.Errorf("calls after expiry %q, want a new transaction first", l)
	}
}

func TestPowerEventsReleaseOnly(t *testing.T) {
	f := newFake(3)
	c, _ := newTestCard(t, f, Options{ChainHold: time.Hour})
	c.Transmit(context.Background(), h("00CA000000"))
	f.reset()
	c.PowerOff()
	c.Reset()
	c.PowerOn()
	want := []string{"end:0"}
	if got := f.log(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("power events made calls %q, want only %q (never a card reset)", got, want)
	}
	if !bytes.Equal(c.ATR(), f.atr) {
		t.Errorf("ATR %X, want the card's %X", c.ATR(), f.atr)
	}
}

func TestResetByOtherProgram(t *testing.T) {
	for _, where := range []string{"begin", "tx"} {
		t.Run(where, func(t *testing.T) {
			f := newFake(3)
			c, lb := newTestCard(t, f, Options{})
			f.failNext[where] = pcsc.ErrResetCard
			resp, err := c.Transmit(context.Background(), h("00A4040000"))
			if err != nil || !bytes.Equal(resp, []byte{0x90, 0x00}) {
				t.Fatalf("Transmit after a reset: %X, %v; want 90 00 after a retry", resp, err)
			}
			var reconnects []string
			for _, s := range f.log() {
				if strings.HasPrefix(s, "reconnect") {
					reconnects = append(reconnects, s)
				}
			}
			// Shared mode (2), LeaveCard (0): never reset it again.
			if len(reconnects) != 1 || reconnects[0] != "reconnect:2,0" {
				t.Errorf("reconnects %q, want one reconnect:2,0", reconnects)
			}
			if !strings.Contains(lb.String(), "level=WARN") {
				t.Errorf("no warning logged:\n%s", lb)
			}
		})
	}
	t.Run("reset twice fails", func(t *testing.T) {
		f := newFake(3)
		c, _ := newTestCard(t, f, Options{})
		f.failNext["tx"] = pcsc.ErrResetCard
		f.failNext["reconnect"] = pcsc.ErrRemovedCard
		if _, err := c.Transmit(context.Background(), h("00A4040000")); !errors.Is(err, pcsc.ErrRemovedCard) {
			t.Errorf("err %v, want ErrRemovedCard", err)
		}
	})
}

func TestRemovedCardIsAnError(t *testing.T) {
	for _, e := range []error{pcsc.ErrRemovedCard, pcsc.ErrNoService, pcsc.ErrReaderUnavailable} {
		f := newFake(3)
		c, _ := newTestCard(t, f, Options{})
		f.failNext["tx"] = e
		if _, err := c.Transmit(context.Background(), h("00A4040000")); !errors.Is(err, e) {
			t.Errorf("err %v, want %v", err, e)
		}
		// The failed exchange does not leave the transaction open.
		if l := f.log(); l[len(l)-1] != "end:0" {
			t.Errorf("after %v: calls %q, want the transaction ended", e, l)
		}
	}
}

func TestClose(t *testing.T) {
	f := newFake(3)
	c, _ := newTestCard(t, f, Options{ChainHold: time.Hour})
	c.Transmit(context.Background(), h("00CA000000"))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	l := f.log()
	if strings.Join(l[len(l)-2:], " ") != "end:0 disconnect:0" {
		t.Errorf("Close made calls %q, want end:0 disconnect:0 (leave the card)", l)
	}
	if _, err := c.Transmit(context.Background(), h("00A4040000")); !errors.Is(err, ErrClosed) {
		t.Errorf("Transmit after Close: %v", err)
	}
}

// FuzzGuard feeds the guard arbitrary commands: it must never panic, and
// never let a PIN command reach a card with one try left.
func FuzzGuard(f *testing.F) {
	f.Add([]byte{0x00, 0x20, 0x00, 0x80, 0x02, 0x31, 0x32})
	f.Add([]byte{0x00, 0x24, 0x00, 0x80, 0x00, 0x00, 0x02, 0x31, 0x32})
	f.Add([]byte{0x00, 0x20, 0x00, 0x80})
	f.Add([]byte{0x00, 0xCA, 0x00, 0x00, 0x00})
	f.Fuzz(func(t *testing.T, cmd []byte) {
		fh := newFake(1)
		c, err := newCard(fh, "R", pcsc.ShareShared, &Options{ChainHold: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Transmit(context.Background(), cmd); err != nil {
			t.Fatal(err)
		}
		if fh.tries != 1 {
			t.Fatalf("command %X used the last PIN try", cmd)
		}
	})
}
