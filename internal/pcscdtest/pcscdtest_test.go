package pcscdtest

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

func TestFreePortPair(t *testing.T) {
	p, err := FreePortPair()
	if err != nil {
		t.Fatal(err)
	}
	// Both ports can be taken on loopback, as with-pcscd's vpcd will.
	for _, port := range []int{p, p + 1} {
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			t.Fatalf("port %d of the pair %d: %v", port, p, err)
		}
		defer l.Close()
	}
}

func TestModuleRoot(t *testing.T) {
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "scripts", "with-pcscd")); err != nil {
		t.Errorf("root %s has no scripts/with-pcscd: %v", root, err)
	}
}

func TestPrivateOnlyUnderE2E(t *testing.T) {
	t.Setenv("VSCARD_E2E", "")
	if _, ran := Private(); ran {
		t.Error("Private re-ran the binary outside VSCARD_E2E=1")
	}
	t.Setenv("VSCARD_E2E", "1")
	t.Setenv(insideEnv, "1")
	if _, ran := Private(); ran {
		t.Error("Private nested a second pcscd inside its own")
	}
	if !Inside() {
		t.Error("Inside is false next to a private pcscd")
	}
}
