package pcsc

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// privateEnv marks a test binary already running next to a pcscd of its own.
const privateEnv = "VSCARD_PCSC_PRIVATE_PCSCD"

// TestMain gives this package's end-to-end tests a pcscd of their own.
// Under scripts/test every package shares one pcscd and vpcd's two slots,
// and these tests insert and remove cards in slot 0 and restart pcscd;
// so when VSCARD_E2E=1 the test binary re-runs itself inside a nested
// scripts/with-pcscd (its own mount namespace, pcscd and vpcd ports).
// BenchmarkE2ETransmit against scripts/bench's card (VSCARD_BENCH_READER)
// stays in the caller's pcscd, where that card is.
func TestMain(m *testing.M) {
	if os.Getenv("VSCARD_E2E") != "1" || os.Getenv(privateEnv) == "1" || os.Getenv("VSCARD_BENCH_READER") != "" {
		os.Exit(m.Run())
	}
	code, err := runPrivate()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pcsc tests:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func runPrivate() (int, error) {
	script, err := filepath.Abs(filepath.Join("..", "scripts", "with-pcscd"))
	if err != nil {
		return 0, err
	}
	port, err := freePortPair()
	if err != nil {
		return 0, err
	}
	cmd := exec.Command(script, append([]string{os.Args[0]}, os.Args[1:]...)...)
	cmd.Env = append(os.Environ(), privateEnv+"=1", "VSCARD_VPCD_PORT="+strconv.Itoa(port))
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
