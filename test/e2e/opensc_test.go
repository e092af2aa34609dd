package e2e

import (
	"bytes"
	"regexp"
	"strings"
	"testing"
)

// TestOpenSC serves one fresh card and drives it with OpenSC the way the
// OpenSC recipes of peers.md §3.2 do (acceptance items 1-6).
func TestOpenSC(t *testing.T) {
	e := newEnv(t)
	dir := e.newCard("card")
	e.serve([]card{{dir: dir, slot: 0}})
	m := openscModule(t)
	checkOpenSCBasics(t, e, m)

	t.Run("4-test-suite", func(t *testing.T) {
		r := e.p11(m, "--login", "--pin", testPIN, "--test")
		t.Logf("%s", r)
		errs := testErrors(r.out)
		if r.code != 0 || len(errs) > 0 {
			t.Errorf("pkcs11-tool --test: exit %d, error lines %q\n%s", r.code, errs, r)
		}
		// pkcs11-tool prints "No errors" only when its count is zero.
		if !strings.Contains(r.out, "No errors") {
			t.Errorf("pkcs11-tool --test did not report \"No errors\"")
		}
		// libcacard fails here (GET CHALLENGE -> 6D 00, peers.md §3.2);
		// vscard answers GET CHALLENGE, so the RNG test must pass.
		if !randomOK(r.out) {
			t.Errorf("pkcs11-tool --test output does not show C_GenerateRandom passing")
		}
	})

	t.Run("5-sign-SHA256-RSA-PKCS", func(t *testing.T) {
		signAndVerify(t, e, m, "0001")
	})

	t.Run("6-decrypt-RSA-PKCS", func(t *testing.T) {
		decryptRoundTrip(t, e, m, "0003", "RSA-PKCS", []string{}, nil)
	})
	t.Run("6-decrypt-RSA-PKCS-OAEP-SHA1", func(t *testing.T) {
		// SHA-1/MGF1-SHA1 is pkcs11-tool 0.23's OAEP default; say it
		// explicitly on both sides anyway.
		decryptRoundTrip(t, e, m, "0003", "RSA-PKCS-OAEP",
			[]string{"-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha1", "-pkeyopt", "rsa_mgf1_md:sha1"},
			[]string{"--hash-algorithm", "SHA-1", "--mgf", "MGF1-SHA1"})
	})
	t.Run("6-decrypt-RSA-PKCS-OAEP-SHA256", func(t *testing.T) {
		decryptRoundTrip(t, e, m, "0003", "RSA-PKCS-OAEP",
			[]string{"-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256"},
			[]string{"--hash-algorithm", "SHA256", "--mgf", "MGF1-SHA256"})
	})
}

// TestStrict repeats items 1-3 against `vscard serve --strict`, which
// behaves like libcacard, including its unsupported GET CHALLENGE
// (acceptance item 11).
func TestStrict(t *testing.T) {
	e := newEnv(t)
	dir := e.newCard("card")
	e.serve([]card{{dir: dir, slot: 0}}, "--strict")
	m := openscModule(t)
	checkOpenSCBasics(t, e, m)

	t.Run("11-test-suite-only-GenerateRandom-fails", func(t *testing.T) {
		r := e.p11(m, "--login", "--pin", testPIN, "--test")
		t.Logf("%s", r)
		// libcacard: "1 errors", only C_GenerateRandom (peers.md §3.2).
		if !regexp.MustCompile(`(?m)^\s*1 errors\s*$`).MatchString(r.out) {
			t.Errorf("want exactly \"1 errors\" (C_GenerateRandom, as libcacard):\n%s", r)
		}
		for _, l := range testErrors(r.out) {
			if !strings.Contains(l, "GenerateRandom") && !strings.Contains(l, "1 errors") {
				t.Errorf("unexpected error line: %q", l)
			}
		}
		if !strings.Contains(r.out, "C_GenerateRandom") {
			t.Errorf("C_GenerateRandom not mentioned in --test output")
		}
	})
}

// checkOpenSCBasics runs acceptance items 1-3 against the card in reader 0.
func checkOpenSCBasics(t *testing.T, e *env, m string) {
	t.Run("1-opensc-tool-name", func(t *testing.T) {
		out := e.must("opensc-tool", "-r", "0", "-n")
		t.Logf("opensc-tool -n: %s", strings.TrimSpace(out))
		// OpenSC's cac driver names the card "Common Access Card (CAC)";
		// "CAC II" when it matched through the CCC (cac.md §8.1).
		if !strings.Contains(out, "Common Access Card") && !strings.Contains(out, "CAC") {
			t.Errorf("opensc-tool -n does not name a CAC:\n%s", out)
		}
		atr := e.must("opensc-tool", "-r", "0", "-a")
		t.Logf("opensc-tool -a: %s", strings.TrimSpace(atr))
		if !regexp.MustCompile(`(?i)^\s*3b(:[0-9a-f]{2})+\s*$`).MatchString(lastLine(atr)) {
			t.Errorf("opensc-tool -a printed no ATR:\n%s", atr)
		}
	})

	t.Run("2-pkcs11-tool-L", func(t *testing.T) {
		out := e.must("pkcs11-tool", "--module", m, "-L")
		t.Logf("pkcs11-tool -L:\n%s", out)
		toks := tokens(parseSlots(out))
		if len(toks) != 1 {
			t.Fatalf("want 1 token, got %d:\n%s", len(toks), out)
		}
		tok := toks[0]
		if tok.reader != readerName0 {
			t.Errorf("token in reader %q, want %q", tok.reader, readerName0)
		}
		if got := tok.fields["token manufacturer"]; got != "Common Access Card" {
			t.Errorf("token manufacturer %q, want \"Common Access Card\" (pkcs15-cac, cac.md §8.3)", got)
		}
		if got := tok.fields["token model"]; got != "PKCS#15 emulated" {
			t.Errorf("token model %q, want \"PKCS#15 emulated\"", got)
		}
		if !strings.Contains(tok.fields["token flags"], "login required") {
			t.Errorf("token flags %q lack \"login required\"", tok.fields["token flags"])
		}
		if !regexp.MustCompile(`^[0-9a-fA-F]{8,}$`).MatchString(tok.fields["serial num"]) {
			t.Errorf("serial num %q is not hex", tok.fields["serial num"])
		}
	})

	t.Run("3-pkcs11-tool-O", func(t *testing.T) {
		out := e.must("pkcs11-tool", "--module", m, "-O")
		t.Logf("pkcs11-tool -O:\n%s", out)
		objs := parseObjects(out)
		checkCACObjects(t, objs, "Certificate", "Public Key")
		if n := len(ofKind(objs, "Private Key")); n != 0 {
			t.Errorf("%d private keys visible without login", n)
		}
		out = e.must("pkcs11-tool", "--module", m, "--login", "--pin", testPIN, "-O")
		t.Logf("pkcs11-tool --login -O:\n%s", out)
		checkCACObjects(t, parseObjects(out), "Certificate", "Public Key", "Private Key")
	})
}

// checkCACObjects requires exactly the three CAC labels and IDs for each
// object kind.
func checkCACObjects(t *testing.T, objs []object, kinds ...string) {
	t.Helper()
	for _, kind := range kinds {
		got := ofKind(objs, kind)
		if len(got) != len(cacLabels) {
			t.Errorf("%d %s objects, want %d: %v", len(got), kind, len(cacLabels), got)
			continue
		}
		for _, want := range cacLabels {
			found := false
			for _, o := range got {
				if o.id == want.id && o.label == want.label {
					found = true
				}
			}
			if !found {
				t.Errorf("no %s object %q with ID %s among %v", kind, want.label, want.id, got)
			}
		}
	}
}

// testErrors returns the lines of `pkcs11-tool --test` output that report a
// failure: an error count, a CKR_ code other than CKR_OK, or "ERR".
func testErrors(out string) []string {
	var bad []string
	countRe := regexp.MustCompile(`^\s*([0-9]+) errors?\s*$`)
	ckrRe := regexp.MustCompile(`CKR_[A-Z_]+`)
	for _, line := range strings.Split(out, "\n") {
		if m := countRe.FindStringSubmatch(line); m != nil && m[1] != "0" {
			bad = append(bad, line)
			continue
		}
		for _, c := range ckrRe.FindAllString(line, -1) {
			if c != "CKR_OK" {
				bad = append(bad, line)
				break
			}
		}
		if strings.Contains(line, "ERR") || strings.Contains(strings.ToLower(line), "failed") {
			if len(bad) == 0 || bad[len(bad)-1] != line {
				bad = append(bad, line)
			}
		}
	}
	return bad
}

// randomOK reports whether the "C_SeedRandom() and C_GenerateRandom():"
// section of `pkcs11-tool --test` ends in "seems to be OK".
func randomOK(out string) bool {
	in := false
	for _, line := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(line, "C_SeedRandom() and C_GenerateRandom():"):
			in = true
		case in && strings.HasPrefix(line, " "):
			if strings.TrimSpace(line) == "seems to be OK" {
				return true
			}
		case in:
			return false
		}
	}
	return false
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// readCert reads a certificate from the card by ID and returns its DER and
// the path of its public key in PEM.
func readCert(t *testing.T, e *env, m, id string, slotArgs ...string) (der []byte, pubPEM string) {
	t.Helper()
	name := "cert-" + id + strings.Join(slotArgs, "") + ".der"
	args := append(append([]string{}, slotArgs...), "--read-object", "--type", "cert", "--id", id, "-o", e.path(name))
	if r := e.p11(m, args...); r.code != 0 {
		t.Fatalf("reading certificate %s:\n%s", id, r)
	}
	der = e.readFile(name)
	pubPEM = e.path(name + ".pub.pem")
	e.must("openssl", "x509", "-inform", "DER", "-in", e.path(name), "-noout", "-pubkey", "-out", pubPEM)
	return der, pubPEM
}

// signAndVerify signs 32 random bytes with key id via SHA256-RSA-PKCS and
// verifies the signature with openssl and with Go against the card's cert.
func signAndVerify(t *testing.T, e *env, m, id string) {
	t.Helper()
	data, content := e.writeRandom("data-"+id+".bin", 32)
	sig := e.path("sig-" + id + ".bin")
	r := e.p11(m, "--login", "--pin", testPIN, "--sign", "--id", id, "-m", "SHA256-RSA-PKCS", "-i", data, "-o", sig)
	if r.code != 0 {
		t.Fatalf("signing failed:\n%s", r)
	}
	der, pub := readCert(t, e, m, id)
	v := e.run("openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data)
	t.Logf("%s", v)
	if v.code != 0 || !strings.Contains(v.out, "Verified OK") {
		t.Errorf("openssl does not verify the card's signature:\n%s", v)
	}
	if err := verifyPKCS1SHA256(der, content, e.readFile("sig-"+id+".bin")); err != nil {
		t.Errorf("Go does not verify the card's signature: %v", err)
	}
}

// decryptRoundTrip encrypts with openssl to the card's certificate id and
// decrypts on the card with pkcs11-tool.
func decryptRoundTrip(t *testing.T, e *env, m, id, mech string, opensslOpts, p11Opts []string) {
	t.Helper()
	tag := strings.ToLower(strings.Join(append([]string{mech}, p11Opts...), "-"))
	tag = regexp.MustCompile(`[^a-z0-9-]`).ReplaceAllString(tag, "")
	plainPath, plain := e.writeRandom("plain-"+tag, 32)
	_, pub := readCert(t, e, m, id)
	ct := e.path("ct-" + tag)
	enc := append([]string{"pkeyutl", "-encrypt", "-pubin", "-inkey", pub, "-in", plainPath, "-out", ct}, opensslOpts...)
	e.must("openssl", enc...)
	outName := "out-" + tag
	args := append([]string{"--login", "--pin", testPIN, "--decrypt", "--id", id, "-m", mech, "-i", ct, "-o", e.path(outName)}, p11Opts...)
	r := e.p11(m, args...)
	t.Logf("%s", r)
	if r.code != 0 {
		t.Fatalf("decryption failed:\n%s", r)
	}
	if got := e.readFile(outName); !bytes.Equal(got, plain) {
		t.Errorf("decrypted %x, want %x", got, plain)
	}
}

// p11Error extracts the CKR_ code of a failed pkcs11-tool call.
func p11Error(out string) string {
	m := regexp.MustCompile(`rv = (CKR_[A-Z_]+)`).FindStringSubmatch(out)
	if m == nil {
		return ""
	}
	return m[1]
}
