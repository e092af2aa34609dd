package apdu

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

func TestParse(t *testing.T) {
	long := bytes.Repeat([]byte{0xAB}, 256)
	tests := []struct {
		name     string
		in       string
		want     Command
		wantData []byte
	}{
		{"case1", "00A40400", Command{CLA: 0, INS: 0xA4, P1: 4, P2: 0, Case: Case1}, nil},
		{"case2S", "00C000000D", Command{INS: 0xC0, Ne: 13, HasLe: true, Case: Case2}, nil},
		{"case2S Le 00 is 256", "00C0000000", Command{INS: 0xC0, Ne: 256, HasLe: true, Case: Case2}, nil},
		{"case3S", "00A4040007A000000116DB00", Command{INS: 0xA4, P1: 4, Case: Case3}, []byte{0xA0, 0, 0, 1, 0x16, 0xDB, 0}},
		{"case4S", "00A4040C07A000000116DB0000", Command{INS: 0xA4, P1: 4, P2: 0x0C, Ne: 256, HasLe: true, Case: Case4}, []byte{0xA0, 0, 0, 1, 0x16, 0xDB, 0}},
		{"case2E", "00CA00000001F4", Command{INS: 0xCA, Ne: 500, HasLe: true, Extended: true, Case: Case2}, nil},
		{"case2E Le 0000 is 65536", "00CA0000000000", Command{INS: 0xCA, Ne: 65536, HasLe: true, Extended: true, Case: Case2}, nil},
		{"case3E", "80420000000003010203", Command{CLA: 0x80, INS: 0x42, Extended: true, Case: Case3}, []byte{1, 2, 3}},
		{"case4E", "804200000000030102030100", Command{CLA: 0x80, INS: 0x42, Ne: 256, HasLe: true, Extended: true, Case: Case4}, []byte{1, 2, 3}},
		{"case4E 256 data", "80420000000100" + hexOf(long) + "0000", Command{CLA: 0x80, INS: 0x42, Ne: 65536, HasLe: true, Extended: true, Case: Case4}, long},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in, err := ParseHex(tt.in)
			if err != nil {
				t.Fatal(err)
			}
			got, err := Parse(in)
			if err != nil {
				t.Fatalf("Parse(%s): %v", tt.in, err)
			}
			if !bytes.Equal(got.Data, tt.wantData) {
				t.Errorf("Data = %X, want %X", got.Data, tt.wantData)
			}
			got.Data = nil
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Parse(%s) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}

func hexOf(b []byte) string {
	const digits = "0123456789ABCDEF"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

// Malformed lengths, after cac.md §2.1: every one must be rejected so the
// card can answer 67 00 without touching its state.
func TestParseMalformed(t *testing.T) {
	for _, in := range []string{
		"", "00", "00A404", // fewer than 4 bytes
		"00A4040007A0",             // short Lc 7, 1 data byte
		"00A4040002A0A1A2A3",       // short Lc 2, too much data
		"00A404000000",             // 6 bytes: extended marker with a truncated length
		"00A40400000000",           // 7 bytes is case 2E... valid, see below
		"00A4040000000001",         // extended Lc 0 is invalid
		"00A404000000020102030405", // extended Lc 2, wrong total
	} {
		b, err := ParseHex(in)
		if err != nil {
			t.Fatal(err)
		}
		_, err = Parse(b)
		if in == "00A40400000000" {
			if err != nil {
				t.Errorf("Parse(%s) = %v, want case 2E", in, err)
			}
			continue
		}
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("Parse(%s) error = %v, want ErrMalformed", in, err)
		}
	}
}

func TestBytesRoundTrip(t *testing.T) {
	for _, in := range []string{
		"00A40400", "00C000000D", "00C0000000", "00A4040007A000000116DB00",
		"00A4040C07A000000116DB0000", "00CA00000001F4", "80420000000003010203",
		"804200000000030102030100",
	} {
		b, _ := ParseHex(in)
		c, err := Parse(b)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Bytes(); !bytes.Equal(got, b) {
			t.Errorf("Bytes(Parse(%s)) = %X", in, got)
		}
	}
}

func TestResponse(t *testing.T) {
	r := Response{Data: []byte{1, 2}, SW: SWOK}
	if got := r.Bytes(); !bytes.Equal(got, []byte{1, 2, 0x90, 0}) {
		t.Errorf("Bytes = %X", got)
	}
	p, err := ParseResponse([]byte{0x61, 0x0D})
	if err != nil || p.SW != 0x610D || len(p.Data) != 0 {
		t.Errorf("ParseResponse = %+v, %v", p, err)
	}
	if _, err := ParseResponse([]byte{0x90}); err == nil {
		t.Error("ParseResponse of 1 byte succeeded")
	}
	for n, want := range map[int]SW{0x0D: 0x610D, 255: 0x61FF, 256: 0x6100, 478: 0x6100} {
		if got := SWBytesRemaining.WithLen(n); got != want {
			t.Errorf("WithLen(%d) = %v, want %v", n, got, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"00A40400", "00C0000000", "00A4040007A000000116DB00", "804200000000030102030100", "00CA0000000000"} {
		b, _ := ParseHex(s)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if len(c.Data) > len(b) || c.Ne < 0 || c.Ne > MaxExtendedNe {
			t.Fatalf("implausible parse %+v of %d bytes", c, len(b))
		}
		// Re-encoding a parsed command and parsing it again is stable.
		c2, err := Parse(c.Bytes())
		if err != nil {
			t.Fatalf("re-parse of %X: %v", c.Bytes(), err)
		}
		if !bytes.Equal(c2.Data, c.Data) || c2.Ne != c.Ne || c2.INS != c.INS {
			t.Fatalf("round trip changed %+v into %+v", c, c2)
		}
	})
}

func BenchmarkParse(b *testing.B) {
	in, _ := ParseHex("00A4040007A000000079010000")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse(in); err != nil {
			b.Fatal(err)
		}
	}
}

func TestRedact(t *testing.T) {
	for _, tt := range []struct {
		in, want string
		n        int
	}{
		{"00200000083132333435363738", "00200000", 9},
		{"00240080103132333435363738FFFFFFFF3132333435363738", "00240080", 21},
		{"002C0080103132333435363738FFFFFFFF3132333435363738", "002C0080", 21},
		{"8020000008FFFFFFFFFFFFFFFF", "80200000", 9},
		{"0020000000", "00200000", 1},
		{"00200000", "00200000", 0},
		{"00A4040007A0000000790100", "00A4040007A0000000790100", 0},
	} {
		in, _ := ParseHex(tt.in)
		got, n := Redact(in)
		if hexOf(got) != tt.want || n != tt.n {
			t.Errorf("Redact(%s) = %X, %d; want %s, %d", tt.in, got, n, tt.want, tt.n)
		}
		if len(got) > 0 && &got[0] == &in[0] {
			t.Errorf("Redact(%s) aliases its input", tt.in)
		}
	}
}
