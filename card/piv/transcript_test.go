package piv

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vscard/vscard/apdu"
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

type step struct {
	line  int
	power bool
	cmd   []byte
	want  []byte
}

func readTranscript(t testing.TB, path string) []step {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var steps []step
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		hexOf := func(s string) []byte {
			b, err := apdu.ParseHex(s)
			if err != nil {
				t.Fatalf("%s:%d: %v", path, n, err)
			}
			return b
		}
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case line == "-- power cycle":
			steps = append(steps, step{line: n, power: true})
		case strings.HasPrefix(line, ">> "):
			steps = append(steps, step{line: n, cmd: hexOf(line[3:])})
		case strings.HasPrefix(line, "<< "):
			if len(steps) == 0 || steps[len(steps)-1].cmd == nil || steps[len(steps)-1].want != nil {
				t.Fatalf("%s:%d: answer without command", path, n)
			}
			steps[len(steps)-1].want = hexOf(line[3:])
		default:
			t.Fatalf("%s:%d: unknown line %q", path, n, line)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return steps
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
				if s.power {
					c.PowerOff()
					c.PowerOn()
					continue
				}
				if s.want == nil {
					t.Fatalf("line %d: command without expected answer", s.line)
				}
				got, err := c.Transmit(ctx, s.cmd)
				if err != nil {
					t.Fatalf("line %d: %X: %v", s.line, s.cmd, err)
				}
				if !bytes.Equal(got, s.want) {
					t.Fatalf("line %d: %X\n got %X\nwant %X", s.line, s.cmd, got, s.want)
				}
			}
		})
	}
}
