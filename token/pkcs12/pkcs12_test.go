package pkcs12

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// needTools skips a test when a tool is missing, unless VSCARD_E2E=1 asks
// for the real-tool tests to run (CI), where a missing tool is a failure.
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

func run(t *testing.T, dir, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// checkBundle checks that b holds the key of the certificate named cn, and
// that the key signs so that the certificate verifies it.
func checkBundle(t *testing.T, b *Bundle, cn string, wantCerts int) {
	t.Helper()
	if len(b.Keys) != 1 {
		t.Fatalf("%d keys, want 1", len(b.Keys))
	}
	if len(b.Certs) != wantCerts {
		t.Fatalf("%d certificates, want %d", len(b.Certs), wantCerts)
	}
	i := slices.IndexFunc(b.Certs, func(c *x509.Certificate) bool { return c.Subject.CommonName == cn })
	if i < 0 {
		t.Fatalf("no certificate CN=%s", cn)
	}
	signer, ok := b.Keys[0].(crypto.Signer)
	if !ok {
		t.Fatalf("key %T is not a signer", b.Keys[0])
	}
	msg := []byte("vscard pkcs12 import")
	sum := sha256.Sum256(msg)
	sig, err := signer.Sign(rand.Reader, sum[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Certs[i].CheckSignature(x509.SHA256WithRSA, msg, sig); err != nil {
		t.Fatalf("signature does not verify with CN=%s: %v", cn, err)
	}
}

func TestDecodePK12UtilFixture(t *testing.T) {
	data, err := os.ReadFile("testdata/pk12util-nss387.p12")
	if err != nil {
		t.Fatal(err)
	}
	b, err := Decode(data, "p12pass")
	if err != nil {
		t.Fatal(err)
	}
	checkBundle(t, b, "John Doe", 2)
	if _, err := Decode(data, "p12pasS"); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("wrong password: %v, want ErrWrongPassword", err)
	}
	if _, err := Decode(data, ""); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("empty password: %v, want ErrWrongPassword", err)
	}
}

// TestBERPathMatchesGoPKCS12 runs this package's own reader (the one for
// BER files) on DER files, which are BER too, and compares with
// go-pkcs12: PBES2/AES-256 with a SHA-256 MAC, and PKCS#12 PBE 3DES with a
// SHA-1 MAC.
func TestBERPathMatchesGoPKCS12(t *testing.T) {
	for _, name := range []string{"openssl-seed-aes.p12", "openssl-seed-3des.p12"} {
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("testdata", name))
			if err != nil {
				t.Fatal(err)
			}
			ref, err := decodeDER(data, "seed")
			if err != nil {
				t.Fatal(err)
			}
			got, err := decodeBER(data, "seed", maxIterations)
			if err != nil {
				t.Fatal(err)
			}
			checkBundle(t, got, "seed", 1)
			if !got.Certs[0].Equal(ref.Certs[0]) {
				t.Fatal("certificates differ")
			}
			if !got.Keys[0].(*rsa.PrivateKey).Equal(ref.Keys[0]) {
				t.Fatal("keys differ")
			}
			if _, err := decodeBER(data, "seeD", maxIterations); !errors.Is(err, ErrWrongPassword) {
				t.Fatalf("wrong password: %v", err)
			}
		})
	}
}

// writeTestPKI writes ca.pem, id.pem and id-key.pem: a CA and a "John Doe"
// certificate it issued.
func writeTestPKI(t *testing.T, dir string) {
	t.Helper()
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Fake Smart Card CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "John Doe"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caTmpl, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("ca.pem", "CERTIFICATE", caDER)
	write("id.pem", "CERTIFICATE", der)
	write("id-key.pem", "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key))
}

// TestDecodeToolFiles imports files made by the real tools now: OpenSSL's
// modern and -legacy (RC2-40) exports, and NSS pk12util from a database
// made with the QEMU documentation's certutil recipe.
func TestDecodeToolFiles(t *testing.T) {
	tests := []struct {
		name  string
		tools []string
		make  func(t *testing.T, dir string) string
	}{
		{"openssl", []string{"openssl"}, func(t *testing.T, dir string) string {
			writeTestPKI(t, dir)
			run(t, dir, "openssl", "pkcs12", "-export", "-in", "id.pem", "-inkey", "id-key.pem", "-certfile", "ca.pem", "-passout", "pass:s3cret", "-out", "out.p12")
			return "out.p12"
		}},
		{"openssl-legacy", []string{"openssl"}, func(t *testing.T, dir string) string {
			writeTestPKI(t, dir)
			run(t, dir, "openssl", "pkcs12", "-export", "-legacy", "-in", "id.pem", "-inkey", "id-key.pem", "-certfile", "ca.pem", "-passout", "pass:s3cret", "-out", "out.p12")
			return "out.p12"
		}},
		{"pk12util", []string{"certutil", "pk12util"}, func(t *testing.T, dir string) string {
			makeNSSRecipeDB(t, dir, "dbpass")
			run(t, dir, "pk12util", "-o", "out.p12", "-n", "id-cert", "-d", "sql:db", "-k", "dbpw", "-W", "s3cret")
			return "out.p12"
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			needTools(t, tt.tools...)
			dir := t.TempDir()
			data, err := os.ReadFile(filepath.Join(dir, tt.make(t, dir)))
			if err != nil {
				t.Fatal(err)
			}
			b, err := Decode(data, "s3cret")
			if err != nil {
				t.Fatal(err)
			}
			checkBundle(t, b, "John Doe", 2)
			if _, err := Decode(data, "S3cret"); !errors.Is(err, ErrWrongPassword) {
				t.Fatalf("wrong password: %v, want ErrWrongPassword", err)
			}
		})
	}
}

// makeNSSRecipeDB makes dir/db with the QEMU documentation's certutil
// recipe (a CA and id-cert it issued) under password pw, kept in
// dir/dbpw. The serials are explicit (-m): certutil derives the default
// serial from the clock in seconds, so a CA and a certificate made within
// one second collide (SEC_ERROR_REUSED_ISSUER_AND_SERIAL).
func makeNSSRecipeDB(t *testing.T, dir, pw string) {
	t.Helper()
	if err := os.Mkdir(filepath.Join(dir, "db"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "dbpw"), []byte(pw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	noise := make([]byte, 2048)
	rand.Read(noise)
	if err := os.WriteFile(filepath.Join(dir, "noise"), noise, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, dir, "certutil", "-N", "-d", "sql:db", "-f", "dbpw")
	run(t, dir, "certutil", "-S", "-d", "sql:db", "-f", "dbpw", "-z", "noise", "-s", "CN=Fake Smart Card CA", "-x", "-t", "TC,TC,TC", "-n", "fake-smartcard-ca", "-m", "1")
	run(t, dir, "certutil", "-S", "-d", "sql:db", "-f", "dbpw", "-z", "noise", "-t", ",,", "-s", "CN=John Doe", "-n", "id-cert", "-c", "fake-smartcard-ca", "-m", "2")
}

// FuzzDecode feeds this package's BER reader (MAC check, decryption, bag
// parsing) arbitrary files. The iteration cap is lowered so the fuzzer
// spends its time on parsing, not on the KDF; the seeds use 2 and 2048
// iterations.
func FuzzDecode(f *testing.F) {
	for _, name := range []string{"openssl-seed-aes.p12", "openssl-seed-3des.p12", "pk12util-nss387.p12"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		der, err := BERToDER(in)
		if err != nil {
			return
		}
		b, err := decodeBER(der, "seed", 4096)
		if err == nil && b == nil {
			t.Fatal("nil bundle without an error")
		}
	})
}

// TestDecodeCertificatesOnly reads an OpenSSL file without a key, which
// go-pkcs12's DecodeChain refuses; the BER reader takes it.
func TestDecodeCertificatesOnly(t *testing.T) {
	needTools(t, "openssl")
	dir := t.TempDir()
	writeTestPKI(t, dir)
	run(t, dir, "openssl", "pkcs12", "-export", "-nokeys", "-in", "id.pem", "-certfile", "ca.pem", "-passout", "pass:s3cret", "-out", "out.p12")
	data, err := os.ReadFile(filepath.Join(dir, "out.p12"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Decode(data, "s3cret")
	if err != nil {
		t.Fatal(err)
	}
	if len(b.Keys) != 0 || len(b.Certs) != 2 {
		t.Fatalf("%d keys, %d certificates; want 0 and 2", len(b.Keys), len(b.Certs))
	}
	if _, err := Decode(data, "x"); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("wrong password: %v", err)
	}
}

// BenchmarkDecodePK12Util times one import of a pk12util file with NSS
// 3.87's defaults: 600000 iterations for the MAC and for each of the two
// PBKDF2 derivations (peers.md §7.1).
func BenchmarkDecodePK12Util(b *testing.B) {
	data, err := os.ReadFile("testdata/pk12util-nss387.p12")
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := Decode(data, "p12pass"); err != nil {
			b.Fatal(err)
		}
	}
}
