package e2e

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestCoolKey drives the card with CoolKey's PKCS#11 module, the other CAC
// consumer QEMU's documentation names (acceptance item 8). On Debian 12
// CoolKey lists no certificates from libcacard (peers.md, appendix "CoolKey
// 1.1.0"); vscard aims to do better. On failure the test prints CoolKey's
// own log (COOL_KEY_LOG_FILE), which says where it gave up.
func TestCoolKey(t *testing.T) {
	e := newEnv(t)
	dir := e.newCard("card")
	e.serve([]card{{dir: dir, slot: 0}})
	ck := coolkeyModule(t)
	m := openscModule(t)

	logPath := e.path("coolkey.log")
	withLog := func(format string, args ...any) string {
		b, err := os.ReadFile(logPath)
		log := string(b)
		if err != nil {
			log = fmt.Sprintf("(no CoolKey log: %v)", err)
		}
		return fmt.Sprintf(format, args...) + "\nCoolKey log (COOL_KEY_LOG_FILE):\n" + log
	}
	ckRun := func(args ...string) result {
		t.Helper()
		return e.exec([]string{"COOL_KEY_LOG_FILE=" + logPath}, "pkcs11-tool", append([]string{"--module", ck}, args...)...)
	}

	r := ckRun("-L")
	t.Logf("%s", r)
	if toks := tokens(parseSlots(r.out)); r.code != 0 || len(toks) != 1 {
		t.Fatalf("%s", withLog("CoolKey: want 1 token:\n%s", r))
	}

	r = ckRun("-O")
	t.Logf("%s", r)
	certs := ofKind(parseObjects(r.out), "Certificate")
	if r.code != 0 || len(certs) != 3 {
		t.Fatalf("%s", withLog("CoolKey lists %d certificates, want 3:\n%s", len(certs), r))
	}

	// The three certificates are the card's: the same DER OpenSC reads.
	want := map[string]string{} // DER -> OpenSC id
	for _, c := range cacLabels {
		der, _ := readCert(t, e, m, c.id)
		want[string(der)] = c.id
	}
	idCertCK := "" // CoolKey's ID for the card's ID certificate (0001)
	for _, c := range certs {
		name := "ck-cert-" + c.id + ".der"
		r := ckRun("--read-object", "--type", "cert", "--id", c.id, "-o", e.path(name))
		if r.code != 0 {
			t.Errorf("%s", withLog("CoolKey: reading certificate %s:\n%s", c.id, r))
			continue
		}
		oid, ok := want[string(e.readFile(name))]
		if !ok {
			t.Errorf("CoolKey certificate %v is none of the card's certificates", c)
			continue
		}
		delete(want, string(e.readFile(name)))
		if oid == "0001" {
			idCertCK = c.id
		}
	}
	if len(want) != 0 || idCertCK == "" {
		t.Fatalf("%s", withLog("CoolKey does not return all three card certificates; missing OpenSC ids %v", want))
	}

	// Sign with the ID key. CoolKey offers CKM_RSA_PKCS, so sign a SHA-256
	// DigestInfo; the result is a SHA256-RSA-PKCS signature of the data.
	data, content := e.writeRandom("ck-data.bin", 32)
	h := sha256.Sum256(content)
	in := e.path("ck-digestinfo.bin")
	if err := os.WriteFile(in, append(bytes.Clone(sha256DigestInfo), h[:]...), 0o600); err != nil {
		t.Fatal(err)
	}
	sig := e.path("ck-sig.bin")
	r = ckRun("--login", "--pin", testPIN, "--sign", "--id", idCertCK, "-m", "RSA-PKCS", "-i", in, "-o", sig)
	t.Logf("%s", r)
	if r.code != 0 {
		t.Fatalf("%s", withLog("CoolKey signing failed:\n%s", r))
	}
	_, pub := readCert(t, e, m, "0001")
	v := e.run("openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data)
	t.Logf("%s", v)
	if v.code != 0 || !strings.Contains(v.out, "Verified OK") {
		t.Errorf("%s", withLog("openssl does not verify CoolKey's signature:\n%s", v))
	}
}
