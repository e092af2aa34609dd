package e2e

import (
	"regexp"
	"testing"
)

// TestPINLockout enters a wrong PIN three times through OpenSC, then checks
// that the card is blocked, stays blocked across a restart of vscard serve
// (the retry counter is stored with the card), and that `vscard card show`
// says so (acceptance item 7).
func TestPINLockout(t *testing.T) {
	e := newEnv(t)
	dir := e.newCard("card")
	cards := []card{{dir: dir, slot: 0}}
	srv := e.serve(cards)
	m := openscModule(t)

	blockedRe := regexp.MustCompile(`(?i)\bblocked\b`)
	if r := e.vscard("card", "show", dir); r.code != 0 {
		t.Fatalf("card show on a fresh card:\n%s", r)
	} else if blockedRe.MatchString(r.out) {
		t.Errorf("card show says \"blocked\" before any wrong PIN:\n%s", r)
	}

	// The right PIN works first: the lockout below is then the card's doing.
	if r := e.p11(m, "--login", "--pin", testPIN, "-O"); r.code != 0 {
		t.Fatalf("login with the right PIN failed:\n%s", r)
	}

	var codes []string
	for i := 1; i <= 3; i++ {
		r := e.p11(m, "--login", "--pin", wrongPIN, "-O")
		t.Logf("wrong PIN #%d: exit %d, %s", i, r.code, p11Error(r.out))
		if r.code == 0 {
			t.Fatalf("login with a wrong PIN succeeded:\n%s", r)
		}
		codes = append(codes, p11Error(r.out))
	}
	// The first two must be "incorrect"; the third may already be reported
	// as locked, depending on whether OpenSC reads the tries left (63 C0).
	for i, c := range codes {
		if i < 2 && c != "CKR_PIN_INCORRECT" {
			t.Errorf("wrong PIN #%d gave %q, want CKR_PIN_INCORRECT", i+1, c)
		}
		if i == 2 && c != "CKR_PIN_INCORRECT" && c != "CKR_PIN_LOCKED" {
			t.Errorf("wrong PIN #3 gave %q, want CKR_PIN_INCORRECT or CKR_PIN_LOCKED", c)
		}
	}

	rightPINLocked := func(when string) {
		t.Helper()
		r := e.p11(m, "--login", "--pin", testPIN, "-O")
		t.Logf("right PIN %s: exit %d, %s", when, r.code, p11Error(r.out))
		if r.code == 0 || p11Error(r.out) != "CKR_PIN_LOCKED" {
			t.Errorf("right PIN %s: want failure with CKR_PIN_LOCKED:\n%s", when, r)
		}
	}
	rightPINLocked("after three wrong ones")

	srv = srv.restart(cards)
	rightPINLocked("after restarting vscard serve")
	srv.stop()

	r := e.vscard("card", "show", dir)
	t.Logf("%s", r)
	if r.code != 0 || !blockedRe.MatchString(r.out) {
		t.Errorf("vscard card show does not report the PIN blocked:\n%s", r)
	}
}
