package piv

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/transcript"
)

// seqReader yields n, n+1, n+2 ... (mod 256): a predictable random source
// so that transcripts of management-key authentication are fixed.
type seqReader struct{ n byte }

func (r *seqReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = r.n
		r.n++
	}
	return len(p), nil
}

var defaultMgmKey = []byte{1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8}

// newTestCard is the card of testdata/README.md.
func newTestCard(t testing.TB) (*Card, *MemoryStore) {
	t.Helper()
	st := NewMemoryStore("123456", "12345678", AlgTDES, defaultMgmKey)
	err := Personalize(st, Personalization{
		Expiry: time.Date(2036, 1, 2, 0, 0, 0, 0, time.UTC),
		Rand:   &seqReader{n: 100},
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(st, Options{Rand: &seqReader{}})
	if err != nil {
		t.Fatal(err)
	}
	return c, st
}

func readTranscript(t testing.TB, path string) []transcript.Step {
	t.Helper()
	tr, err := transcript.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return tr.Steps
}

// TestTranscripts replays every testdata transcript against a fresh card.
func TestTranscripts(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.txt"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no transcripts: %v", err)
	}
	for _, path := range files {
		t.Run(filepath.Base(path), func(t *testing.T) {
			c, _ := newTestCard(t)
			ctx := context.Background()
			for _, s := range readTranscript(t, path) {
				if s.Power {
					c.PowerOff()
					c.PowerOn()
					continue
				}
				if s.Reply == nil {
					t.Fatalf("line %d: command without expected answer", s.Line)
				}
				got, err := c.Transmit(ctx, s.Cmd)
				if err != nil {
					t.Fatalf("line %d: %X: %v", s.Line, s.Cmd, err)
				}
				if !bytes.Equal(got, s.Reply) {
					t.Fatalf("line %d: %X\n got %X\nwant %X", s.Line, s.Cmd, got, s.Reply)
				}
			}
		})
	}
}
