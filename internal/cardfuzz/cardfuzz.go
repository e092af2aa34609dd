// Package cardfuzz is the APDU-sequence format the card personalities'
// fuzz targets share, so card/cac and card/piv drive their cards, and
// seed their corpora, the same way.
//
// A sequence is records of <len hi><len lo><apdu>; a length of FFFF is a
// power cycle (PowerOff, PowerOn). A short last record is cut to what is
// left.
package cardfuzz

import (
	"context"
	"testing"

	"github.com/vscard/vscard/card"
)

// PowerCycle is the record that stands for a power cycle.
var PowerCycle = []byte{0xFF, 0xFF}

// Append adds one APDU record to seq.
func Append(seq, cmd []byte) []byte {
	seq = append(seq, byte(len(cmd)>>8), byte(len(cmd)))
	return append(seq, cmd...)
}

// Replay runs seq against c. A Transmit error, or a response shorter than
// a status word or longer than maxResponse bytes, fails t: a card must
// answer every command, however malformed, with a bounded response.
func Replay(t testing.TB, c card.Card, seq []byte, maxResponse int) {
	t.Helper()
	ctx := context.Background()
	for len(seq) >= 2 {
		n := int(seq[0])<<8 | int(seq[1])
		seq = seq[2:]
		if n == 0xFFFF {
			c.PowerOff()
			c.PowerOn()
			continue
		}
		n = min(n, len(seq))
		cmd := seq[:n]
		seq = seq[n:]
		out, err := c.Transmit(ctx, cmd)
		if err != nil {
			t.Fatalf("Transmit(%X): %v", cmd, err)
		}
		if len(out) < 2 || len(out) > maxResponse {
			t.Fatalf("Transmit(%X): %d-byte response", cmd, len(out))
		}
	}
}
