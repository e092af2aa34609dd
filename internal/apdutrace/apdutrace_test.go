package apdutrace

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestLine(t *testing.T) {
	type line struct {
		Fields
		Slot int `json:"slot"`
	}
	at := time.Date(2026, 1, 2, 15, 4, 5, 123456789, time.FixedZone("X", 3600))
	for _, tc := range []struct {
		name string
		f    Fields
		want string
	}{
		{"apdu", NewFields(at, []byte{0x00, 0xA4, 0x04, 0x00}, 0, []byte{0x90, 0x00}, 41200*time.Nanosecond, nil),
			`{"time":"2026-01-02T14:04:05.123456789Z","cmd":"00A40400","rsp":"9000","us":41.2,"slot":1}`},
		{"redacted PIN and an error", NewFields(at, []byte{0x00, 0x20, 0x00, 0x00, 0x02, 0, 0}, 2, nil, time.Millisecond, errors.New("card gone")),
			`{"time":"2026-01-02T14:04:05.123456789Z","cmd":"00200000020000","redacted":2,"us":1000,"err":"card gone","slot":1}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			Encoder(&b)(&line{Fields: tc.f, Slot: 1})
			if got := strings.TrimSpace(b.String()); got != tc.want {
				t.Errorf("got  %s\nwant %s", got, tc.want)
			}
		})
	}
}

// TestEncoderSerialises checks that concurrent writers never interleave
// inside a line (several slots share one trace file).
func TestEncoderSerialises(t *testing.T) {
	var b bytes.Buffer
	enc := Encoder(&b)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 50 {
				enc(NewFields(time.Now(), bytes.Repeat([]byte{byte(i)}, 300), 0, []byte{0x90, 0}, 0, nil))
			}
		}()
	}
	wg.Wait()
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 400 {
		t.Fatalf("%d lines, want 400", len(lines))
	}
	for _, l := range lines {
		var f Fields
		if err := json.Unmarshal([]byte(l), &f); err != nil || len(f.Command) != 600 {
			t.Fatalf("broken line %q: %v", l, err)
		}
	}
}
