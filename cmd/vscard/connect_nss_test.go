package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/fakehost"
)

// connNSSPassword is the password of the test database made with one; it
// is the card PIN.
const connNSSPassword = "connect-nss-pw"

// connNSSRecipe is the issue 4 recipe (QEMU's documentation); the test
// adds -z and -f or --empty-password so certutil does not prompt.
var connNSSRecipe = [][]string{
	{"-S", "-s", "CN=Fake Smart Card CA", "-x", "-t", "TC,TC,TC", "-n", "fake-smartcard-ca"},
	{"-S", "-t", ",,", "-s", "CN=John Doe", "-n", "id-cert", "-c", "fake-smartcard-ca"},
	{"-S", "-t", ",,", "-s", "CN=John Doe (signing)", "--nsCertType", "smime", "-n", "signing-cert", "-c", "fake-smartcard-ca"},
	{"-S", "-t", ",,", "-s", "CN=John Doe (encryption)", "--nsCertType", "sslClient", "-n", "encryption-cert", "-c", "fake-smartcard-ca"},
}

// connNSSDB makes an NSS database with the issue 4 recipe in a temporary
// directory of t; password "" uses --empty-password. Without certutil the
// test is skipped, unless VSCARD_E2E=1 promises a full setup.
func connNSSDB(t *testing.T, password string) string {
	t.Helper()
	if _, err := exec.LookPath("certutil"); err != nil {
		if os.Getenv("VSCARD_E2E") == "1" {
			t.Fatalf("certutil not found with VSCARD_E2E=1 (scripts/setup installs libnss3-tools): %v", err)
		}
		t.Skipf("certutil not found (libnss3-tools): %v", err)
	}
	base := t.TempDir()
	dir := filepath.Join(base, "db")
	noise := filepath.Join(base, "noise")
	pwfile := filepath.Join(base, "pw")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(noise, bytes.Repeat([]byte("connect noise "), 200), 0o600); err != nil {
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
	for i, r := range connNSSRecipe {
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

// connNSSCert is what `certutil -L -n NICK -a` shows.
func connNSSCert(t *testing.T, dir, nick string) *x509.Certificate {
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

func connSW(resp []byte) uint16 {
	if len(resp) < 2 {
		return 0
	}
	return uint16(resp[len(resp)-2])<<8 | uint16(resp[len(resp)-1])
}

// TestConnectNSS runs `vscard connect --nss sql:DIR --certs
// id-cert,signing-cert,encryption-cert` against the fake host: the
// database password is the PIN (an empty-password database takes any PIN
// and the log warns), and a SIGN verifies against certutil's id-cert.
func TestConnectNSS(t *testing.T) {
	dbs := map[string]string{connNSSPassword: connNSSDB(t, connNSSPassword), "": connNSSDB(t, "")}
	for _, tc := range []struct {
		name     string
		password string
	}{
		{"password", connNSSPassword},
		{"empty-password", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := dbs[tc.password]
			cert := connNSSCert(t, dir, "id-cert")
			pub := cert.PublicKey.(*rsa.PublicKey)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			var stdout, stderr syncBuffer
			env := &environ{stdin: strings.NewReader(""), stdout: &stdout, stderr: &stderr}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() {
				done <- runConnect(ctx, env, []string{"--nss", "sql:" + dir, "--certs", "id-cert,signing-cert,encryption-cert",
					"--control", shortSocket(t), "--no-stdin", "tcp:" + ln.Addr().String()})
			}()
			h := fakehost.Accept(t, ln)
			h.Handshake("vscard")
			if got := h.APDU(fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
				t.Errorf("SELECT ACA: % x, want 61 0d", got)
			}
			sel, _ := hex.DecodeString("00A4040007A000000079010000") // PKI applet 0 (cac.md §4)
			if got := connSW(h.APDU(sel)); got>>8 != 0x61 && got != 0x9000 {
				t.Fatalf("SELECT PKI 0: %04X", got)
			}
			verify := func(pin string) uint16 {
				return connSW(h.APDU(append([]byte{0x00, 0x20, 0x00, 0x00, byte(len(pin))}, pin...)))
			}
			data := []byte("signed through vscard connect --nss")
			digest := sha256.Sum256(data)
			prefix, _ := hex.DecodeString("3031300d060960864801650304020105000420") // DigestInfo SHA-256
			block := make([]byte, pub.Size())
			block[1] = 1
			di := append(prefix, digest[:]...)
			for i := 2; i < len(block)-len(di)-1; i++ {
				block[i] = 0xFF
			}
			copy(block[len(block)-len(di):], di)
			sign := append([]byte{0x00, 0x42, 0x00, 0x00, 0x00, byte(len(block) >> 8), byte(len(block))}, block...)
			sign = append(sign, 0x01, 0x00)

			if tc.password != "" {
				if got := connSW(h.APDU(sign)); got != 0x6985 {
					t.Errorf("SIGN before VERIFY: %04X, want 6985", got)
				}
				if got := verify("not the password"); got&0xFFF0 != 0x63C0 {
					t.Errorf("VERIFY with a wrong password: %04X, want 63 Cx", got)
				}
				if got := verify(tc.password); got != 0x9000 {
					t.Fatalf("VERIFY with the database password: %04X", got)
				}
			} else {
				if got := verify("1234"); got != 0x9000 {
					t.Fatalf("VERIFY on an empty-password database: %04X, want 9000", got)
				}
				if !strings.Contains(stderr.String(), "effectively unprotected") {
					t.Errorf("no warning about the empty password:\n%s", stderr.String())
				}
			}
			resp := h.APDU(sign)
			if connSW(resp) != 0x9000 {
				t.Fatalf("SIGN after VERIFY: %d bytes, SW %04X", len(resp), connSW(resp))
			}
			if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], resp[:len(resp)-2]); err != nil {
				t.Errorf("signature does not verify with certutil's id-cert: %v", err)
			}
			cancel()
			h.Expect(fakehost.TCardRemove)
			h.Expect(fakehost.TReaderRemove)
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("runConnect: %v\n%s", err, stderr.String())
				}
			case <-time.After(20 * time.Second):
				t.Fatal("runConnect did not return")
			}
			if strings.Contains(stderr.String(), connNSSPassword) {
				t.Error("the database password appears in the log")
			}
		})
	}
	t.Run("errors", func(t *testing.T) { testConnectNSSErrors(t, dbs[connNSSPassword]) })
}

func testConnectNSSErrors(t *testing.T, dir string) {
	old := t.TempDir()
	os.WriteFile(filepath.Join(old, "cert8.db"), []byte("not a dbm file"), 0o600)
	os.WriteFile(filepath.Join(old, "key3.db"), []byte("not a dbm file"), 0o600)
	card := testCard(t)
	for _, tc := range []struct {
		args []string
		code int
		want []string
	}{
		{[]string{"--nss", "sql:" + dir, "tcp:127.0.0.1:1"}, exitUsage, []string{"--nss needs --certs"}},
		{[]string{"--certs", "id-cert", "tcp:127.0.0.1:1"}, exitUsage, []string{"give --nss DIR too"}},
		{[]string{"--nss", "sql:" + dir, "--certs", "id-cert", "--card", card, "tcp:127.0.0.1:1"}, exitUsage, []string{"not both"}},
		{[]string{"--nss", "sql:" + dir, "--certs", ",", "tcp:127.0.0.1:1"}, exitUsage, []string{"names no certificate"}},
		{[]string{"--nss", "sql:" + dir, "--certs", "id-cert,id-cert", "tcp:127.0.0.1:1"}, exitUsage, []string{"twice"}},
		{[]string{"--nss", "sql:" + dir, "--certs", "id-cert,nope", "tcp:127.0.0.1:1"}, exitError,
			[]string{"nope", "id-cert", "signing-cert", "encryption-cert", "fake-smartcard-ca"}},
		{[]string{"--nss", "dbm:" + old, "--certs", "id-cert", "tcp:127.0.0.1:1"}, exitError, []string{"certutil"}},
		{[]string{"--nss", old, "--certs", "id-cert", "tcp:127.0.0.1:1"}, exitError, []string{"certutil"}},
	} {
		var out bytes.Buffer
		args := append([]string{"connect", "--control", shortSocket(t), "--no-stdin"}, tc.args...)
		code := run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out}, args)
		if code != tc.code {
			t.Errorf("%q: exit %d, want %d:\n%s", tc.args, code, tc.code, out.String())
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(out.String(), w) {
				t.Errorf("%q: output lacks %q:\n%s", tc.args, w, out.String())
			}
		}
	}
}
