package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/vscard/vscard/card"
)

// TestATRCommand: every spelling of the same ATR prints card.ParseATR's
// decoding; --json carries the same facts.
func TestATRCommand(t *testing.T) {
	raw := []byte{0x3B, 0x95, 0x13, 0x81, 0x01, 0x80, 0x73, 0xFF, 0x01, 0x00, 0x0B}
	a, err := card.ParseATR(raw)
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"3B951381018073FF01000B"},
		{"3B 95 13 81 01 80 73 FF 01 00 0B"},
		strings.Fields("3B 95 13 81 01 80 73 FF 01 00 0B"),
		{"3b:95:13:81:01:80:73:ff:01:00:0b"},
	} {
		code, stdout, stderr := runCLI(t, "", append([]string{"atr"}, args...)...)
		if code != 0 || stdout != a.Describe() {
			t.Errorf("vscard atr %q: exit %d\n%s%s", args, code, stdout, stderr)
		}
	}

	code, stdout, stderr := runCLI(t, "", "atr", "--json", "3B FD 13 00 00 81 31 FE 15 80 73 C0 21 C0 57 59 75 62 69 4B 65 79 40")
	if code != 0 {
		t.Fatalf("--json: exit %d: %s", code, stderr)
	}
	var j struct {
		ATR        string `json:"atr"`
		Protocols  []int  `json:"protocols"`
		TCK        string `json:"tck"`
		T1         *struct{ IFSC, BWI, CWI int }
		Historical struct {
			Category string `json:"category"`
			Objects  []struct {
				Tag   int    `json:"tag"`
				Value string `json:"value"`
			} `json:"objects"`
		} `json:"historical"`
		Interface []struct {
			I  int    `json:"i"`
			T  *int   `json:"t"`
			TA string `json:"ta"`
		} `json:"interface"`
	}
	if err := json.Unmarshal([]byte(stdout), &j); err != nil {
		t.Fatalf("--json output: %v\n%s", err, stdout)
	}
	if j.ATR != "3BFD1300008131FE158073C021C057597562694B657940" || j.TCK != "40" ||
		len(j.Protocols) != 1 || j.Protocols[0] != 1 || j.T1 == nil || j.T1.IFSC != 254 || j.T1.BWI != 1 || j.T1.CWI != 5 {
		t.Errorf("--json: %s", stdout)
	}
	if j.Historical.Category != "80" || len(j.Historical.Objects) != 2 || j.Historical.Objects[1].Value != "597562694B6579" {
		t.Errorf("--json historical: %+v", j.Historical)
	}
	if len(j.Interface) != 3 || j.Interface[0].T != nil || j.Interface[2].T == nil || *j.Interface[2].T != 1 || j.Interface[2].TA != "FE" {
		t.Errorf("--json interface: %+v", j.Interface)
	}
}

func TestATRCommandErrors(t *testing.T) {
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"atr"}, exitUsage, "no ATR given"},
		{[]string{"atr", "3B", "9"}, exitUsage, "not hex"},
		{[]string{"atr", "zz"}, exitUsage, "not hex"},
		{[]string{"atr", "--verbose", "3B00"}, exitUsage, "verbose"},
		{[]string{"atr", "3B 95 13 81 01 80 73 FF 01 00 0C"}, exitError, "TCK is 0C, want 0B"},
		{[]string{"atr", "3B 95 13 81 01 80 73 FF 01 00"}, exitError, "TCK missing"},
		{[]string{"atr", "3C 00"}, exitError, "TS is 3C"},
		{[]string{"atr", "3B 0F 00"}, exitError, "15 historical bytes, only 1"},
		{[]string{"atr", "3B" + strings.Repeat("00", 33)}, exitError, "at most 33"},
	}
	for _, tt := range tests {
		code, stdout, stderr := runCLI(t, "", tt.args...)
		if code != tt.code || !strings.Contains(stderr, tt.msg) {
			t.Errorf("vscard %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tt.args, " "), code, stderr, tt.code, tt.msg)
		}
		if stdout != "" {
			t.Errorf("vscard %s printed %q on stdout", strings.Join(tt.args, " "), stdout)
		}
	}
}
