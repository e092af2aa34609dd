// Package pcscdtest gives a test binary a pcscd of its own.
//
// scripts/test runs the tests of every package inside one
// scripts/with-pcscd, so they share one pcscd and the two slots of its
// vpcd, and go test runs packages side by side. A package whose tests put
// cards into those slots, or restart pcscd, would meet the cards of
// another package doing the same. Private re-runs such a test binary
// inside a nested scripts/with-pcscd, with its own mount namespace, pcscd
// and a free pair of vpcd ports (VSCARD_VPCD_PORT).
package pcscdtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
)

// insideEnv marks a test binary already running next to a pcscd of its
// own, so the nested run does not nest again.
const insideEnv = "VSCARD_PRIVATE_PCSCD"

// Private re-runs the test binary inside a nested scripts/with-pcscd and
// returns its exit code, with ran true. It does nothing (ran false) outside
// VSCARD_E2E=1, where there is no pcscd to share, or when the binary
// already runs next to a private pcscd. Call it first in TestMain:
//
//	if code, ran := pcscdtest.Private(); ran {
//		os.Exit(code)
//	}
func Private() (code int, ran bool) {
	if os.Getenv("VSCARD_E2E") != "1" || Inside() {
		return 0, false
	}
	code, err := rerun()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pcscdtest:", err)
		return 1, true
	}
	return code, true
}

// Inside reports whether this test binary runs next to a pcscd of its
// own (in the run Private started), which its tests may restart.
func Inside() bool { return os.Getenv(insideEnv) == "1" }

func rerun() (int, error) {
	root, err := ModuleRoot()
	if err != nil {
		return 0, err
	}
	port, err := FreePortPair()
	if err != nil {
		return 0, err
	}
	script := filepath.Join(root, "scripts", "with-pcscd")
	cmd := exec.Command(script, os.Args...)
	cmd.Env = append(os.Environ(), insideEnv+"=1", "VSCARD_VPCD_PORT="+strconv.Itoa(port))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), nil
	}
	if err != nil {
		return 0, fmt.Errorf("nested %s: %w", script, err)
	}
	return 0, nil
}

// FreePortPair finds a loopback port p with p+1 also free, for the two
// slots of a vpcd (with-pcscd's VSCARD_VPCD_PORT). Another program may
// take them before vpcd does; with-pcscd then fails to start and says so.
func FreePortPair() (int, error) {
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("pcscdtest: %w", err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		if p+1 > 65534 {
			l.Close()
			continue
		}
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+1))
		l.Close()
		if err == nil {
			l2.Close()
			return p, nil
		}
	}
	return 0, errors.New("pcscdtest: no two adjacent free TCP ports on 127.0.0.1")
}

// ModuleRoot is the directory at or above the working directory (a
// package's, under go test) that holds go.mod: where scripts/ and the
// commands to build are.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("pcscdtest: go.mod not found above the working directory")
		}
		dir = parent
	}
}
