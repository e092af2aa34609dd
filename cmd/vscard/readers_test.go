package main

import (
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vscard/vscard/pcsc"
)

func TestCardState(t *testing.T) {
	tests := []struct {
		s    pcsc.State
		want string
	}{
		{pcsc.StateEmpty, "empty"},
		{pcsc.StatePresent, "present"},
		{pcsc.StatePresent | pcsc.StateUnpowered, "present"},
		{pcsc.StatePresent | pcsc.StateInUse, "in use"},
		{pcsc.StatePresent | pcsc.StateExclusive, "exclusive"},
		{pcsc.StatePresent | pcsc.StateMute, "mute"},
		{pcsc.StateUnavailable, "unavailable"},
		{pcsc.StateUnknown | pcsc.StateUnavailable, "unavailable"},
		{pcsc.StateUnaware, "unknown"},
	}
	for _, tt := range tests {
		if got := cardState(tt.s); got != tt.want {
			t.Errorf("cardState(%v) = %q, want %q", tt.s, got, tt.want)
		}
	}
}

func TestDiffReaders(t *testing.T) {
	atrA := []byte{0x3B, 0x95, 0x13, 0x81, 0x01, 0x80, 0x73, 0xFF, 0x01, 0x00, 0x0B}
	atrB := []byte{0x3B, 0x7A, 0x18, 0x00, 0x00, 0x73, 0x66, 0x74, 0x65, 0x20, 0x63, 0x64, 0x31, 0x34, 0x34}
	empty := func(n string) pcsc.ReaderInfo { return pcsc.ReaderInfo{Name: n, State: pcsc.StateEmpty} }
	card := func(n string, atr []byte, ctr uint32) pcsc.ReaderInfo {
		return pcsc.ReaderInfo{Name: n, State: pcsc.StatePresent, ATR: atr, EventCounter: ctr}
	}
	tests := []struct {
		name      string
		prev, cur []pcsc.ReaderInfo
		want      []string // event:reader[:atr-first-byte-count]
	}{
		{"nothing", []pcsc.ReaderInfo{empty("A")}, []pcsc.ReaderInfo{empty("A")}, nil},
		{"inserted", []pcsc.ReaderInfo{empty("A")}, []pcsc.ReaderInfo{card("A", atrA, 1)}, []string{"card_inserted:A:11"}},
		{"removed", []pcsc.ReaderInfo{card("A", atrA, 1)}, []pcsc.ReaderInfo{empty("A")}, []string{"card_removed:A"}},
		{"swapped unseen", []pcsc.ReaderInfo{card("A", atrA, 1)}, []pcsc.ReaderInfo{card("A", atrA, 3)},
			[]string{"card_removed:A", "card_inserted:A:11"}},
		{"other card", []pcsc.ReaderInfo{card("A", atrA, 1)}, []pcsc.ReaderInfo{card("A", atrB, 1)},
			[]string{"card_removed:A", "card_inserted:A:15"}},
		{"reader plugged with card", []pcsc.ReaderInfo{empty("A")}, []pcsc.ReaderInfo{empty("A"), card("B", atrB, 0)},
			[]string{"reader_added:B", "card_inserted:B:15"}},
		{"reader unplugged with card", []pcsc.ReaderInfo{card("A", atrA, 1), empty("B")}, []pcsc.ReaderInfo{empty("B")},
			[]string{"card_removed:A", "reader_removed:A"}},
		{"in use", []pcsc.ReaderInfo{card("A", atrA, 1)},
			[]pcsc.ReaderInfo{{Name: "A", State: pcsc.StatePresent | pcsc.StateInUse, ATR: atrA, EventCounter: 1}},
			[]string{"state:A"}},
	}
	for _, tt := range tests {
		var got []string
		for _, e := range diffReaders(tt.prev, tt.cur) {
			s := e.Event + ":" + e.Reader
			if len(e.ATR) > 0 {
				s += ":" + strconv.Itoa(len(e.ATR))
			}
			got = append(got, s)
		}
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: events %q, want %q", tt.name, got, tt.want)
		}
	}
}

func TestPrintReaders(t *testing.T) {
	var b strings.Builder
	printReaders(&b, []pcsc.ReaderInfo{
		{Name: "Virtual PCD 00 00", State: pcsc.StatePresent, ATR: []byte{0x3B, 0x00}},
		{Name: "Virtual PCD 00 01", State: pcsc.StateEmpty, ATR: []byte{0x3B, 0x01}}, // stale ATR not shown
	})
	want := "#  Card     Reader             ATR\n" +
		"0  present  Virtual PCD 00 00  3B 00\n" +
		"1  empty    Virtual PCD 00 01  \n"
	if b.String() != want {
		t.Errorf("got\n%q\nwant\n%q", b.String(), want)
	}
	b.Reset()
	printReaders(&b, nil)
	if !strings.Contains(b.String(), "No PC/SC readers") {
		t.Errorf("no readers: %q", b.String())
	}
}

func TestFormatEvent(t *testing.T) {
	ts := time.Date(2026, 11, 27, 3, 4, 5, 6e6, time.Local).UTC().Format(time.RFC3339Nano)
	tests := []struct {
		e    event
		want string
	}{
		{event{Time: ts, Event: "card_inserted", Reader: "R", ATR: []byte{0x3B, 0x00}}, "03:04:05.006  R: card inserted, ATR 3B 00"},
		{event{Time: ts, Event: "card_removed", Reader: "R"}, "03:04:05.006  R: card removed"},
		{event{Time: ts, Event: "reader_added", Reader: "R", State: "empty"}, "03:04:05.006  R: reader added (empty)"},
		{event{Time: ts, Event: "reader_removed", Reader: "R"}, "03:04:05.006  R: reader removed"},
		{event{Time: ts, Event: "state", Reader: "R", Detail: "present -> in use"}, "03:04:05.006  R: card present -> in use"},
		{event{Time: ts, Event: "pcscd_lost", Detail: "EOF"}, "03:04:05.006  pcscd lost (EOF); reconnecting"},
	}
	for _, tt := range tests {
		if got := formatEvent(tt.e); got != tt.want {
			t.Errorf("formatEvent(%+v) = %q, want %q", tt.e, got, tt.want)
		}
	}
}
