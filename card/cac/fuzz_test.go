package cac

import (
	"path/filepath"
	"testing"

	"github.com/vscard/vscard/internal/cardfuzz"
	"github.com/vscard/vscard/token"
)

// maxResponse bounds any answer: the largest buffered datum is a 64 KiB
// file chunk or RSA result, and GET RESPONSE returns at most Ne ≤ 65536.
const maxResponse = 65536 + 2

// FuzzTransmit drives a card with a real key through a sequence of APDUs.
// Input: byte 0 picks the mode (bit 0 strict) and power events; then
// records of <len hi><len lo><apdu>, where a length of FFFF is a power
// cycle.
func FuzzTransmit(f *testing.F) {
	creds := loadTestCreds(f)
	// Seeds: every command of the strict transcripts, in order.
	for _, name := range []string{"s1-softdb-nopin.txt", "s3-softdb-nopin.txt", "s6-softdb-nopin.txt", "s8-softdb-pin12345678.txt", "s9-softdb-nopin.txt", "s14-softdb-nopin.txt"} {
		tr := readTranscript(f, filepath.Join("testdata", "vectors", name))
		for _, mode := range []byte{0, 1} {
			seed := []byte{mode}
			for _, s := range tr.Steps {
				if s.Power {
					seed = append(seed, cardfuzz.PowerCycle...)
					continue
				}
				seed = cardfuzz.Append(seed, s.Cmd)
			}
			f.Add(seed)
		}
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		c, err := New(token.NewMemory(creds, token.NewMemoryPIN("12345678", 3)), Options{Strict: in[0]&1 == 1})
		if err != nil {
			t.Fatal(err)
		}
		cardfuzz.Replay(t, c, in[1:], maxResponse)
	})
}
