package passthru

import (
	"slices"
	"testing"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card"
)

func TestT0ATR(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
		changed        bool
	}{
		// vicc -t iso7816 (peers.md appendix "running vicc"): TA1, then
		// TD1 and TD2 announcing T=1, TCK.
		{"vicc T=1 only", "3B9513810180 73FF01000B", "3B1513 8073FF0100", true},
		// A T=1 card with TC1 and T=1 bytes (IFSC, BWI/CWI) and TCK.
		{"T=1 with TC1 and IFSC", "3BD518FF8191FE1FC38073C821100A", "3B5518FF 8073C82110", true},
		// libcacard's CAC ATR offers T=0 already: untouched.
		{"CAC T=0", "3B7A18000073667465206364313434", "", false},
		{"T=0 and T=1", "3B8E800180318066B1840C016E0183009000 1C", "", false},
		{"not an ATR", "3B", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := mustHex(t, tc.in)
			out, changed := T0ATR(in)
			if changed != tc.changed {
				t.Fatalf("changed = %v, want %v (out %X)", changed, tc.changed, out)
			}
			if !changed {
				if !slices.Equal(out, in) {
					t.Errorf("unchanged ATR came back as %X", out)
				}
				return
			}
			if want := mustHex(t, tc.want); !slices.Equal(out, want) {
				t.Errorf("T0ATR(%X) = %X, want %X", in, out, want)
			}
			a, err := card.ParseATR(out)
			if err != nil {
				t.Fatalf("rewritten ATR %X does not parse: %v", out, err)
			}
			if !slices.Equal(a.Protocols, []int{0}) {
				t.Errorf("rewritten ATR offers %v, want [0]", a.Protocols)
			}
			orig, _ := card.ParseATR(in)
			if !slices.Equal(a.Historical, orig.Historical) {
				t.Errorf("historical bytes %X, want %X", a.Historical, orig.Historical)
			}
		})
	}
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := apdu.ParseHex(s)
	if err != nil {
		t.Fatalf("hex %q: %v", s, err)
	}
	return b
}
