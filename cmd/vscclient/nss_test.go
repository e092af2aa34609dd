package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/emuopts"
	"github.com/vscard/vscard/internal/fakehost"
	"github.com/vscard/vscard/internal/nsstest"
)

// nssPassword is the password of the test database made with a password;
// it is the card PIN.
const nssPassword = "nss-pw-4711"

var (
	nssMu  sync.Mutex
	nssDBs = map[string]string{} // password → directory
)

// nssDB makes (once per package run) an NSS database with the issue 4
// recipe; password "" makes it with --empty-password. Without certutil the
// test is skipped, unless VSCARD_E2E=1 promises a full setup.
func nssDB(t *testing.T, password string) string {
	t.Helper()
	if _, err := exec.LookPath("certutil"); err != nil {
		if os.Getenv("VSCARD_E2E") == "1" {
			t.Fatalf("certutil not found with VSCARD_E2E=1 (scripts/setup installs libnss3-tools): %v", err)
		}
		t.Skipf("certutil not found (libnss3-tools): %v", err)
	}
	nssMu.Lock()
	defer nssMu.Unlock()
	if d, ok := nssDBs[password]; ok {
		return d
	}
	base, err := os.MkdirTemp("", "vscclient-nss")
	if err != nil {
		t.Fatal(err)
	}
	dir := nsstest.MakeDB(t, base, password)
	nssDBs[password] = dir
	return dir
}

// TestMain removes the databases and the card store that the package's
// tests share.
func TestMain(m *testing.M) {
	code := m.Run()
	for _, d := range nssDBs {
		os.RemoveAll(filepath.Dir(d))
	}
	if cardDir != "" {
		os.RemoveAll(filepath.Dir(cardDir))
	}
	os.Exit(code)
}

func TestSelectCardNSS(t *testing.T) {
	pw := nssDB(t, nssPassword)
	empty := nssDB(t, "")
	log := slog.New(slog.DiscardHandler)
	old := t.TempDir()
	os.WriteFile(filepath.Join(old, "cert8.db"), []byte("not a dbm file"), 0o600)
	os.WriteFile(filepath.Join(old, "key3.db"), []byte("not a dbm file"), 0o600)
	for _, tc := range []struct {
		emul    string
		labels  []string
		reader  string
		needPIN bool
		err     []string
	}{
		{emul: `db="sql:` + pw + `" use_hw=no soft=(,Test,CAC,,id-cert,signing-cert,encryption-cert)`,
			labels: []string{"id-cert", "signing-cert", "encryption-cert"}, reader: "Test", needPIN: true},
		// Without sql:, and in another order: the card follows soft=(...).
		{emul: `db="` + pw + `" use_hw=no soft=(,Other Reader,CAC,,encryption-cert,id-cert)`,
			labels: []string{"encryption-cert", "id-cert"}, reader: "Other Reader", needPIN: true},
		// vscclient -c signing-cert -c id-cert -e 'db="sql:DIR"'.
		{emul: emulString(&config{certs: []string{"signing-cert", "id-cert"}, emul: `db="sql:` + pw + `"`, emulGiven: true}),
			labels: []string{"signing-cert", "id-cert"}, reader: "Virtual Reader", needPIN: true},
		{emul: `db="sql:` + empty + `" use_hw=no soft=(,Test,CAC,,id-cert,signing-cert,encryption-cert,)`,
			labels: []string{"id-cert", "signing-cert", "encryption-cert"}, reader: "Test"},
		{emul: `db="sql:` + pw + `" use_hw=no soft=(,Test,CAC,,id-cert,nope)`,
			err: []string{"nope", "id-cert", "signing-cert", "encryption-cert", "fake-smartcard-ca"}},
		{emul: `db="sql:` + pw + `" use_hw=no soft=(,Test,CAC,,id-cert,id-cert)`, err: []string{`"id-cert" named twice`}},
		{emul: `db="sql:` + pw + `" use_hw=no soft=(,Test,CAC,,,)`, err: []string{"no certificate nicknames"}},
		{emul: `db="dbm:` + old + `" use_hw=no soft=(,Test,CAC,,id-cert)`, err: []string{old, "certutil"}},
		{emul: `db="` + old + `" use_hw=no soft=(,Test,CAC,,id-cert)`, err: []string{old, "certutil"}},
	} {
		o, err := emuopts.Parse(tc.emul)
		if err != nil {
			t.Fatal(err)
		}
		sc, err := selectCard(o, log)
		if tc.err != nil {
			if err == nil {
				t.Errorf("%s: no error, want %q", tc.emul, tc.err)
				sc.closer.Close()
				continue
			}
			for _, w := range tc.err {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%s: error %q lacks %q", tc.emul, err, w)
				}
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.emul, err)
			continue
		}
		if !reflect.DeepEqual(sc.labels, tc.labels) || sc.reader != tc.reader || (sc.tok.PIN() != nil) != tc.needPIN {
			t.Errorf("%s: labels %q reader %q PIN %v; want %q %q PIN %v", tc.emul, sc.labels, sc.reader, sc.tok.PIN() != nil,
				tc.labels, tc.reader, tc.needPIN)
		}
		sc.closer.Close()
	}
}

// TestSelectCardDefaultDB: without db=, libcacard opens /etc/pki/nssdb.
func TestSelectCardDefaultDB(t *testing.T) {
	o, err := emuopts.Parse(`use_hw=no soft=(,Test,CAC,,id-cert)`)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := selectCard(o, slog.New(slog.DiscardHandler))
	if err == nil {
		sc.closer.Close()
		t.Skip("this machine has a usable id-cert in /etc/pki/nssdb")
	}
	if !strings.Contains(err.Error(), emuopts.DefaultDB) {
		t.Errorf("error %q does not name %s", err, emuopts.DefaultDB)
	}
}

// Card APDUs (cac.md §4): SELECT of the first PKI applet, VERIFY, and
// SIGN of a whole 2048-bit block with an extended Le.
const selPKI0 = "00A4040007A000000079010000"

func verifyAPDU(pin string) []byte {
	return append([]byte{0x00, 0x20, 0x00, 0x00, byte(len(pin))}, pin...)
}

func signAPDU(block []byte) []byte {
	cmd := []byte{0x00, 0x42, 0x00, 0x00, 0x00, byte(len(block) >> 8), byte(len(block))}
	cmd = append(cmd, block...)
	return append(cmd, 0x01, 0x00)
}

// pkcs1Block is the EMSA-PKCS1-v1_5 SHA-256 block a host library hands the
// card for a signature of data.
func pkcs1Block(t *testing.T, n int, data []byte) []byte {
	t.Helper()
	h := sha256.Sum256(data)
	prefix, _ := hex.DecodeString("3031300d060960864801650304020105000420")
	di := append(prefix, h[:]...)
	b := make([]byte, n)
	b[1] = 1
	for i := 2; i < n-len(di)-1; i++ {
		b[i] = 0xFF
	}
	copy(b[n-len(di):], di)
	return b
}

func sw(resp []byte) uint16 {
	if len(resp) < 2 {
		return 0
	}
	return uint16(resp[len(resp)-2])<<8 | uint16(resp[len(resp)-1])
}

// TestSessionNSS serves the issue 4 databases with the exact vscclient
// line of QEMU's documentation to the fake host and uses the card: the
// database password is the PIN, and a signature verifies against the
// certificate certutil shows.
func TestSessionNSS(t *testing.T) {
	for _, tc := range []struct {
		name     string
		password string
	}{
		{"password", nssPassword},
		{"empty-password", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := nssDB(t, tc.password)
			cert := nsstest.Cert(t, dir, "id-cert")
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			host, port, _ := net.SplitHostPort(ln.Addr().String())
			stdinR, stdinW := io.Pipe()
			defer stdinW.Close()
			var stdout, stderr syncBuffer
			done := make(chan int, 1)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go func() {
				done <- run(ctx, []string{"-e", `db="sql:` + dir + `" use_hw=no soft=(,Test,CAC,,id-cert,signing-cert,encryption-cert)`, host, port},
					stdinR, &stdout, &stderr)
			}()
			h := fakehost.Accept(t, ln)
			h.Handshake("Test")
			if got := h.APDU(fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
				t.Errorf("SELECT ACA: % x, want 61 0d", got)
			}
			sel, _ := hex.DecodeString(selPKI0)
			if got := sw(h.APDU(sel)); got>>8 != 0x61 && got != 0x9000 {
				t.Fatalf("SELECT PKI 0: %04X", got)
			}
			data := []byte("signed by the NSS database through vscclient")
			block := pkcs1Block(t, cert.PublicKey.(*rsa.PublicKey).Size(), data)
			if tc.password != "" {
				if got := sw(h.APDU(signAPDU(block))); got != 0x6985 {
					t.Errorf("SIGN before VERIFY: %04X, want 6985", got)
				}
				if got := sw(h.APDU(verifyAPDU("wrong-password"))); got&0xFFF0 != 0x63C0 {
					t.Errorf("VERIFY with a wrong password: %04X, want 63 Cx", got)
				}
				if got := sw(h.APDU(verifyAPDU(tc.password))); got != 0x9000 {
					t.Fatalf("VERIFY with the database password: %04X, want 9000", got)
				}
			} else {
				// libcacard's rule: no password on the database, any PIN.
				if got := sw(h.APDU(verifyAPDU("any PIN at all"))); got != 0x9000 {
					t.Fatalf("VERIFY on an empty-password database: %04X, want 9000", got)
				}
				if !strings.Contains(stderr.String(), "effectively unprotected") {
					t.Errorf("no warning about the empty password in the log:\n%s", stderr.String())
				}
			}
			resp := h.APDU(signAPDU(block))
			if sw(resp) != 0x9000 {
				t.Fatalf("SIGN after VERIFY: %d bytes, SW %04X", len(resp), sw(resp))
			}
			h256 := sha256.Sum256(data)
			if err := rsa.VerifyPKCS1v15(cert.PublicKey.(*rsa.PublicKey), crypto.SHA256, h256[:], resp[:len(resp)-2]); err != nil {
				t.Errorf("the card's signature does not verify with certutil's id-cert: %v", err)
			}
			if strings.Contains(stderr.String(), nssPassword) {
				t.Errorf("the database password appears in the log")
			}
			io.WriteString(stdinW, "exit\n")
			h.Expect(fakehost.TCardRemove)
			h.Expect(fakehost.TReaderRemove)
			select {
			case code := <-done:
				if code != exitOK {
					t.Errorf("exit %d\n%s", code, stderr.String())
				}
			case <-time.After(20 * time.Second):
				t.Fatal("vscclient did not exit")
			}
		})
	}
}
