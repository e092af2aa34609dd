package e2e

import (
	"bytes"
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestNSS adds OpenSC's module to a fresh NSS database, as Firefox and
// Chromium users do, and lists the card's certificates with certutil
// (acceptance item 9).
func TestNSS(t *testing.T) {
	e := newEnv(t)
	needTools(t, "certutil", "modutil")
	dir := e.newCard("card")
	e.serve([]card{{dir: dir, slot: 0}})
	m := openscModule(t)

	db := e.path("nssdb")
	if err := os.Mkdir(db, 0o700); err != nil {
		t.Fatal(err)
	}
	e.must("certutil", "-N", "-d", "sql:"+db, "--empty-password")
	// -force skips modutil's "close the browser" prompt (stdin is empty).
	e.must("modutil", "-dbdir", "sql:"+db, "-add", "opensc", "-libfile", m, "-force")
	mods := e.must("modutil", "-dbdir", "sql:"+db, "-list")
	t.Logf("modutil -list:\n%s", mods)

	pinFile := e.path("pin.txt")
	if err := os.WriteFile(pinFile, []byte(testPIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := e.must("certutil", "-L", "-d", "sql:"+db, "-h", "all")
	t.Logf("certutil -L -h all:\n%s", out)
	for _, c := range cacLabels {
		nick := nssNickname(out, c.label)
		if nick == "" {
			t.Errorf("certutil does not list %q", c.label)
			continue
		}
		// The certificate NSS sees is the one OpenSC reads from the card.
		// certutil logs in to the token to find a certificate by name, and
		// with no terminal it can only take the PIN from a file (-f).
		token, _, _ := strings.Cut(nick, ":")
		der, stderr, err := e.stdout("certutil", "-L", "-d", "sql:"+db, "-h", token, "-f", pinFile, "-n", nick, "-r")
		if err != nil {
			t.Errorf("certutil -L -h %q -n %q -r: %v\n%s", token, nick, err, stderr)
			continue
		}
		card, _ := readCert(t, e, m, c.id)
		if !bytes.Equal(der, card) {
			t.Errorf("NSS's %q (%d bytes) differs from the card's certificate %s (%d bytes)", nick, len(der), c.id, len(card))
		}
	}
}

// certutilLineRe splits a `certutil -L` line: a nickname padded to a
// column, then the trust flags "SSL,S/MIME,JAR/XPI" (e.g. "u,u,u").
var certutilLineRe = regexp.MustCompile(`^(.*\S)\s+([a-zA-Z]*,[a-zA-Z]*,[a-zA-Z]*)\s*$`)

// nssNickname finds the nickname "TOKEN:LABEL" in `certutil -L` output.
func nssNickname(out, label string) string {
	for _, line := range strings.Split(out, "\n") {
		m := certutilLineRe.FindStringSubmatch(line)
		if m != nil && strings.HasSuffix(m[1], ":"+label) {
			return m[1]
		}
	}
	return ""
}
