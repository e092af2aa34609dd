package pcsc

import (
	"os"
	"testing"

	"github.com/vscard/vscard/internal/pcscdtest"
)

// TestMain gives this package's end-to-end tests a pcscd of their own
// (pcscdtest.Private): they insert and remove cards in vpcd's slot 0 and
// restart pcscd, which other packages' tests under scripts/test must not
// see. BenchmarkE2ETransmit against scripts/bench's card
// (VSCARD_BENCH_READER) stays in the caller's pcscd, where that card is.
func TestMain(m *testing.M) {
	if os.Getenv("VSCARD_BENCH_READER") == "" {
		if code, ran := pcscdtest.Private(); ran {
			os.Exit(code)
		}
	}
	os.Exit(m.Run())
}
