package store

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/vscard/vscard/token"
)

// TestVerifyFastPath: once a process has seen the right PIN, later checks
// skip PBKDF2 but count exactly as before, and a PIN changed on disk (by
// this process or another) always goes back to PBKDF2.
func TestVerifyFastPath(t *testing.T) {
	dir, pin, _ := newPIV(t)
	a, b := openPIV(t, dir), openPIV(t, dir) // two serve processes
	p := a.pin

	type step struct {
		pin      string
		wantOK   bool
		wantLeft int
		slow     int // PBKDF2 runs so far in a
	}
	check := func(name string, s step) {
		t.Helper()
		left, err := p.Verify([]byte(s.pin))
		if ok := err == nil; ok != s.wantOK {
			t.Fatalf("%s: Verify err = %v, want ok=%v", name, err, s.wantOK)
		}
		if !s.wantOK && !errors.Is(err, token.ErrPINIncorrect) {
			t.Fatalf("%s: err = %v, want ErrPINIncorrect", name, err)
		}
		if left != s.wantLeft {
			t.Fatalf("%s: %d tries left, want %d", name, left, s.wantLeft)
		}
		if got := readPIVTries(t, a); got != s.wantLeft {
			t.Fatalf("%s: %d tries on disk, want %d", name, got, s.wantLeft)
		}
		if p.slowHashes != s.slow {
			t.Fatalf("%s: %d PBKDF2 runs, want %d", name, p.slowHashes, s.slow)
		}
	}
	check("first right PIN", step{pin, true, 3, 1})
	check("right PIN again", step{pin, true, 3, 1})
	check("padded right PIN", step{pin + "\xff\xff", true, 3, 1})
	check("wrong PIN", step{"654321", false, 2, 1})
	check("too short", step{"12", false, 1, 1})
	check("right PIN resets", step{pin, true, 3, 1})

	// Another process changes the PIN: the stored hash differs, so the
	// old PIN is checked with PBKDF2 and refused, the new one accepted.
	if err := b.pin.Set([]byte("24681357")); err != nil {
		t.Fatal(err)
	}
	check("old PIN after change", step{pin, false, 2, 2})
	check("new PIN", step{"24681357", true, 3, 3})
	check("new PIN again", step{"24681357", true, 3, 3})

	// Blocked stays blocked on the fast path.
	for i := 0; i < 3; i++ {
		p.Verify([]byte("00000000"))
	}
	if _, err := p.Verify([]byte("24681357")); !errors.Is(err, token.ErrPINBlocked) {
		t.Fatalf("right PIN on a blocked card: %v", err)
	}
}

func readPIVTries(t *testing.T, c *PIVCard) int {
	t.Helper()
	left, _ := c.PIN().TriesLeft()
	return left
}

// BenchmarkVerifyRightPIN times VERIFY with the right PIN on a card with
// the real PBKDF2 cost: after the first check it is the two durable
// counter writes, not the 200,000 hash iterations.
func BenchmarkVerifyRightPIN(b *testing.B) {
	dir := filepath.Join(b.TempDir(), "c")
	c, err := Create(dir, Options{PIN: testPIN, KeyType: "rsa1024"})
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := c.PIN().Verify([]byte(testPIN)); err != nil {
			b.Fatal(err)
		}
	}
}
