package ctl

import (
	"bytes"
	"strings"
	"testing"
)

func FuzzReadLine(f *testing.F) {
	f.Add([]byte("status\n"))
	f.Add([]byte("debug info\r\nextra"))
	f.Add([]byte(""))
	f.Add(bytes.Repeat([]byte("x"), MaxLine+1))
	f.Fuzz(func(t *testing.T, b []byte) {
		line, err := readLine(bytes.NewReader(b))
		if err != nil {
			return
		}
		if len(line) > MaxLine || strings.ContainsAny(line, "\n") {
			t.Fatalf("line %q", line)
		}
		if !bytes.HasPrefix(b, []byte(line)) {
			t.Fatalf("line %q is not a prefix of the input", line)
		}
	})
}
