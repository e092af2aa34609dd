package e2e

import (
	"bytes"
	"os"
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

	out := e.must("certutil", "-L", "-d", "sql:"+db, "-h", "all")
	t.Logf("certutil -L -h all:\n%s", out)
	for _, c := range cacLabels {
		nick := nssNickname(out, c.label)
		if nick == "" {
			t.Errorf("certutil does not list %q", c.label)
			continue
		}
		// The certificate NSS sees is the one OpenSC reads from the card.
		r := e.run("certutil", "-L", "-d", "sql:"+db, "-h", "all", "-n", nick, "-r")
		if r.code != 0 {
			t.Errorf("certutil -L -n %q -r:\n%s", nick, r)
			continue
		}
		der, _ := readCert(t, e, m, c.id)
		if !bytes.Equal([]byte(r.out), der) {
			t.Errorf("NSS's %q (%d bytes) differs from the card's certificate %s (%d bytes)", nick, len(r.out), c.id, len(der))
		}
	}
}

// nssNickname finds "TOKEN:LABEL" in `certutil -L` output, whose lines are
// a nickname padded to a column, then trust flags.
func nssNickname(out, label string) string {
	for _, line := range strings.Split(out, "\n") {
		i := strings.Index(line, ":"+label)
		if i < 0 {
			continue
		}
		rest := line[i+1+len(label):]
		if rest != "" && rest[0] != ' ' && rest[0] != '\t' {
			continue
		}
		return strings.TrimSpace(line[:i+1+len(label)])
	}
	return ""
}
