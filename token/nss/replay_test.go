package nss

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"

	"github.com/vscard/vscard/card/cac"
	"github.com/vscard/vscard/internal/transcript"
)

const testDB = "testdata/libcacard-testdb"

// readVectors parses a transcript of card/cac/testdata/vectors (shared
// reference vectors/README.md format).
func readVectors(t *testing.T, path string) (atr []byte, steps []transcript.Step) {
	t.Helper()
	tr, err := transcript.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return tr.ATR, tr.Steps
}

// TestReplayLibcacard serves libcacard's own test database through this
// package on a strict CAC card and replays the transcripts libcacard
// produced from it: every answer, signatures and decryptions included,
// must be byte-identical (issue 4, "byte-exact signatures").
func TestReplayLibcacard(t *testing.T) {
	files := []string{
		"s1-softdb-nopin.txt",
		"s2-softdb-nopin.txt",
		"s3-softdb-nopin.txt",
		"s6-softdb-nopin.txt", // SIGN
		"s7-softdb-nopin.txt", // DECRYPT
		"s9-softdb-nopin.txt",
		"s10-softdb-nopin.txt",
		"s14-softdb-nopin.txt",
		"s16-softdb-nopin.txt",
		"s4-softdb-nopin.txt",
		"s5-softdb-nopin.txt",
		"s13-softdb-nopin.txt",
		"s17-aca-getacr.txt",
	}
	db, err := Open("sql:"+testDB, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tok, err := db.Token([]string{"cert1", "cert2", "cert3"})
	if err != nil {
		t.Fatal(err)
	}
	if tok.PIN() != nil {
		t.Fatal("libcacard's test database has no password, PIN() must be nil")
	}
	for _, name := range files {
		t.Run(name, func(t *testing.T) {
			atr, steps := readVectors(t, filepath.Join("..", "..", "card", "cac", "testdata", "vectors", name))
			c, err := cac.New(tok, cac.Options{Strict: true})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(c.ATR(), atr) {
				t.Errorf("ATR = %X, transcript %X", c.ATR(), atr)
			}
			ctx := context.Background()
			c.PowerOn()
			crypto := 0
			for _, s := range steps {
				if s.Power {
					c.PowerOff()
					c.PowerOn()
					continue
				}
				got, err := c.Transmit(ctx, s.Cmd)
				if err != nil {
					t.Fatalf("line %d: %X: %v", s.Line, s.Cmd, err)
				}
				if !bytes.Equal(got, s.Reply) {
					t.Errorf("line %d: %X\n got %X\nwant %X", s.Line, s.Cmd, got, s.Reply)
				}
				if len(s.Cmd) > 1 && s.Cmd[1] == 0x42 {
					crypto++
				}
			}
			if len(steps) == 0 {
				t.Fatal("transcript has no commands")
			}
			t.Logf("%d exchanges, %d SIGN/DECRYPT commands", len(steps), crypto)
		})
	}
}
