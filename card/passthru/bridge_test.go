package passthru

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/pcsc"
)

// fakeSlot records what the bridge does to a virtual reader, in the
// vscard.Client's terms.
type fakeSlot struct {
	mu      sync.Mutex
	calls   []string
	reader  bool
	card    card.Card
	dropped bool // simulate the client dropping a failed card
}

func (s *fakeSlot) rec(f string, a ...any) {
	s.calls = append(s.calls, fmt.Sprintf(f, a...))
}

func (s *fakeSlot) AddReader() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rec("add")
	if s.reader {
		return errors.New("reader already present")
	}
	s.reader = true
	return nil
}

func (s *fakeSlot) RemoveReader() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rec("rmreader")
	if !s.reader {
		return errors.New("no reader")
	}
	s.reader = false
	return nil
}

func (s *fakeSlot) Insert(c card.Card) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.card != nil {
		return errors.New("card already inserted")
	}
	s.rec("insert:%s", c.(*fakeFwd).reader)
	s.card = c
	return nil
}

func (s *fakeSlot) Remove() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.card == nil {
		return errors.New("no card")
	}
	s.rec("remove")
	s.card = nil
	return nil
}

func (s *fakeSlot) HoldsCard() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.card != nil
}

func (s *fakeSlot) log() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.calls, " ")
}

type fakeFwd struct {
	reader string
	closed bool
}

func (f *fakeFwd) ATR() []byte { return []byte{0x3B, 0x00} }
func (f *fakeFwd) PowerOn()    {}
func (f *fakeFwd) PowerOff()   {}
func (f *fakeFwd) Reset()      {}
func (f *fakeFwd) Transmit(context.Context, []byte) ([]byte, error) {
	return []byte{0x90, 0x00}, nil
}
func (f *fakeFwd) Close() error { f.closed = true; return nil }

type bridgeRig struct {
	b      *Bridge
	slots  []*fakeSlot
	events chan Event
	opens  chan string
	done   chan struct{}
	cancel context.CancelFunc
}

func newBridgeRig(t *testing.T, n int, reader string) *bridgeRig {
	t.Helper()
	r := &bridgeRig{events: make(chan Event), opens: make(chan string, 16), done: make(chan struct{})}
	var slots []Slot
	for range n {
		s := &fakeSlot{}
		r.slots = append(r.slots, s)
		slots = append(slots, s)
	}
	r.b = NewBridge(slots, &BridgeOptions{
		Reader: reader,
		Retry:  10 * time.Millisecond,
		watch:  func(context.Context) <-chan Event { return r.events },
		open: func(_ context.Context, name string) (forwarded, error) {
			r.opens <- name
			return &fakeFwd{reader: name}, nil
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() {
		r.b.Run(ctx)
		close(r.done)
	}()
	t.Cleanup(func() {
		cancel()
		close(r.events)
		<-r.done
	})
	return r
}

// send delivers events, then a no-op so that the bridge has handled them.
func (r *bridgeRig) send(evs ...Event) {
	for _, e := range evs {
		r.events <- e
	}
	r.events <- Event{Kind: ServiceUp}
}

func ins(reader string) Event {
	return Event{Kind: CardInserted, Reader: reader, ATR: []byte{0x3B, 0x00}}
}

func TestBridgeMapping(t *testing.T) {
	add := func(r string) Event { return Event{Kind: ReaderAdded, Reader: r} }
	rm := func(r string) Event { return Event{Kind: ReaderRemoved, Reader: r} }
	out := func(r string) Event { return Event{Kind: CardRemoved, Reader: r} }
	tests := []struct {
		name   string
		slots  int
		reader string
		events []Event
		want   []string // per slot
	}{
		{"first reader", 1, "", []Event{add("A"), add("B"), ins("B"), ins("A"), out("A"), rm("A")},
			[]string{"add insert:A remove rmreader add insert:B"}},
		{"named by substring", 1, "PCD 00 01", []Event{add("Virtual PCD 00 00"), add("Virtual PCD 00 01"), ins("Virtual PCD 00 01")},
			[]string{"add insert:Virtual PCD 00 01"}},
		{"reader unplugged with its card, then back", 1, "", []Event{add("A"), ins("A"), out("A"), rm("A"), add("A"), ins("A")},
			[]string{"add insert:A remove rmreader add insert:A"}},
		{"all: readers take free slots in order", 2, "all", []Event{add("A"), add("B"), add("C"), ins("C"), ins("B"), rm("A")},
			[]string{"add rmreader add insert:C", "add insert:B"}},
		{"first reader: the next one takes over", 1, "", []Event{add("A"), add("B"), ins("B"), rm("A")},
			[]string{"add rmreader add insert:B"}},
		{"named reader keeps its slot", 1, "A", []Event{add("A"), add("B"), ins("B"), rm("A"), add("A")},
			[]string{"add rmreader add"}},
		{"pcscd restart", 1, "", []Event{add("A"), ins("A"), out("A"), rm("A"), {Kind: ServiceDown}, {Kind: ServiceUp}, add("A"), ins("A")},
			[]string{"add insert:A remove rmreader add insert:A"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newBridgeRig(t, tc.slots, tc.reader)
			r.send(tc.events...)
			for i, s := range r.slots {
				if got := s.log(); got != tc.want[i] {
					t.Errorf("slot %d: %q, want %q", i, got, tc.want[i])
				}
			}
		})
	}
}

// TestBridgeReopensDroppedCard: a card that failed in use (the client took
// it out) while the reader still shows it is opened and inserted again.
func TestBridgeReopensDroppedCard(t *testing.T) {
	r := newBridgeRig(t, 1, "")
	r.send(Event{Kind: ReaderAdded, Reader: "A"}, ins("A"))
	<-r.opens
	r.slots[0].mu.Lock()
	r.slots[0].card = nil // the client dropped it
	r.slots[0].mu.Unlock()
	select {
	case <-r.opens:
	case <-time.After(5 * time.Second):
		t.Fatal("the dropped card was not opened again")
	}
	deadline := time.Now().Add(5 * time.Second)
	for !r.slots[0].HoldsCard() {
		if time.Now().After(deadline) {
			t.Fatalf("not re-inserted: %s", r.slots[0].log())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestBridgeEjectReinsert(t *testing.T) {
	r := newBridgeRig(t, 1, "")
	r.send(Event{Kind: ReaderAdded, Reader: "A"}, ins("A"))
	if err := r.b.Eject(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // several retry ticks: an ejected card stays out
	if r.slots[0].HoldsCard() {
		t.Fatal("ejected card came back by itself")
	}
	if st := r.b.Status(); !st.Slots[0].Held || st.Slots[0].Reader != "A" || !st.Slots[0].Card {
		t.Errorf("status %+v", st)
	}
	if err := r.b.Reinsert(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got, want := r.slots[0].log(), "add insert:A remove insert:A"; got != want {
		t.Errorf("slot: %q, want %q", got, want)
	}
}

func TestMatchReader(t *testing.T) {
	readers := []string{"Virtual PCD 00 00", "Virtual PCD 00 01", "Yubico YubiKey OTP+FIDO+CCID 01 00"}
	tests := []struct {
		want, got string
		ok        bool
		err       string
	}{
		{"Virtual PCD 00 01", "Virtual PCD 00 01", true, ""},
		{"Yubico", "Yubico YubiKey OTP+FIDO+CCID 01 00", true, ""},
		{"CCID", "Yubico YubiKey OTP+FIDO+CCID 01 00", true, ""},
		{"00 01", "Virtual PCD 00 01", true, ""},
		{"Virtual", "", false, "ambiguous"},
		{"Gemalto", "", false, ""},
	}
	for _, tc := range tests {
		got, ok, err := MatchReader(tc.want, readers)
		if got != tc.got || ok != tc.ok || (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("MatchReader(%q) = %q, %v, %v; want %q, %v, %q", tc.want, got, ok, err, tc.got, tc.ok, tc.err)
		}
	}
}

// TestBridgeOpenFailureRetries: a card that cannot be opened (held
// exclusively by another program) is retried until it opens, and the
// warning is logged once, not at every retry.
func TestBridgeOpenFailureRetries(t *testing.T) {
	lb := &logBuf{}
	slot := &fakeSlot{}
	events := make(chan Event)
	var mu sync.Mutex
	fails := 5
	b := NewBridge([]Slot{slot}, &BridgeOptions{
		Retry:  5 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(lb, nil)),
		watch:  func(context.Context) <-chan Event { return events },
		open: func(_ context.Context, name string) (forwarded, error) {
			mu.Lock()
			defer mu.Unlock()
			if fails > 0 {
				fails--
				return nil, pcsc.ErrSharingViolation
			}
			return &fakeFwd{reader: name}, nil
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	defer func() { cancel(); close(events); <-done }()
	events <- Event{Kind: ReaderAdded, Reader: "A"}
	events <- ins("A")
	deadline := time.Now().Add(5 * time.Second)
	for !slot.HoldsCard() {
		if time.Now().After(deadline) {
			t.Fatalf("card never inserted: %s\n%s", slot.log(), lb)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := strings.Count(lb.String(), "cannot open the card"); n != 1 {
		t.Errorf("open failure logged %d times, want once:\n%s", n, lb)
	}
	if st := b.Status(); st.Slots[0].LastErr != "" {
		t.Errorf("last error %q after a successful open", st.Slots[0].LastErr)
	}
}
