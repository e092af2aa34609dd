package ctl

import (
	"bytes"
	"strings"
	"testing"
)

// fuzzMax is a small line limit, so the inputs that reach the too-long
// branch stay short and the fuzzer does not spend its time minimising
// 4 KiB inputs.
const fuzzMax = 32

func FuzzReadLine(f *testing.F) {
	f.Add([]byte("status\n"))
	f.Add([]byte("debug info\r\nextra"))
	f.Add([]byte(""))
	f.Add(bytes.Repeat([]byte("x"), fuzzMax+1))
	f.Fuzz(func(t *testing.T, b []byte) {
		line, err := readLine(bytes.NewReader(b), fuzzMax)
		if err != nil {
			return
		}
		if len(line) > fuzzMax || strings.ContainsAny(line, "\n") {
			t.Fatalf("line %q", line)
		}
		if !bytes.HasPrefix(b, []byte(line)) {
			t.Fatalf("line %q is not a prefix of the input", line)
		}
	})
}
