package main

import (
	"fmt"
	"strings"
	"testing"
)

// FuzzReaderAddrs: the small parsers of "vscard reader" never panic, and
// what they accept is well-formed: a VID:PID prints back to the same
// numbers, a bus id fits USB/IP's 32-byte field with its NUL, a --usbip
// address has a host and a port.
func FuzzReaderAddrs(f *testing.F) {
	for _, s := range []string{"08e6:4433", "0x1d6b:0x0104", "1-1", "2-3.1", "127.0.0.1", ":3240", "[::1]:3241", "ffff:ffff", "1:", ":", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if vid, pid, err := parseVIDPID(s); err == nil {
			v2, p2, err := parseVIDPID(fmt.Sprintf("%04x:%04x", vid, pid))
			if err != nil || v2 != vid || p2 != pid {
				t.Fatalf("%q -> %04x:%04x does not parse back: %v", s, vid, pid, err)
			}
		}
		if err := checkBusID(s); err == nil && (len(s) > 31 || strings.ContainsAny(s, "\x00 /")) {
			t.Fatalf("bus id %q accepted", s)
		}
		if a, err := parseUSBIPAddr(s); err == nil {
			if _, err := parseTarget("tcp:" + a); err != nil {
				t.Fatalf("%q -> %q, which does not parse: %v", s, a, err)
			}
		}
	})
}
