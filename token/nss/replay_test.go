package nss

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card/cac"
)

const testDB = "testdata/libcacard-testdb"

// xstep is one transcript exchange or a power cycle.
type xstep struct {
	line       int
	power      bool
	cmd, reply []byte
}

// readVectors parses the transcript format of card/cac/testdata/vectors
// (shared reference vectors/README.md): "ATR hex", ">> cmd", "<< reply",
// "-- power cycle", comments.
func readVectors(t *testing.T, path string) (atr []byte, steps []xstep) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		hex := func(s string) []byte {
			b, err := apdu.ParseHex(s)
			if err != nil {
				t.Fatalf("%s:%d: %v", path, n, err)
			}
			return b
		}
		switch {
		case line == "", strings.HasPrefix(line, "#"), strings.HasPrefix(line, "NSSATR "):
		case strings.HasPrefix(line, "ATR "):
			atr = hex(line[4:])
		case line == "-- power cycle":
			steps = append(steps, xstep{line: n, power: true})
		case strings.HasPrefix(line, ">> "):
			steps = append(steps, xstep{line: n, cmd: hex(line[3:])})
		case strings.HasPrefix(line, "<< "):
			if len(steps) == 0 || steps[len(steps)-1].cmd == nil || steps[len(steps)-1].reply != nil {
				t.Fatalf("%s:%d: response without command", path, n)
			}
			steps[len(steps)-1].reply = hex(line[3:])
		default:
			t.Fatalf("%s:%d: unknown line %q", path, n, line)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return atr, steps
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
				if s.power {
					c.PowerOff()
					c.PowerOn()
					continue
				}
				got, err := c.Transmit(ctx, s.cmd)
				if err != nil {
					t.Fatalf("line %d: %X: %v", s.line, s.cmd, err)
				}
				if !bytes.Equal(got, s.reply) {
					t.Errorf("line %d: %X\n got %X\nwant %X", s.line, s.cmd, got, s.reply)
				}
				if len(s.cmd) > 1 && s.cmd[1] == 0x42 {
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
