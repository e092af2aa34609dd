package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/fakehost"
	"github.com/vscard/vscard/internal/nsstest"
)

// connNSSPassword is the password of the test database made with one; it
// is the card PIN.
const connNSSPassword = "connect-nss-pw"

// connNSSDB makes an NSS database with the issue 4 recipe in a temporary
// directory of t; password "" uses --empty-password.
func connNSSDB(t *testing.T, password string) string {
	t.Helper()
	return nsstest.MakeDB(t, t.TempDir(), password)
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
			cert := nsstest.Cert(t, dir, "id-cert")
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
