package card

import (
	"bytes"
	"encoding/hex"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

var updateGolden = flag.Bool("update", false, "rewrite card/testdata/atr/*.txt from the current Describe output")

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatalf("bad hex in test table %q: %v", s, err)
	}
	return b
}

// atrCases are the ATRs whose decoding is pinned both by fields and by a
// golden Describe() text in testdata/atr/NAME.txt.
var atrCases = []struct {
	name      string
	hex       string
	protocols []int
	hasTCK    bool
	hist      string // historical bytes, hex
	format    HistoricalFormat
	check     func(t *testing.T, a ATR)
}{
	{
		// cac.md §1.1: libcacard's CAC ATR. TA1 TB1 TC1, no TD1 → T=0
		// only and no TCK; "sfte cd144" is not compact-TLV.
		name: "cac", hex: "3B 7A 18 00 00 73 66 74 65 20 63 64 31 34 34",
		protocols: []int{0}, hist: "73 66 74 65 20 63 64 31 34 34", format: HistProprietary,
		check: func(t *testing.T, a ATR) {
			want(t, "Fi", a.Fi, 372)
			want(t, "Di", a.Di, 12)
			want(t, "N", a.N, 0)
			want(t, "HasTA1", a.HasTA1, true)
		},
	},
	{
		// cac.md §1.1: the NSS fallback ATR "VCARD_NSS": TD1=00 names T=0,
		// so still no TCK.
		name: "nss", hex: "3B 89 00 56 43 41 52 44 5F 4E 53 53",
		protocols: []int{0}, hist: "56 43 41 52 44 5F 4E 53 53", format: HistProprietary,
		check: func(t *testing.T, a ATR) {
			want(t, "HasTA1", a.HasTA1, false)
			want(t, "Fi (default)", a.Fi, 372)
			want(t, "Di (default)", a.Di, 1)
		},
	},
	{
		// peers.md appendix "running vicc": vicc -t iso7816. T=1 twice
		// (TD1, TD2), so a TCK; category 80 with card capabilities.
		name: "vicc", hex: "3B 95 13 81 01 80 73 FF 01 00 0B",
		protocols: []int{1}, hasTCK: true, hist: "80 73 FF 01 00", format: HistCompactTLV80,
		check: func(t *testing.T, a ATR) {
			want(t, "Di", a.Di, 4)
			want(t, "TCK", a.TCK, byte(0x0B))
			want(t, "IFSC (default)", a.IFSC, 32)
			hb := ParseHistorical(a.Historical)
			if len(hb.Objects) != 1 || hb.Objects[0].Tag != 7 || !bytes.Equal(hb.Objects[0].Value, []byte{0xFF, 0x01, 0x00}) {
				t.Errorf("objects = %+v, want one tag 7 FF 01 00", hb.Objects)
			}
		},
	},
	{
		// A YubiKey 5-like T=1 ATR: IFSC 254, BWI 1, CWI 5, TCK.
		name: "yubikey", hex: "3B FD 13 00 00 81 31 FE 15 80 73 C0 21 C0 57 59 75 62 69 4B 65 79 40",
		protocols: []int{1}, hasTCK: true, hist: "80 73 C0 21 C0 57 59 75 62 69 4B 65 79", format: HistCompactTLV80,
		check: func(t *testing.T, a ATR) {
			want(t, "IFSC", a.IFSC, 254)
			want(t, "BWI", a.BWI, 1)
			want(t, "CWI", a.CWI, 5)
			want(t, "HasEDC", a.HasEDC, false)
			hb := ParseHistorical(a.Historical)
			if len(hb.Objects) != 2 || hb.Objects[1].Tag != 5 || string(hb.Objects[1].Value) != "YubiKey" {
				t.Errorf("objects = %+v, want card capabilities then issuer data \"YubiKey\"", hb.Objects)
			}
		},
	},
	{
		// T=1 with TC1=FF, TC3 asking for CRC, and category 00 (compact-TLV
		// then a 3-byte status indicator).
		name: "t1-crc-cat00", hex: "3B F9 13 00 FF 81 71 20 45 01 00 31 C0 62 00 00 00 90 00 82",
		protocols: []int{1}, hasTCK: true, hist: "00 31 C0 62 00 00 00 90 00", format: HistCompactTLV,
		check: func(t *testing.T, a ATR) {
			want(t, "N", a.N, 255)
			want(t, "IFSC", a.IFSC, 0x20)
			want(t, "BWI", a.BWI, 4)
			want(t, "CWI", a.CWI, 5)
			want(t, "EDCIsCRC", a.EDCIsCRC, true)
			hb := ParseHistorical(a.Historical)
			want(t, "status", hex.EncodeToString(hb.Status), "009000")
			if len(hb.Objects) != 2 || hb.Objects[0].Tag != 3 || hb.Objects[1].Tag != 6 {
				t.Errorf("objects = %+v, want tags 3 and 6", hb.Objects)
			}
		},
	},
	{
		// T=15 global bytes (clock stop, classes A and B) and a DIR
		// reference (category 10). T=15 makes TCK mandatory.
		name: "t15-dirref", hex: "3B D2 96 FF 81 1F C3 10 42 B4",
		protocols: []int{1}, hasTCK: true, hist: "10 42", format: HistDIRRef,
		check: func(t *testing.T, a ATR) {
			want(t, "Fi", a.Fi, 512)
			want(t, "Di", a.Di, 32)
			want(t, "ClockStop", a.ClockStop, ClockStopNoPreference)
			want(t, "Classes", a.Classes, byte(3))
			want(t, "DIRRef", ParseHistorical(a.Historical).DIRRef, byte(0x42))
		},
	},
	{
		// Inverse convention (TS=3F) as a reader reports it, TB1 VPP.
		name: "inverse", hex: "3F 65 25 00 2C 09 69 90 00",
		protocols: []int{0}, hist: "2C 09 69 90 00", format: HistProprietary,
		check: func(t *testing.T, a ATR) {
			want(t, "Convention", a.Convention, Inverse)
		},
	},
	{
		// TA2 (specific mode T=1, Fi/Di implicit) and TC2 (WI for T=0).
		name: "specific-mode", hex: "3B 80 F1 91 00 FF 01 1E",
		protocols: []int{1}, hasTCK: true, format: HistNone,
		check: func(t *testing.T, a ATR) {
			want(t, "SpecificMode", a.SpecificMode, true)
			want(t, "ModeProtocol", a.ModeProtocol, 1)
			want(t, "CanChangeMode", a.CanChangeMode, false)
			want(t, "ImplicitFD", a.ImplicitFD, true)
			want(t, "WI", a.WI, 0xFF)
		},
	},
}

func want[T comparable](t *testing.T, what string, got, want T) {
	t.Helper()
	if got != want {
		t.Errorf("%s = %v, want %v", what, got, want)
	}
}

func TestParseATR(t *testing.T) {
	for _, tt := range atrCases {
		t.Run(tt.name, func(t *testing.T) {
			raw := unhex(t, tt.hex)
			a, err := ParseATR(raw)
			if err != nil {
				t.Fatalf("ParseATR(%s): %v", tt.hex, err)
			}
			if !bytes.Equal(a.Raw, raw) {
				t.Errorf("Raw = % X", a.Raw)
			}
			if !reflect.DeepEqual(a.Protocols, tt.protocols) {
				t.Errorf("Protocols = %v, want %v", a.Protocols, tt.protocols)
			}
			want(t, "HasTCK", a.HasTCK, tt.hasTCK)
			if !bytes.Equal(a.Historical, unhex(t, tt.hist)) {
				t.Errorf("Historical = % X, want %s", a.Historical, tt.hist)
			}
			want(t, "format", ParseHistorical(a.Historical).Format, tt.format)
			if tt.check != nil {
				tt.check(t, a)
			}
			// Every interface byte is accounted for: TS, T0, the groups'
			// bytes, K historical bytes and TCK add up to the length.
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
			}
			want(t, "byte count", n, len(raw))

			golden := filepath.Join("testdata", "atr", tt.name+".txt")
			got := a.Describe()
			if *updateGolden {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			wantText, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./card -run TestParseATR -update to create it)", err)
			}
			if got != string(wantText) {
				t.Errorf("Describe() differs from %s:\n--- got\n%s--- want\n%s", golden, got, wantText)
			}
		})
	}
}

func TestParseATRErrors(t *testing.T) {
	tests := []struct {
		name string
		hex  string
		err  error
		msg  string // a fragment of the error text
	}{
		{"empty", "", ErrATRTruncated, "need TS and T0"},
		{"TS only", "3B", ErrATRTruncated, "need TS and T0"},
		{"bad TS", "3C 00", ErrATRConvention, "TS is 3C"},
		{"inverse not decoded", "03 00", ErrATRConvention, "TS is 03"},
		{"TA1 missing", "3B 10", ErrATRTruncated, "TA1 announced"},
		{"TD2 missing", "3B 80 81", ErrATRTruncated, "TD2 announced"},
		{"TC3 missing", "3B 80 81 71 20 45", ErrATRTruncated, "TC3 announced"},
		{"historical short", "3B 7A 18 00 00 73 66", ErrATRTruncated, "10 historical bytes, only 2"},
		{"TCK missing", "3B 95 13 81 01 80 73 FF 01 00", ErrATRTruncated, "TCK missing"},
		{"TCK wrong", "3B 95 13 81 01 80 73 FF 01 00 0C", ErrATRChecksum, "TCK is 0C, want 0B"},
		{"trailing byte T=0", "3B 7A 18 00 00 73 66 74 65 20 63 64 31 34 34 00", ErrATRTooLong, "1 bytes after"},
		{"trailing byte T=1", "3B 95 13 81 01 80 73 FF 01 00 0B 0B", ErrATRTooLong, "1 bytes after"},
		{"34 bytes", "3B 0F" + strings.Repeat(" 00", 32), ErrATRTooLong, "at most 33"},
		// 33 bytes but the bytes it announces do not fit: the loop of TDs
		// runs off the end.
		{"TD chain off the end", "3B 80" + strings.Repeat(" 80", 31), ErrATRTruncated, "TD32 announced"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseATR(unhex(t, tt.hex))
			if !errors.Is(err, tt.err) {
				t.Fatalf("ParseATR(%s) = %v, want %v", tt.hex, err, tt.err)
			}
			if !strings.Contains(err.Error(), tt.msg) || !strings.HasPrefix(err.Error(), "card: ATR: ") {
				t.Errorf("error %q lacks %q", err, tt.msg)
			}
		})
	}
}

// TestParseATRMax: a legal 33-byte ATR (T=0 only, 15 historical bytes
// plus 16 interface bytes would overflow, so: T0 with 15 historical bytes
// and TD chain) decodes.
func TestParseATRMax(t *testing.T) {
	// TS T0(Y1=TD1,K=15) TD1..TD15 (each 80 = TD follows, T=0) TD16=00 → 2+16+15 = 33.
	b := []byte{0x3B, 0x8F}
	for i := 0; i < 15; i++ {
		b = append(b, 0x80)
	}
	b = append(b, 0x00)
	b = append(b, bytes.Repeat([]byte{'A'}, 15)...)
	if len(b) != MaxATRLen {
		t.Fatalf("test ATR is %d bytes", len(b))
	}
	a, err := ParseATR(b)
	if err != nil {
		t.Fatal(err)
	}
	want(t, "groups", len(a.Groups), 16)
	want(t, "HasTCK", a.HasTCK, false)
	if !reflect.DeepEqual(a.Protocols, []int{0}) {
		t.Errorf("Protocols = %v", a.Protocols)
	}
}

func TestParseATRDoesNotKeepInput(t *testing.T) {
	b := unhex(t, "3B 95 13 81 01 80 73 FF 01 00 0B")
	a, err := ParseATR(b)
	if err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] = 0
	}
	if a.Raw[0] != 0x3B || a.Historical[0] != 0x80 {
		t.Fatalf("ATR aliases its input: % X / % X", a.Raw, a.Historical)
	}
}

func TestParseHistorical(t *testing.T) {
	tests := []struct {
		hex    string
		format HistoricalFormat
		tags   []byte
		status string
		err    string
	}{
		{"", HistNone, nil, "", ""},
		{"80", HistCompactTLV80, nil, "", ""},
		{"80 31 C0 82 90 00", HistCompactTLV80, []byte{3, 8}, "9000", ""},
		{"80 73 FF", HistCompactTLV80, nil, "", "announces 3 bytes, 1 left"},
		{"00 90 00", HistCompactTLV, nil, "", "3-byte status indicator"},
		{"00 05 90 00", HistCompactTLV, nil, "059000", ""},
		{"00 31 C0 05 90 00", HistCompactTLV, []byte{3}, "059000", ""},
		{"10 01", HistDIRRef, nil, "", ""},
		{"10 01 02", HistDIRRef, nil, "", "one DIR reference byte"},
		{"85 00", HistRFU, nil, "", ""},
		{"4A 43 4F 50", HistProprietary, nil, "", ""},
	}
	for _, tt := range tests {
		hb := ParseHistorical(unhex(t, tt.hex))
		if hb.Format != tt.format {
			t.Errorf("%s: format %v, want %v", tt.hex, hb.Format, tt.format)
		}
		var tags []byte
		for _, o := range hb.Objects {
			tags = append(tags, o.Tag)
		}
		if !bytes.Equal(tags, tt.tags) {
			t.Errorf("%s: tags %v, want %v", tt.hex, tags, tt.tags)
		}
		if got := hex.EncodeToString(hb.Status); got != tt.status {
			t.Errorf("%s: status %s, want %s", tt.hex, got, tt.status)
		}
		switch {
		case tt.err == "" && hb.Err != nil:
			t.Errorf("%s: unexpected error %v", tt.hex, hb.Err)
		case tt.err != "" && (hb.Err == nil || !strings.Contains(hb.Err.Error(), tt.err)):
			t.Errorf("%s: error %v, want one containing %q", tt.hex, hb.Err, tt.err)
		}
	}
}
