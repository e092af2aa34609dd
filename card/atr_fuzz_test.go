package card

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzParseATR: any byte string decodes or fails with one of the ATR
// errors, never panics; a decoded ATR accounts for every byte, and
// Describe works on whatever ParseATR returned, failed or not (the CLI
// prints partial decodes of bad ATRs).
func FuzzParseATR(f *testing.F) {
	for _, tt := range atrCases {
		f.Add(unhex(f, tt.hex))
	}
	f.Add([]byte{0x3B, 0x80, 0x80, 0x80})
	f.Add([]byte{0x3F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := ParseATR(b)
		_ = a.Describe()
		_ = ParseHistorical(b).Format
		if err != nil {
			if !errors.Is(err, ErrATRTruncated) && !errors.Is(err, ErrATRTooLong) &&
				!errors.Is(err, ErrATRConvention) && !errors.Is(err, ErrATRChecksum) {
				t.Fatalf("ParseATR(% X): error %v wraps no ErrATR*", b, err)
			}
			return
		}
		if len(b) > MaxATRLen || !bytes.Equal(a.Raw, b) {
			t.Fatalf("ParseATR(% X) accepted; Raw % X", b, a.Raw)
		}
		n := 2 + len(a.Historical)
		for _, g := range a.Groups {
			for _, has := range []bool{g.HasTA, g.HasTB, g.HasTC, g.HasTD} {
				if has {
					n++
				}
			}
		}
		if a.HasTCK {
			n++
			var x byte
			for _, c := range b[1:] {
				x ^= c
			}
			if x != 0 {
				t.Fatalf("ParseATR(% X) accepted a wrong TCK", b)
			}
		}
		if n != len(b) {
			t.Fatalf("ParseATR(% X): %d bytes accounted for", b, n)
		}
		if len(a.Protocols) == 0 {
			t.Fatalf("ParseATR(% X): no protocol", b)
		}
		if int(a.T0&0x0F) != len(a.Historical) {
			t.Fatalf("ParseATR(% X): K=%d but %d historical bytes", b, a.T0&0x0F, len(a.Historical))
		}
	})
}
