package vicc

import (
	"os"
	"strconv"
	"testing"

	"github.com/vscard/vscard/pcsc"
)

func TestMatchReader(t *testing.T) {
	tests := []struct {
		name, want string
		ok         bool
	}{
		{"Virtual PCD 00 00", "Virtual PCD 00 00", true},
		{"Virtual PCD 00 01", "Virtual PCD 00 00", false},
		{"Virtual PCD 00 00", "Virtual PCD", true},
		{"Virtual PCD 00 00", "", false},
		{"Virtual PCD", "Virtual PCD 00 00", false},
	}
	for _, tt := range tests {
		if got := MatchReader(tt.name, tt.want); got != tt.ok {
			t.Errorf("MatchReader(%q, %q) = %v, want %v", tt.name, tt.want, got, tt.ok)
		}
	}
}

// TestATRFresh: ATR hands out a new slice each time, so a caller that
// scribbles on it cannot change what the next test expects.
func TestATRFresh(t *testing.T) {
	a := ATR()
	a[0] = 0
	if b := ATR(); b[0] != 0x3B || len(b) != 11 {
		t.Fatalf("ATR() = % X after modifying an earlier copy", b)
	}
}

// TestStartStopManual drives a real vicc through a stop/start cycle. It is
// for manual runs only (VSCARD_VICC_PORT names a vpcd slot no other test
// uses): in scripts/test the same cycle runs in test/e2e, which owns the
// vpcd slots of the run; a second user of slot 0 here would race with it.
//
//	VSCARD_VPCD_PORT=43963 scripts/with-pcscd env VSCARD_VICC_PORT=43963 go test -v -run Manual ./internal/vicc/
func TestStartStopManual(t *testing.T) {
	s := os.Getenv("VSCARD_VICC_PORT")
	if s == "" {
		t.Skip("set VSCARD_VICC_PORT to a free vpcd slot's port (inside scripts/with-pcscd) to run vicc here")
	}
	port, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("VSCARD_VICC_PORT=%q: %v", s, err)
	}
	base, _ := strconv.Atoi(os.Getenv("VSCARD_VPCD_PORT"))
	reader := "Virtual PCD 00 0" + strconv.Itoa(port-base)
	p := Start(t, port, reader)
	if !p.Running() || p.Pid() == 0 {
		t.Fatal("vicc not running after Start")
	}
	present := func() bool {
		c, err := pcsc.EstablishContext(t.Context(), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Release()
		infos, err := c.Readers()
		if err != nil {
			t.Fatal(err)
		}
		for _, ri := range infos {
			if MatchReader(ri.Name, reader) {
				return ri.State&pcsc.StatePresent != 0
			}
		}
		t.Fatalf("reader %q missing: %+v", reader, infos)
		return false
	}
	if !present() {
		t.Fatal("no card after Start")
	}
	p.Stop()
	if p.Running() || present() {
		t.Fatal("card still present after Stop")
	}
	p.Start()
	if !present() {
		t.Fatal("no card after the second Start")
	}
}
