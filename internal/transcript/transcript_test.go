package transcript

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	in := `# a comment
ATR 3B 02 14 50
NSSATR 3B 88
>> 00 A4 04 00 07 A0 00 00 00 79 01 00
<< 90 00

-- power cycle
>> 00 CA 00 00
>> 80 56 01 00 00
<< 61 10
`
	tr, err := Parse(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tr.ATR, []byte{0x3B, 0x02, 0x14, 0x50}) {
		t.Errorf("ATR %X", tr.ATR)
	}
	want := []Step{
		{Line: 4, Cmd: []byte{0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x79, 0x01, 0x00}, Reply: []byte{0x90, 0x00}},
		{Line: 7, Power: true},
		{Line: 8, Cmd: []byte{0x00, 0xCA, 0x00, 0x00}},
		{Line: 9, Cmd: []byte{0x80, 0x56, 0x01, 0x00, 0x00}, Reply: []byte{0x61, 0x10}},
	}
	if len(tr.Steps) != len(want) {
		t.Fatalf("%d steps, want %d: %+v", len(tr.Steps), len(want), tr.Steps)
	}
	for i, s := range tr.Steps {
		w := want[i]
		if s.Line != w.Line || s.Power != w.Power || !bytes.Equal(s.Cmd, w.Cmd) || !bytes.Equal(s.Reply, w.Reply) {
			t.Errorf("step %d = %+v, want %+v", i, s, w)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"<< 90 00\n", "line 1: answer without a command"},
		{"-- power cycle\n<< 90 00\n", "line 2: answer without a command"},
		{">> 00\n<< 90 00\n<< 90 00\n", "line 3: answer without a command"},
		{">> 0G\n", "line 1:"},
		{"ATR xyz\n", "line 1:"},
		{"hello\n", `line 1: unknown line "hello"`},
		{">> " + strings.Repeat("00", maxLine) + "\n", "longer than"},
	} {
		_, err := Parse(strings.NewReader(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%.20q): err = %v, want %q", tc.in, err, tc.want)
		}
	}
}

// TestVectors parses every transcript the card tests replay.
func TestVectors(t *testing.T) {
	var files []string
	for _, g := range []string{"../../card/cac/testdata/vectors/*.txt", "../../card/piv/testdata/*.txt"} {
		m, _ := filepath.Glob(g)
		files = append(files, m...)
	}
	if len(files) == 0 {
		t.Fatal("no transcripts found")
	}
	for _, f := range files {
		tr, err := ReadFile(f)
		if err != nil {
			t.Error(err)
			continue
		}
		if len(tr.Steps) == 0 {
			t.Errorf("%s: no steps", f)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("ATR 3B 00\n>> 00 A4 04 00\n<< 90 00\n-- power cycle\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		tr, err := Parse(bytes.NewReader(in))
		if err != nil {
			return
		}
		for _, s := range tr.Steps {
			if s.Power && (s.Cmd != nil || s.Reply != nil) {
				t.Fatalf("power step with data: %+v", s)
			}
		}
	})
}
