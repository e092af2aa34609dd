package pcsc

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"
)

func TestEvalReader(t *testing.T) {
	present := readerEntry{name: "R", eventCounter: 3, state: cardPresent | cardPowered | cardNegotiable, atr: []byte{0x3B, 0x00}}
	absent := readerEntry{name: "R", eventCounter: 4, state: cardAbsent}
	shared := present
	shared.sharing = 2
	exclusive := present
	exclusive.sharing = sharingExclusive
	mute := readerEntry{name: "R", eventCounter: 1, state: cardPresent | cardSwallowed}
	broken := readerEntry{name: "R", eventCounter: 1, state: cardUnknown}
	c3 := State(3 << 16)
	tests := []struct {
		name    string
		cur     State
		e       readerEntry
		want    State
		atr     []byte
		changed bool
	}{
		{"unaware, present", StateUnaware, present, c3 | StatePresent | StateChanged, present.atr, true},
		{"unaware, absent", StateUnaware, absent, 4<<16 | StateEmpty | StateChanged, nil, true},
		{"present as known", StatePresent, present, c3 | StatePresent, present.atr, false},
		{"present with the right counter", c3 | StatePresent, present, c3 | StatePresent, present.atr, false},
		// Removed and reinserted between two calls: same state, new counter.
		{"present with a stale counter", 2<<16 | StatePresent, present, c3 | StatePresent | StateChanged, present.atr, true},
		{"removed", StatePresent, absent, 4<<16 | StateEmpty | StateChanged, nil, true},
		{"inserted", StateEmpty, present, c3 | StatePresent | StateChanged, present.atr, true},
		{"in use by another", StatePresent, shared, c3 | StatePresent | StateInUse, present.atr, false},
		{"in use ended", StatePresent | StateInUse, present, c3 | StatePresent | StateChanged, present.atr, true},
		{"exclusive", StatePresent | StateInUse, exclusive, c3 | StatePresent | StateExclusive | StateChanged, present.atr, true},
		{"exclusive as known", StatePresent | StateExclusive, exclusive, c3 | StatePresent | StateExclusive, present.atr, false},
		{"mute card", StatePresent, mute, 1<<16 | StatePresent | StateMute | StateChanged, nil, true},
		{"reader broken", StatePresent, broken, StateUnavailable | StateChanged, nil, true},
		{"reader broken as known", StateUnavailable, broken, StateUnavailable, nil, false},
		{"reader back", StateUnknown | StateUnavailable, absent, 4<<16 | StateEmpty | StateChanged, nil, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ev, atr, changed := evalReader(tc.cur, tc.e)
			if ev != tc.want || changed != tc.changed || !bytes.Equal(atr, tc.atr) {
				t.Errorf("evalReader(%v) = %v %X %v, want %v %X %v", tc.cur, ev, atr, changed, tc.want, tc.atr, tc.changed)
			}
		})
	}
}

func TestStateString(t *testing.T) {
	tests := []struct {
		s    State
		want string
	}{
		{0, "unaware"},
		{StatePresent | StateInUse, "present|inuse"},
		{StateChanged | StateEmpty | 0x30000, "changed|empty|0x30000"},
	}
	for _, tc := range tests {
		if got := tc.s.String(); got != tc.want {
			t.Errorf("State(%#x).String() = %q, want %q", uint32(tc.s), got, tc.want)
		}
	}
	if got := ErrTimeout.Error(); got != "pcsc: SCARD_E_TIMEOUT (0x8010000A)" {
		t.Errorf("ErrTimeout.Error() = %q", got)
	}
	if got := Error(0x80100099).Error(); got != "pcsc: unknown return code 0x80100099" {
		t.Errorf("unknown code: %q", got)
	}
	if CtlCode(3400) != 0x42000D48 {
		t.Errorf("CtlCode(3400) = %#x", CtlCode(3400))
	}
}

// waitRegistered waits until n clients of d wait for an event.
func waitRegistered(t *testing.T, d *fakeD, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for d.waiting() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d clients waiting, want %d", d.waiting(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestGetStatusChangeFake(t *testing.T) {
	for _, minor := range []int32{4, 5} {
		d := newFakeD(t, minor, true)
		empty := readerEntry{name: vReader.name, eventCounter: 1, state: cardAbsent}
		d.setTable([]readerEntry{empty})
		c, err := EstablishContext(bg(), d.opts())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Release()

		st := []ReaderState{{Reader: vReader.name}}
		if err := c.GetStatusChange(bg(), 0, st); err != nil {
			t.Fatalf("4.%d unaware: %v", minor, err)
		}
		if st[0].EventState != 1<<16|StateEmpty|StateChanged {
			t.Fatalf("4.%d unaware EventState %v", minor, st[0].EventState)
		}
		if d.waiting() != 0 {
			t.Fatalf("still registered after returning")
		}

		// Timeout, and zero timeout.
		st[0].CurrentState = st[0].EventState &^ StateChanged
		for _, to := range []time.Duration{0, 50 * time.Millisecond} {
			if err := c.GetStatusChange(bg(), to, st); err != ErrTimeout {
				t.Fatalf("4.%d timeout %v: %v", minor, to, err)
			}
			if d.waiting() != 0 {
				t.Fatalf("still registered after a timeout")
			}
		}

		// An insertion while waiting.
		done := make(chan error, 1)
		go func() { done <- c.GetStatusChange(bg(), -1, st) }()
		waitRegistered(t, d, 1)
		in := vReader
		in.eventCounter = 2
		d.setTable([]readerEntry{in})
		d.signal()
		if err := <-done; err != nil {
			t.Fatalf("4.%d insertion: %v", minor, err)
		}
		if st[0].EventState != 2<<16|StatePresent|StateChanged || !bytes.Equal(st[0].ATR, in.atr) {
			t.Fatalf("4.%d after insertion: %v %X", minor, st[0].EventState, st[0].ATR)
		}

		// A signal that changes nothing we watch: keep waiting.
		st[0].CurrentState = st[0].EventState &^ StateChanged
		go func() { done <- c.GetStatusChange(bg(), -1, st) }()
		waitRegistered(t, d, 1)
		d.signal()
		waitRegistered(t, d, 1) // registered again
		select {
		case err := <-done:
			t.Fatalf("returned (%v) on an irrelevant signal", err)
		case <-time.After(20 * time.Millisecond):
		}
		// Cancel from another goroutine.
		if err := c.Cancel(); err != nil {
			t.Fatalf("Cancel: %v", err)
		}
		if err := <-done; !errors.Is(err, ErrCancelled) {
			t.Fatalf("after Cancel: %v", err)
		}
		// Cancel with nothing waiting is a no-op, as SCardCancel.
		if err := c.Cancel(); err != nil {
			t.Fatalf("idle Cancel: %v", err)
		}

		// ctx cancellation.
		ctx, cancel := context.WithCancel(bg())
		go func() { done <- c.GetStatusChange(ctx, -1, st) }()
		waitRegistered(t, d, 1)
		cancel()
		if err := <-done; !errors.Is(err, ErrCancelled) || !errors.Is(err, context.Canceled) {
			t.Fatalf("ctx cancel: %v", err)
		}
		if d.waiting() != 0 {
			t.Fatal("still registered after ctx cancel")
		}

		// Reader hot-plug through the PnP pseudo-reader.
		pnp := []ReaderState{{Reader: `\\?PnP?\Notification`}}
		go func() { done <- c.GetStatusChange(bg(), 5*time.Second, pnp) }()
		waitRegistered(t, d, 1)
		second := readerEntry{name: "Virtual PCD 00 01", eventCounter: 0, state: cardAbsent}
		d.setTable([]readerEntry{in, second})
		d.signal()
		if err := <-done; err != nil {
			t.Fatalf("4.%d PnP: %v", minor, err)
		}
		if pnp[0].EventState&StateChanged == 0 {
			t.Fatalf("4.%d PnP EventState %v", minor, pnp[0].EventState)
		}
		if minor >= 5 {
			// The reader-events counter rides in the upper 16 bits, and a
			// stale one reports the change at once (libpcsclite 2.3+).
			d.mu.Lock()
			ev := d.events
			d.mu.Unlock()
			if got := uint32(pnp[0].EventState) >> 16; got != ev {
				t.Fatalf("PnP counter %d, daemon's %d", got, ev)
			}
			pnp[0].CurrentState = State((ev - 1) << 16)
			if err := c.GetStatusChange(bg(), 0, pnp); err != nil || pnp[0].EventState&StateChanged == 0 {
				t.Fatalf("stale PnP counter: %v %v", err, pnp[0].EventState)
			}
		} else if pnp[0].EventState>>16 != 0 {
			t.Fatalf("4.4 PnP upper bits %v", pnp[0].EventState)
		}

		// A reader that goes away during the wait.
		st = []ReaderState{{Reader: second.name, CurrentState: StateEmpty}}
		go func() { done <- c.GetStatusChange(bg(), 5*time.Second, st) }()
		waitRegistered(t, d, 1)
		d.setTable([]readerEntry{in})
		d.signal()
		if err := <-done; err != nil {
			t.Fatalf("reader removal: %v", err)
		}
		if st[0].EventState != StateUnknown|StateUnavailable|StateChanged {
			t.Fatalf("removed reader EventState %v", st[0].EventState)
		}
		// Unknown names are refused; ignored entries and empty lists return at once.
		if err := c.GetStatusChange(bg(), -1, []ReaderState{{Reader: "nope"}}); !errors.Is(err, ErrUnknownReader) {
			t.Fatalf("unknown reader: %v", err)
		}
		if err := c.GetStatusChange(bg(), -1, []ReaderState{{Reader: "nope", CurrentState: StateIgnore}}); err != nil {
			t.Fatalf("ignored: %v", err)
		}
		if err := c.GetStatusChange(bg(), -1, nil); err != nil {
			t.Fatalf("empty: %v", err)
		}
		if err := c.GetStatusChange(bg(), 0, make([]ReaderState, maxStates+1)); !errors.Is(err, ErrInvalidParameter) {
			t.Fatalf("too many: %v", err)
		}
		if _, err := c.ListReaders(); err != nil {
			t.Fatalf("4.%d: context out of step afterwards: %v", minor, err)
		}
	}
}

// TestStopCrossesEvent: pcscd signals an event just as the client gives up
// waiting; it then sends no answer to the stop request, and the event
// message stands in for it. The client must not wait for a second message.
func TestStopCrossesEvent(t *testing.T) {
	d := newFakeD(t, 4, true)
	d.setTable([]readerEntry{{name: vReader.name, eventCounter: 1, state: cardAbsent}})
	c, err := EstablishContext(bg(), d.opts())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	d.override = func(s *fakeSession, cmd uint32, body []byte) bool {
		if cmd == cmdStopWaiting {
			d.signal() // the event wins the race; pcscd then stays silent
			return true
		}
		return false
	}
	st := []ReaderState{{Reader: vReader.name, CurrentState: 1<<16 | StateEmpty}}
	if err := c.GetStatusChange(bg(), 20*time.Millisecond, st); err != ErrTimeout {
		t.Fatalf("GetStatusChange: %v, want ErrTimeout", err)
	}
	if _, err := c.ListReaders(); err != nil {
		t.Fatalf("out of step: %v", err)
	}
}
