package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vscard/vscard/internal/secret"
	"github.com/vscard/vscard/token/store"
)

// ttyStdin is a standard input that is also a terminal for secrets, as a
// user at a TTY would be (terminalFor prefers it to the real terminal).
type ttyStdin struct {
	io.Reader
	secret.Terminal
}

func newTTY(lines string) *ttyStdin {
	return &ttyStdin{strings.NewReader(""), secret.NewLineTerminal(strings.NewReader(lines), io.Discard)}
}

func runCLIStdin(t *testing.T, stdin io.Reader, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	env := &environ{stdin: stdin, stdout: &out, stderr: &errb}
	code := run(context.Background(), env, args)
	return code, out.String(), errb.String()
}

// needTools skips when a tool is missing, unless VSCARD_E2E=1 (CI), where
// a missing tool fails the test.
func needTools(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			if os.Getenv("VSCARD_E2E") == "1" {
				t.Fatalf("%s not installed (VSCARD_E2E=1): %v", n, err)
			}
			t.Skipf("%s not installed", n)
		}
	}
}

func runTool(t *testing.T, dir, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

func writeFile(t *testing.T, path, content string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// makeRecipeDB makes dir/db with the QEMU documentation's certutil
// recipe: a CA and the id, signing and encryption certificates it
// issued. An empty pw makes an
// empty-password database. The serials are explicit (-m): certutil derives
// the default serial from the clock in seconds, so a CA and a certificate
// made within one second collide (SEC_ERROR_REUSED_ISSUER_AND_SERIAL).
func makeRecipeDB(t *testing.T, dir, pw string) string {
	t.Helper()
	db := filepath.Join(dir, "db")
	if err := os.Mkdir(db, 0o700); err != nil {
		t.Fatal(err)
	}
	pwf := writeFile(t, filepath.Join(dir, "dbpw"), pw+"\n")
	noise := make([]byte, 2048)
	rand.Read(noise)
	writeFile(t, filepath.Join(dir, "noise"), string(noise))
	if pw == "" {
		runTool(t, dir, "certutil", "-N", "-d", "sql:db", "--empty-password")
	} else {
		runTool(t, dir, "certutil", "-N", "-d", "sql:db", "-f", pwf)
	}
	runTool(t, dir, "certutil", "-S", "-d", "sql:db", "-f", pwf, "-z", "noise", "-s", "CN=Fake Smart Card CA", "-x", "-t", "TC,TC,TC", "-n", "fake-smartcard-ca", "-m", "1")
	runTool(t, dir, "certutil", "-S", "-d", "sql:db", "-f", pwf, "-z", "noise", "-t", ",,", "-s", "CN=John Doe", "-n", "id-cert", "-c", "fake-smartcard-ca", "-m", "2")
	runTool(t, dir, "certutil", "-S", "-d", "sql:db", "-f", pwf, "-z", "noise", "-t", ",,", "-s", "CN=John Doe (signing)", "--nsCertType", "smime", "-n", "signing-cert", "-c", "fake-smartcard-ca", "-m", "3")
	runTool(t, dir, "certutil", "-S", "-d", "sql:db", "-f", pwf, "-z", "noise", "-t", ",,", "-s", "CN=John Doe (encryption)", "--nsCertType", "sslClient", "-n", "encryption-cert", "-c", "fake-smartcard-ca", "-m", "4")
	return "sql:" + db
}

// checkCard opens the imported card and checks it holds one credential
// CN=cn whose key signs verifiably, and the given PIN.
func checkCard(t *testing.T, dir, cn, pin, caCN string) {
	t.Helper()
	checkCardCNs(t, dir, []string{cn}, pin, caCN)
}

// checkCardCNs opens the imported card and checks its credentials are
// CN=cns in order, that each key signs verifiably, and the PIN and CA.
func checkCardCNs(t *testing.T, dir string, cns []string, pin, caCN string) {
	t.Helper()
	c, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	creds := c.Credentials()
	var got []string
	for _, cr := range creds {
		got = append(got, cr.Cert.Subject.CommonName)
	}
	if !slices.Equal(got, cns) {
		t.Fatalf("credentials %q, want %q", got, cns)
	}
	msg := []byte("signed by an imported key")
	sum := sha256.Sum256(msg)
	for _, cr := range creds {
		sig, err := cr.Key.Sign(rand.Reader, sum[:], crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		if err := cr.Cert.CheckSignature(x509.SHA256WithRSA, msg, sig); err != nil {
			t.Fatalf("%s: imported key's signature does not verify: %v", cr.Label, err)
		}
	}
	if _, err := c.PIN().Verify([]byte(pin)); err != nil {
		t.Fatalf("PIN %q: %v", pin, err)
	}
	switch ca := c.CA(); {
	case caCN == "" && ca != nil:
		t.Fatalf("unexpected CA %s", ca.Subject)
	case caCN != "" && (ca == nil || ca.Subject.CommonName != caCN):
		t.Fatalf("CA %v, want CN=%s", ca, caCN)
	}
}

// absTestdata names store testdata files absolutely, for tools run in a
// temporary directory.
func absTestdata(t *testing.T) func(string) string {
	abs, err := filepath.Abs(storeTestdata)
	if err != nil {
		t.Fatal(err)
	}
	return func(f string) string { return filepath.Join(abs, f) }
}

// noDir checks that a failed import left neither the card directory nor
// the staging directory token/store builds it in (".NAME.new-*" next to
// it) behind.
func noDir(t *testing.T, dir string) {
	t.Helper()
	if _, err := os.Lstat(dir); err == nil {
		t.Fatalf("a failed import left %s behind", dir)
	}
	tmp, err := filepath.Glob(filepath.Join(filepath.Dir(dir), "."+filepath.Base(dir)+".new-*"))
	if err != nil || len(tmp) > 0 {
		t.Fatalf("a failed import left a half-written store behind: %v %v", tmp, err)
	}
}

// TestCardImportP12 imports PKCS#12 files made by the real tools: openssl
// (modern AES and -legacy RC2) and NSS pk12util (BER, PBES2) from the QEMU
// recipe's database. The password comes from --password-file; a wrong one
// fails cleanly and leaves no directory.
func TestCardImportP12(t *testing.T) {
	td := absTestdata(t)
	for _, tc := range []struct {
		name, cn, ca string
		tools        []string
		make         func(t *testing.T, dir string) string
	}{
		{"openssl", "Alice Import", "", []string{"openssl"}, func(t *testing.T, dir string) string {
			runTool(t, dir, "openssl", "pkcs12", "-export", "-in", td("rsa-pkcs1.crt"), "-inkey", td("rsa-pkcs1.key"), "-certfile", td("ca.crt"), "-passout", "pass:s3cret", "-out", "a.p12")
			return "a.p12"
		}},
		{"openssl-legacy", "Alice Import", "", []string{"openssl"}, func(t *testing.T, dir string) string {
			runTool(t, dir, "openssl", "pkcs12", "-export", "-legacy", "-in", td("rsa-pkcs1.crt"), "-inkey", td("rsa-pkcs1.key"), "-passout", "pass:s3cret", "-out", "a.p12")
			return "a.p12"
		}},
		{"pk12util", "John Doe", "Fake Smart Card CA", []string{"certutil", "pk12util"}, func(t *testing.T, dir string) string {
			db := makeRecipeDB(t, dir, "dbpass")
			runTool(t, dir, "pk12util", "-o", "a.p12", "-n", "id-cert", "-d", db, "-k", "dbpw", "-W", "s3cret")
			return "a.p12"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			needTools(t, tc.tools...)
			tmp := t.TempDir()
			p12 := filepath.Join(tmp, tc.make(t, tmp))
			bad := filepath.Join(tmp, "bad-card")
			code, _, errs := runCLI(t, "", "card", "import", bad, "--p12", p12, "--pin", "1234",
				"--password-file", writeFile(t, filepath.Join(tmp, "wrong"), "S3cret\n"))
			if code != exitError || !strings.Contains(errs, "wrong PKCS#12 password for "+p12) {
				t.Fatalf("wrong password: exit %d, %q", code, errs)
			}
			noDir(t, bad)
			card := filepath.Join(tmp, "card")
			code, out, errs := runCLI(t, "", "card", "import", card, "--p12", p12, "--pin", "1234",
				"--password-file", writeFile(t, filepath.Join(tmp, "pw"), "s3cret\n"))
			if code != exitOK {
				t.Fatalf("exit %d: %s", code, errs)
			}
			if strings.Contains(out, "s3cret") || strings.Contains(errs, "s3cret") {
				t.Fatal("password printed")
			}
			checkCard(t, card, tc.cn, "1234", tc.ca)
		})
	}
}

// TestCardImportPasswordSources takes the PKCS#12 password and the new PIN
// from each source: file, environment, terminal; and fails with a clear
// error when none is given and there is no terminal.
func TestCardImportPasswordSources(t *testing.T) {
	needTools(t, "openssl")
	tmp := t.TempDir()
	td := absTestdata(t)
	p12 := filepath.Join(tmp, "a.p12")
	runTool(t, tmp, "openssl", "pkcs12", "-export", "-in", td("rsa-pkcs1.crt"), "-inkey", td("rsa-pkcs1.key"), "-passout", "pass:s3cret", "-out", p12)
	empty := filepath.Join(tmp, "empty.p12")
	runTool(t, tmp, "openssl", "pkcs12", "-export", "-in", td("rsa-pkcs1.crt"), "-inkey", td("rsa-pkcs1.key"), "-passout", "pass:", "-out", empty)
	p12b := filepath.Join(tmp, "b.p12")
	runTool(t, tmp, "openssl", "pkcs12", "-export", "-in", td("rsa-pkcs8.crt"), "-inkey", td("rsa-pkcs8.key"), "-passout", "pass:s3cret", "-out", p12b)
	nokey := filepath.Join(tmp, "nokey.p12")
	runTool(t, tmp, "openssl", "pkcs12", "-export", "-nokeys", "-in", td("rsa-pkcs1.crt"), "-passout", "pass:", "-out", nokey)
	pinFile := writeFile(t, filepath.Join(tmp, "pin"), "5678\n")
	for i, tc := range []struct {
		name     string
		env      map[string]string
		stdin    io.Reader
		args     []string
		wantPIN  string
		wantErr  string
		wantCode int
	}{
		{"env password, env PIN", map[string]string{envPassword: "s3cret", envPIN: "4321"}, strings.NewReader(""), []string{"--p12", p12}, "4321", "", exitOK},
		{"terminal password and PIN", nil, newTTY("s3cret\n8765\n8765\n"), []string{"--p12", p12}, "8765", "", exitOK},
		{"pin file", map[string]string{envPassword: "s3cret", envPIN: "0000"}, strings.NewReader(""), []string{"--p12", p12, "--pin-file", pinFile}, "5678", "", exitOK},
		{"empty password tried first", nil, strings.NewReader(""), []string{"--p12", empty, "--pin", "1111"}, "1111", "", exitOK},
		{"nothing given, no terminal", nil, strings.NewReader(""), []string{"--p12", p12, "--pin", "1111"}, "",
			"PKCS#12 password for " + p12 + " not given: use --password-file FILE, the VSCARD_PASSWORD environment variable, or run at a terminal", exitError},
		{"wrong env password", map[string]string{envPassword: "nope"}, strings.NewReader(""), []string{"--p12", p12, "--pin", "1111"}, "", "wrong PKCS#12 password for " + p12, exitError},
		{"wrong terminal password", nil, newTTY("nope\n"), []string{"--p12", p12, "--pin", "1111"}, "", "wrong PKCS#12 password for " + p12, exitError},
		{"terminal PINs differ", map[string]string{envPassword: "s3cret"}, newTTY("1234\n4321\n"), []string{"--p12", p12}, "", "the two entries differ", exitError},
		{"two files, one password", map[string]string{envPassword: "s3cret"}, strings.NewReader(""), []string{"--p12", p12b, "--p12", p12, "--pin", "2222"}, "2222", "", exitOK},
		{"certificates only", nil, strings.NewReader(""), []string{"--p12", nokey, "--pin", "1111"}, "", nokey + ": no private key in the PKCS#12 file", exitError},
		{"bad PIN from env", map[string]string{envPassword: "s3cret", envPIN: "12"}, strings.NewReader(""), []string{"--p12", p12}, "", "PIN must be 4 to 8 characters", exitUsage},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(envPassword, "")
			os.Unsetenv(envPassword)
			t.Setenv(envPIN, "")
			os.Unsetenv(envPIN)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			card := filepath.Join(tmp, "card"+string(rune('a'+i)))
			code, _, errs := runCLIStdin(t, tc.stdin, append([]string{"card", "import", card}, tc.args...)...)
			if code != tc.wantCode || (tc.wantErr != "" && !strings.Contains(errs, tc.wantErr)) {
				t.Fatalf("exit %d, stderr %q; want %d and %q", code, errs, tc.wantCode, tc.wantErr)
			}
			if tc.wantCode != exitOK {
				noDir(t, card)
				return
			}
			want := []string{"Alice Import"}
			if tc.name == "two files, one password" {
				want = []string{"Alice Import (signing)", "Alice Import"}
			}
			checkCardCNs(t, card, want, tc.wantPIN, "")
		})
	}
}

// TestCardImportNSS imports id-cert from the QEMU recipe's database, with
// a password and with an empty one.
func TestCardImportNSS(t *testing.T) {
	needTools(t, "certutil")
	t.Setenv(envPassword, "")
	os.Unsetenv(envPassword)
	tmp := t.TempDir()
	pwDir := filepath.Join(tmp, "pw")
	emptyDir := filepath.Join(tmp, "empty")
	for _, d := range []string{pwDir, emptyDir} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	pwDB := makeRecipeDB(t, pwDir, "dbpass")
	emptyDB := makeRecipeDB(t, emptyDir, "")
	wrong := writeFile(t, filepath.Join(tmp, "wrong"), "dbpasS\n")
	for i, tc := range []struct {
		name    string
		args    []string
		code    int
		wantErr string
	}{
		{"password file", []string{"--nss", pwDB, "--certs", "id-cert,signing-cert,encryption-cert", "--password-file", filepath.Join(pwDir, "dbpw")}, exitOK, ""},
		{"empty password", []string{"--nss", emptyDB, "--certs", "encryption-cert, id-cert"}, exitOK, ""},
		{"wrong password", []string{"--nss", pwDB, "--certs", "id-cert", "--password-file", wrong}, exitError, "wrong NSS database password for " + pwDB},
		{"no password, no terminal", []string{"--nss", pwDB, "--certs", "id-cert"}, exitError, "NSS database password for " + pwDB + " not given: use --password-file FILE, the VSCARD_PASSWORD environment variable"},
		{"unknown nickname", []string{"--nss", pwDB, "--certs", "nope"}, exitError, "id-cert"},
		{"certs without nss", []string{"--certs", "id-cert"}, exitUsage, "--nss DB and --certs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			card := filepath.Join(tmp, "card"+string(rune('a'+i)))
			code, _, errs := runCLI(t, "", append([]string{"card", "import", card, "--pin", "1234"}, tc.args...)...)
			if code != tc.code || !strings.Contains(errs, tc.wantErr) {
				t.Fatalf("exit %d, stderr %q; want %d and %q", code, errs, tc.code, tc.wantErr)
			}
			if code != exitOK {
				noDir(t, card)
				return
			}
			want := []string{"John Doe", "John Doe (signing)", "John Doe (encryption)"}
			if tc.name == "empty password" {
				want = []string{"John Doe (encryption)", "John Doe"}
			}
			checkCardCNs(t, card, want, "1234", "")
		})
	}
}

// TestCardExportCA checks export-ca against a golden file (the PEM the
// card's ca.der re-encodes to, which must equal OpenSSL's ca.crt) and the
// DER form against ca.der.
func TestCardExportCA(t *testing.T) {
	td := func(f string) string { return filepath.Join(storeTestdata, f) }
	tmp := t.TempDir()
	card := filepath.Join(tmp, "card")
	if code, _, errs := runCLI(t, "", "card", "import", card, "--pem", td("combined.pem"), "--ca", td("ca.der"), "--pin", "1234"); code != exitOK {
		t.Fatalf("import: %s", errs)
	}
	code, out, errs := runCLI(t, "", "card", "export-ca", card)
	if code != exitOK {
		t.Fatalf("export-ca: exit %d: %s", code, errs)
	}
	golden := filepath.Join("testdata", "export-ca.golden")
	if *updateGolden {
		writeFile(t, golden, out)
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if out != string(want) {
		t.Fatalf("export-ca output differs from %s:\n%s", golden, out)
	}
	if openssl, _ := os.ReadFile(td("ca.crt")); out != string(openssl) {
		t.Fatal("exported PEM differs from OpenSSL's ca.crt")
	}
	derOut := filepath.Join(tmp, "ca.der")
	if code, _, errs := runCLI(t, "", "card", "export-ca", card, "--der", "--out", derOut); code != exitOK {
		t.Fatalf("export-ca --der: %s", errs)
	}
	got, _ := os.ReadFile(derOut)
	wantDER, _ := os.ReadFile(td("ca.der"))
	if !bytes.Equal(got, wantDER) {
		t.Fatal("--der output differs from ca.der")
	}

	noCA := filepath.Join(tmp, "noca")
	if code, _, errs := runCLI(t, "", "card", "import", noCA, "--pem", td("combined.pem"), "--pin", "1234"); code != exitOK {
		t.Fatalf("import: %s", errs)
	}
	code, out, errs = runCLI(t, "", "card", "export-ca", noCA)
	if code != exitError || out != "" || !strings.Contains(errs, "has no CA certificate (it was imported without --ca)") {
		t.Fatalf("no CA: exit %d, out %q, stderr %q", code, out, errs)
	}
	if code, _, errs := runCLI(t, "", "card", "export-ca"); code != exitUsage || !strings.Contains(errs, "missing card directory") {
		t.Fatalf("no DIR: exit %d, %q", code, errs)
	}
}
