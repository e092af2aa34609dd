package e2e

import (
	"bytes"
	"strings"
	"testing"
)

// TestTwoCards serves two cards from one vscard process, one per vpcd slot,
// and checks that OpenSC sees two distinct tokens (acceptance item 10). Two
// virt_cacards share one serial and OpenSC's cache then mixes up their
// certificates (vsmartcard #307); vscard cards must not.
func TestTwoCards(t *testing.T) {
	e := newEnv(t)
	a := e.newCard("a")
	b := e.newCard("b")
	e.serve([]card{{dir: a, slot: 0}, {dir: b, slot: 1}})
	m := openscModule(t)

	out := e.must("pkcs11-tool", "--module", m, "-L")
	t.Logf("pkcs11-tool -L:\n%s", out)
	toks := tokens(parseSlots(out))
	if len(toks) != 2 {
		t.Fatalf("want 2 tokens, got %d:\n%s", len(toks), out)
	}
	if toks[0].reader != readerName0 || toks[1].reader != readerName1 {
		t.Errorf("tokens in readers %q and %q, want %q and %q", toks[0].reader, toks[1].reader, readerName0, readerName1)
	}
	s0, s1 := toks[0].fields["serial num"], toks[1].fields["serial num"]
	if s0 == "" || s0 == s1 {
		t.Errorf("serial numbers %q and %q: want two different ones", s0, s1)
	}

	for _, r := range []string{"0", "1"} {
		n := e.must("opensc-tool", "-r", r, "-n")
		if !strings.Contains(n, "CAC") && !strings.Contains(n, "Common Access Card") {
			t.Errorf("reader %s: opensc-tool -n = %q, want a CAC", r, strings.TrimSpace(n))
		}
	}

	der0, _ := readCert(t, e, m, "0001", "--slot", toks[0].id)
	der1, _ := readCert(t, e, m, "0001", "--slot", toks[1].id)
	if bytes.Equal(der0, der1) {
		t.Errorf("both tokens return the same certificate 0001")
	}
	// Each card signs with its own key: a signature from slot 1 verifies
	// with slot 1's certificate.
	for i, tok := range toks {
		data, content := e.writeRandom("data-slot"+tok.id, 32)
		sig := e.path("sig-slot" + tok.id)
		if r := e.p11(m, "--slot", tok.id, "--login", "--pin", testPIN, "--sign", "--id", "0001", "-m", "SHA256-RSA-PKCS", "-i", data, "-o", sig); r.code != 0 {
			t.Fatalf("signing on %s:\n%s", tok.reader, r)
		}
		der := [][]byte{der0, der1}[i]
		if err := verifyPKCS1SHA256(der, content, e.readFile("sig-slot"+tok.id)); err != nil {
			t.Errorf("signature from %s does not verify with its certificate: %v", tok.reader, err)
		}
	}
}
