package passthru

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/vscard/vscard/pcsc"
)

// TestWatchUpdate drives the watcher's state machine with the reader
// states pcscd reports and checks the events it derives (the pcscd side is
// covered end to end in test/e2e/passthru_test.go).
func TestWatchUpdate(t *testing.T) {
	atrA, atrB := []byte{0x3B, 0x01}, []byte{0x3B, 0x02}
	st := func(s pcsc.State, counter uint32, atr []byte) pcsc.ReaderState {
		return pcsc.ReaderState{Reader: "R", EventState: s | pcsc.StateChanged | pcsc.State(counter<<16), ATR: atr}
	}
	tests := []struct {
		name   string
		states []pcsc.ReaderState
		want   string
	}{
		{"insert and remove", []pcsc.ReaderState{st(pcsc.StatePresent, 1, atrA), st(pcsc.StateEmpty, 2, nil)},
			"card inserted R 3B01, card removed R"},
		{"in use is not an event", []pcsc.ReaderState{st(pcsc.StatePresent, 1, atrA), st(pcsc.StatePresent|pcsc.StateInUse, 1, atrA)},
			"card inserted R 3B01"},
		{"mute card is not inserted", []pcsc.ReaderState{st(pcsc.StatePresent|pcsc.StateMute, 1, atrA)}, ""},
		{"swapped between waits: other ATR", []pcsc.ReaderState{st(pcsc.StatePresent, 1, atrA), st(pcsc.StatePresent, 1, atrB)},
			"card inserted R 3B01, card removed R, card inserted R 3B02"},
		{"swapped between waits: same ATR, counter moved", []pcsc.ReaderState{st(pcsc.StatePresent, 1, atrA), st(pcsc.StatePresent, 3, atrA)},
			"card inserted R 3B01, card removed R, card inserted R 3B01"},
		{"unchanged state is ignored", []pcsc.ReaderState{{Reader: "R", EventState: pcsc.StatePresent, ATR: atrA}}, ""},
		{"reader going away", []pcsc.ReaderState{st(pcsc.StatePresent, 1, atrA), st(pcsc.StateUnknown|pcsc.StateUnavailable, 1, nil)},
			"card inserted R 3B01"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ch := make(chan Event, 16)
			w := &watcher{o: WatchOptions{Logger: slog.New(slog.DiscardHandler)}, ch: ch, known: map[string]*readerSt{"R": {}}, order: []string{"R"}}
			for _, s := range tc.states {
				w.update(context.Background(), s)
			}
			close(ch)
			var got []string
			for e := range ch {
				s := e.Kind.String() + " " + e.Reader
				if e.ATR != nil {
					s += fmt.Sprintf(" %X", e.ATR)
				}
				got = append(got, s)
			}
			if g := strings.Join(got, ", "); g != tc.want {
				t.Errorf("events %q, want %q", g, tc.want)
			}
		})
	}
}

// TestWatchDropAll: when pcscd goes, each reader's card goes first, then
// the reader, in pcscd's order.
func TestWatchDropAll(t *testing.T) {
	ch := make(chan Event, 16)
	w := &watcher{ch: ch, known: map[string]*readerSt{"A": {present: true}, "B": {}}, order: []string{"A", "B"}}
	if !w.dropAll(context.Background()) {
		t.Fatal("dropAll gave up")
	}
	close(ch)
	var got []string
	for e := range ch {
		got = append(got, e.Kind.String()+" "+e.Reader)
	}
	want := "card removed A, reader removed A, reader removed B"
	if g := strings.Join(got, ", "); g != want {
		t.Errorf("events %q, want %q", g, want)
	}
	if len(w.known) != 0 || len(w.order) != 0 {
		t.Errorf("readers left: %v %v", w.known, w.order)
	}
}
