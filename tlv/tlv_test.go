package tlv

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"
)

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Vectors from libcacard's tests/simpletlv.c as recorded in cac.md §5.1.
func TestSimpleEncode(t *testing.T) {
	v256 := bytes.Repeat([]byte{0x42}, 256)
	tests := []struct {
		name  string
		elems []Simple
		want  string
		wantT string
		wantV string
	}{
		{"short", []Simple{{0x25, []byte{0x10, 0x11}}}, "25021011", "2502", "1011"},
		{"empty value", []Simple{{0x72, nil}}, "7200", "7200", ""},
		{"254 is short", []Simple{{0x01, make([]byte, 254)}}, "01FE" + hex.EncodeToString(make([]byte, 254)), "01FE", hex.EncodeToString(make([]byte, 254))},
		{"255 is long", []Simple{{0x01, make([]byte, 255)}}, "01FFFF00" + hex.EncodeToString(make([]byte, 255)), "01FFFF00", hex.EncodeToString(make([]byte, 255))},
		{"256 little-endian", []Simple{{0x25, v256}}, "25FF0001" + hex.EncodeToString(v256), "25FF0001", hex.EncodeToString(v256)},
		{"two", []Simple{{0x71, []byte{0}}, {0x72, nil}}, "7101007200", "71017200", "00"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := EncodeSimple(tt.elems...)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, mustHex(t, tt.want)) {
				t.Errorf("EncodeSimple = %X, want %s", got, tt.want)
			}
			tb, vb, err := SplitSimple(tt.elems...)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(tb, mustHex(t, tt.wantT)) || !bytes.Equal(vb, mustHex(t, tt.wantV)) {
				t.Errorf("SplitSimple = %X / %X, want %s / %s", tb, vb, tt.wantT, tt.wantV)
			}
			back, err := ParseSimple(got)
			if err != nil || len(back) != len(tt.elems) {
				t.Fatalf("ParseSimple = %v, %v", back, err)
			}
			joined, err := JoinSimple(tb, vb)
			if err != nil || len(joined) != len(tt.elems) {
				t.Fatalf("JoinSimple = %v, %v", joined, err)
			}
			for i := range back {
				if back[i].Tag != tt.elems[i].Tag || !bytes.Equal(back[i].Value, tt.elems[i].Value) || !bytes.Equal(joined[i].Value, tt.elems[i].Value) {
					t.Errorf("element %d round trip mismatch", i)
				}
			}
		})
	}
}

func TestSimpleErrors(t *testing.T) {
	if _, err := AppendSimple(nil, 0x00, nil); err == nil {
		t.Error("tag 00 accepted")
	}
	if _, err := AppendSimple(nil, 0xFF, nil); err == nil {
		t.Error("tag FF accepted")
	}
	if _, err := AppendSimpleHeader(nil, 0x01, 0xFFFF); err == nil {
		t.Error("length 65535 accepted")
	}
	for _, in := range []string{"01", "0105AA", "01FF01", "00021234", "FF00"} {
		if _, err := ParseSimple(mustHex(t, in)); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseSimple(%s) = %v, want ErrMalformed", in, err)
		}
	}
	// cac.md §5.1: "13 02 14 18 DD 03 64 24 44" parses into two members.
	got, err := ParseSimple(mustHex(t, "13021418DD03642444"))
	if err != nil || len(got) != 2 || got[1].Tag != 0xDD {
		t.Errorf("ParseSimple = %v, %v", got, err)
	}
	if _, err := JoinSimple(mustHex(t, "7102"), mustHex(t, "00")); err == nil {
		t.Error("JoinSimple accepted a short V-buffer")
	}
	if _, err := JoinSimple(mustHex(t, "7101"), mustHex(t, "0000")); err == nil {
		t.Error("JoinSimple accepted left-over V bytes")
	}
}

func TestBER(t *testing.T) {
	tests := []struct {
		tag  uint32
		val  []byte
		want string
	}{
		{0x53, []byte{1}, "530101"},
		{0x5FC105, []byte{}, "5FC10500"},
		{0x7F49, bytes.Repeat([]byte{0}, 0x80), "7F498180" + hex.EncodeToString(make([]byte, 0x80))},
		{0x70, make([]byte, 0x100), "70820100" + hex.EncodeToString(make([]byte, 0x100))},
	}
	for _, tt := range tests {
		got := AppendBER(nil, tt.tag, tt.val)
		if !bytes.Equal(got, mustHex(t, tt.want)) {
			t.Errorf("AppendBER(%X) = %X, want %s", tt.tag, got, tt.want)
		}
		e, rest, err := ReadBER(got)
		if err != nil || len(rest) != 0 || e.Tag != tt.tag || !bytes.Equal(e.Value, tt.val) {
			t.Errorf("ReadBER(%X) = %+v, %X, %v", got, e, rest, err)
		}
	}
	nested := EncodeBER(BER{0x7C, EncodeBER(BER{0x82, nil}, BER{0x81, []byte{9, 9}})})
	outer, err := ParseBER(nested)
	if err != nil || len(outer) != 1 || !outer[0].Constructed() {
		t.Fatalf("ParseBER = %v, %v", outer, err)
	}
	if v, ok := FindBER(outer[0].Value, 0x81); !ok || !bytes.Equal(v, []byte{9, 9}) {
		t.Errorf("FindBER = %X, %v", v, ok)
	}
	for _, in := range []string{"", "5F", "5FC1", "5FC105", "538001", "5385000000000001", "530201", "5F818181810100", "5382FF"} {
		if _, err := ParseBER(mustHex(t, in)); in != "" && !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseBER(%s) = %v, want ErrMalformed", in, err)
		}
	}
}

func FuzzSimple(f *testing.F) {
	f.Add(mustHex(f, "13021418DD03642444"))
	f.Add(mustHex(f, "25FF0001"))
	f.Fuzz(func(t *testing.T, b []byte) {
		elems, err := ParseSimple(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		// Whatever parses re-encodes to a form that parses to the same values.
		enc, err := EncodeSimple(elems...)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		again, err := ParseSimple(enc)
		if err != nil || len(again) != len(elems) {
			t.Fatalf("re-parse: %v", err)
		}
		tb, vb, _ := SplitSimple(elems...)
		if _, err := JoinSimple(tb, vb); err != nil {
			t.Fatalf("split/join: %v", err)
		}
	})
}

func FuzzBER(f *testing.F) {
	f.Add([]byte{})
	f.Add(EncodeBER(BER{0x7C, EncodeBER(BER{0x82, nil}, BER{0x81, []byte{9, 9}})}))
	f.Add(mustHex(f, "5FC10500"))
	f.Fuzz(func(t *testing.T, b []byte) {
		elems, err := ParseBER(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		total := 0
		for _, e := range elems {
			total += len(e.Value)
			if e.Constructed() {
				_, _ = ParseBER(e.Value) // must not panic either
			}
		}
		if total > len(b) {
			t.Fatalf("values total %d bytes from %d input bytes", total, len(b))
		}
	})
}
