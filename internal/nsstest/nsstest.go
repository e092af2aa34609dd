// Package nsstest makes NSS databases for tests with the real certutil,
// following the recipe of QEMU's smart card documentation that issue 4
// names. It is shared by the tests of every command that serves or imports
// an NSS database.
package nsstest

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Recipe is the certificate part of QEMU's recipe, one certutil call per
// line; MakeDB adds -d, -z and the password options so certutil does not
// prompt.
var Recipe = [][]string{
	{"-S", "-s", "CN=Fake Smart Card CA", "-x", "-t", "TC,TC,TC", "-n", "fake-smartcard-ca"},
	{"-S", "-t", ",,", "-s", "CN=John Doe", "-n", "id-cert", "-c", "fake-smartcard-ca"},
	{"-S", "-t", ",,", "-s", "CN=John Doe (signing)", "--nsCertType", "smime", "-n", "signing-cert", "-c", "fake-smartcard-ca"},
	{"-S", "-t", ",,", "-s", "CN=John Doe (encryption)", "--nsCertType", "sslClient", "-n", "encryption-cert", "-c", "fake-smartcard-ca"},
}

// MakeDB makes a database with Recipe in base/db and returns that
// directory; password "" uses --empty-password. Without certutil the test
// is skipped, unless VSCARD_E2E=1 promises a full setup, when it fails.
func MakeDB(t testing.TB, base, password string) string {
	t.Helper()
	if _, err := exec.LookPath("certutil"); err != nil {
		if os.Getenv("VSCARD_E2E") == "1" {
			t.Fatalf("certutil not found with VSCARD_E2E=1 (scripts/setup installs libnss3-tools): %v", err)
		}
		t.Skipf("certutil not found (libnss3-tools): %v", err)
	}
	dir := filepath.Join(base, "db")
	noise := filepath.Join(base, "noise")
	pwfile := filepath.Join(base, "pw")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(noise, bytes.Repeat([]byte("vscard noise "), 200), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pwfile, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	certutil := func(args ...string) {
		t.Helper()
		cmd := exec.Command("certutil", args...)
		cmd.Stdin = strings.NewReader("")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("certutil %q: %v\n%s", args, err, out)
		}
	}
	db := "sql:" + dir
	if password == "" {
		certutil("-N", "-d", db, "--empty-password")
	} else {
		certutil("-N", "-d", db, "-f", pwfile)
	}
	for i, r := range Recipe {
		if i > 0 {
			// certutil derives the serial number from the clock in steps
			// of 2^19 µs; a script faster than a typing user would get the
			// same issuer and serial twice (SEC_ERROR_REUSED_ISSUER_AND_SERIAL).
			time.Sleep(600 * time.Millisecond)
		}
		args := append([]string{"-d", db}, r...)
		args = append(args, "-z", noise)
		if password != "" {
			args = append(args, "-f", pwfile)
		}
		certutil(args...)
	}
	return dir
}

// Cert reads a certificate the way a user checks it: certutil -L -n NICK -a.
func Cert(t testing.TB, dir, nick string) *x509.Certificate {
	t.Helper()
	out, err := exec.Command("certutil", "-L", "-d", "sql:"+dir, "-n", nick, "-a").Output()
	if err != nil {
		t.Fatalf("certutil -L -n %s -a: %v", nick, err)
	}
	blk, _ := pem.Decode(out)
	if blk == nil {
		t.Fatalf("certutil -L -n %s -a: no PEM in %q", nick, out)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
