package guest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Issue 7's guest acceptance: a PIV card made by `vscard card new --type
// piv` is used by the guest's stock OpenSC (its PIV driver) to sign with
// RSA and with ECDSA, over both of vscard's guest transports:
//
//   - TestGuestPIVConnect: `vscard connect` into QEMU 7.2's usb-ccid +
//     ccid-card-passthru (VSCard; T=0 only, 54-byte quirk);
//   - TestGuestPIVReader: `vscard reader --usbredir` into QEMU's generic
//     usb-redir, with stock libccid driving vscard's own CCID reader.
//
// Each path signs with an RSA-2048 card and with a P-256 card (key 9A,
// OpenSC's id 01; `pkcs11-tool --login --sign`), and the host verifies
// every signature with the certificate the guest read from the card,
// after checking that certificate is the card's own (it is in the card
// directory). The image has no openssl, so verification is on the host.
// One boot per path; the usb-ccid path swaps cards by restarting
// `vscard connect`.

// pivCardName is what `opensc-tool --name` prints when OpenSC's PIV
// driver has claimed the card (card-piv.c's name for a plain PIV card).
const pivCardName = "Personal Identity Verification Card"

// pivCard is a PIV card directory made for a guest test.
type pivCard struct {
	dir string
	alg string // "rsa" or "ec": what the guest script signs with
}

// newPIVCard runs `vscard card new --type piv --key key` with testPIN.
func newPIVCard(t *testing.T, dir, key string) pivCard {
	t.Helper()
	out, err := exec.Command(vscardBin, "card", "new", "--type", "piv", "--key", key, "--pin", testPIN, dir).CombinedOutput()
	if err != nil {
		t.Fatalf("vscard card new --type piv --key %s: %v\n%s", key, err, out)
	}
	alg := "rsa"
	if strings.HasPrefix(key, "p") {
		alg = "ec"
	}
	return pivCard{dir: dir, alg: alg}
}

// pivGuestFiles are the files every PIV guest script reads: the PIN, the
// message and its SHA-256 digest (the image has no openssl to hash with,
// and raw ECDSA signs the digest as given), and the helpers.
func pivGuestFiles(t *testing.T) (map[string][]byte, []byte) {
	t.Helper()
	lib, err := os.ReadFile("testdata/piv-lib.sh")
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 100)
	rand.Read(data)
	h := sha256.Sum256(data)
	return map[string][]byte{
		"/vscard/pin":        []byte(testPIN),
		"/vscard/piv-lib.sh": lib,
		"/vscard/piv-data":   data,
		"/vscard/piv-digest": h[:],
	}, data
}

// pivSigned reads the guest's signature step name and its certificate
// step, checks that the certificate is card's own, and verifies the
// signature over data with it.
func pivSigned(t *testing.T, g *guestSession, name string, c pivCard, data []byte) {
	t.Helper()
	s := g.step(t, name)
	first, rest, _ := strings.Cut(s.Output, "\n")
	var ms, attempts int
	if _, err := fmt.Sscanf(first, "sign_ms=%d attempts=%d", &ms, &attempts); err != nil {
		t.Fatalf("step %s: no sign_ms/attempts line (%v):\n%s", name, err, s.Output)
	}
	sig := decodeB64(t, Section{Name: name, Output: rest})
	der := decodeB64(t, g.step(t, name+"-cert"))
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("the 9A certificate OpenSC read in the guest does not parse: %v", err)
	}
	if err := pivCardHolds(c.dir, der); err != nil {
		t.Errorf("%s: %v", name, err)
	}
	if err := pivVerifySig(cert, c.alg, data, sig); err != nil {
		t.Fatalf("the guest's %s signature does not verify with the card's 9A certificate: %v", name, err)
	}
	// Retries are for a card that is still coming up (after the swap);
	// they are logged so that a card that needs them anyway shows.
	t.Logf("%s: %s signature (%d bytes) from the guest verified with the card's 9A certificate; pkcs11-tool --sign took %d ms in the guest (%s, attempt %d)",
		name, pivKeyName(cert), len(sig), ms, accel, attempts)
	report("GUEST-PIV-SIGN %s %s: %d ms", t.Name(), pivKeyName(cert), ms)
}

// pivKeyName names a certificate's key: "RSA-2048", "ECDSA-P-256".
func pivKeyName(c *x509.Certificate) string {
	switch k := c.PublicKey.(type) {
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA-%d", k.N.BitLen())
	case *ecdsa.PublicKey:
		return "ECDSA-" + k.Curve.Params().Name
	}
	return fmt.Sprintf("%T", c.PublicKey)
}

// pivVerifySig checks a pkcs11-tool signature: SHA256-RSA-PKCS for "rsa";
// for "ec", raw ECDSA over SHA-256(data) in pkcs11-tool's r||s form.
func pivVerifySig(cert *x509.Certificate, alg string, data, sig []byte) error {
	h := sha256.Sum256(data)
	switch pub := cert.PublicKey.(type) {
	case *rsa.PublicKey:
		if alg != "rsa" {
			return fmt.Errorf("the certificate has an RSA key; the card was made with an EC key")
		}
		if len(sig) != pub.Size() {
			return fmt.Errorf("%d-byte signature for a %d-byte modulus", len(sig), pub.Size())
		}
		return rsa.VerifyPKCS1v15(pub, crypto.SHA256, h[:], sig)
	case *ecdsa.PublicKey:
		if alg != "ec" {
			return fmt.Errorf("the certificate has an EC key; the card was made with an RSA key")
		}
		if pub.Curve != elliptic.P256() {
			return fmt.Errorf("curve %s, want P-256", pub.Curve.Params().Name)
		}
		n := (pub.Curve.Params().BitSize + 7) / 8
		if len(sig) != 2*n {
			return fmt.Errorf("%d-byte signature, want r||s of %d bytes", len(sig), 2*n)
		}
		r, s := new(big.Int).SetBytes(sig[:n]), new(big.Int).SetBytes(sig[n:])
		if !ecdsa.Verify(pub, h[:], r, s) {
			return fmt.Errorf("ECDSA signature %X does not verify", sig)
		}
		return nil
	}
	return fmt.Errorf("certificate key %T", cert.PublicKey)
}

// pivCardHolds reports whether the card directory holds the certificate
// der (as DER, inside an object, or as PEM), so the certificate the guest
// verified with is the card's own, whatever the store's file layout.
func pivCardHolds(dir string, der []byte) error {
	found := false
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || found || !d.Type().IsRegular() {
			return err
		}
		if info, err := d.Info(); err != nil || info.Size() > 1<<20 {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if bytes.Contains(b, der) {
			found = true
			return nil
		}
		for rest := b; ; {
			var blk *pem.Block
			if blk, rest = pem.Decode(rest); blk == nil {
				break
			}
			if bytes.Equal(blk.Bytes, der) {
				found = true
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("reading the card directory: %w", err)
	}
	if !found {
		return fmt.Errorf("the certificate OpenSC read in the guest is not in the card directory %s", dir)
	}
	return nil
}

// TestGuestPIVConnect: PIV cards over VSCard into QEMU's usb-ccid. The
// guest signs with an RSA-2048 card; the host quits `vscard connect` and
// starts it with a P-256 card; the guest signs with that.
func TestGuestPIVConnect(t *testing.T) {
	requireGuest(t)
	script, err := os.ReadFile("testdata/piv-connect.sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rsaCard := newPIVCard(t, filepath.Join(dir, "rsa"), "rsa2048")
	ecCard := newPIVCard(t, filepath.Join(dir, "ec"), "p256")
	ctlDir := filepath.Join(dir, "ctl") // a directory only we can enter
	if err := os.Mkdir(ctlDir, 0o700); err != nil {
		t.Fatal(err)
	}
	hostLog := filepath.Join(dir, "host.log")
	target := fmt.Sprintf("tcp:127.0.0.1:%d", freePort(t))
	connect := func(c pivCard, ctl string) *proc {
		return startProc(t, hostLog, false, vscardBin, "connect", "--card", c.dir, "--control", ctl,
			"--no-stdin", "--log-level", "debug", "--trace", filepath.Join(dir, "trace.jsonl"), target)
	}

	cfg := bootConfig(t, target, string(script))
	cfg.Timeout = 6 * time.Minute // about a minute on an idle TCG host
	files, data := pivGuestFiles(t)
	cfg.Files = files
	start := time.Now()
	g := startGuest(t, cfg, hostLog)
	// QEMU's chardev listens from its start (server=on, wait=off);
	// vscard connect retries until it is there.
	conn := connect(rsaCard, filepath.Join(ctlDir, "1.sock"))

	t.Run("rsa2048", func(t *testing.T) {
		out := g.step(t, "card-present").Output
		t.Logf("guest reader and card:\n%s", out)
		if n := strings.Count(out, pivCardName); n != 1 {
			t.Errorf("opensc-tool --name in the guest does not name the card %q", pivCardName)
		}
		pivSigned(t, g, "rsa", rsaCard, data)
	})
	t.Run("p256", func(t *testing.T) {
		g.host(t, "swap", func() {
			out, err := exec.Command(vscardBin, "ctl", "--control", filepath.Join(ctlDir, "1.sock"), "quit").CombinedOutput()
			if err != nil {
				t.Errorf("vscard ctl quit: %v\n%s", err, out)
			}
			if err := conn.wait(10 * time.Second); err != nil {
				t.Errorf("vscard connect after quit: %v", err)
			}
			conn = connect(ecCard, filepath.Join(ctlDir, "2.sock"))
		})
		pivSigned(t, g, "ec", ecCard, data)
	})
	r, err := g.vm.Wait()
	logMarks(t, r)
	if err != nil || r.Status != 0 {
		t.Fatalf("guest: err=%v status=%d", err, r.Status)
	}
	if conn.exited() {
		t.Errorf("vscard connect exited by itself: %v", conn.err)
	}
	t.Logf("TestGuestPIVConnect: guest boot and steps took %v (%s)", time.Since(start).Round(10*time.Millisecond), accel)
}

// TestGuestPIVReader: PIV cards in two slots of `vscard reader`, reached
// through QEMU's usb-redir by the guest's stock libccid; the guest signs
// with the RSA-2048 card in slot 0 and the P-256 card in slot 1.
func TestGuestPIVReader(t *testing.T) {
	requireGuest(t)
	script, err := os.ReadFile("testdata/piv-reader.sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rsaCard := newPIVCard(t, filepath.Join(dir, "rsa"), "rsa2048")
	ecCard := newPIVCard(t, filepath.Join(dir, "ec"), "p256")
	ctlDir := filepath.Join(dir, "ctl")
	if err := os.Mkdir(ctlDir, 0o700); err != nil {
		t.Fatal(err)
	}
	hostLog := filepath.Join(dir, "host.log")
	redir := "unix:" + filepath.Join(dir, "usbredir.sock")

	cfg := bootConfig(t, "", string(script))
	cfg.Timeout = 6 * time.Minute
	cfg.USBRedir = redir
	files, data := pivGuestFiles(t)
	cfg.Files = files
	start := time.Now()
	g := startGuest(t, cfg, hostLog)
	// QEMU makes its listening socket at start; vscard reader dials it
	// (and retries with backoff if it comes first).
	reader := startProc(t, hostLog, false, vscardBin, "reader", "--usbredir", redir,
		"--card", rsaCard.dir, "--card", ecCard.dir, "--control", filepath.Join(ctlDir, "reader.sock"),
		"--no-stdin", "--log-level", "debug", "--trace", filepath.Join(dir, "trace.jsonl"))

	out := g.step(t, "cards-present").Output
	t.Logf("guest readers, card names and PKCS#11 slots:\n%s", out)
	if n := strings.Count(out, pivCardName); n != 2 {
		t.Errorf("opensc-tool --name in the guest names %d of the two cards %q", n, pivCardName)
	}
	t.Run("rsa2048-slot0", func(t *testing.T) { pivSigned(t, g, "rsa", rsaCard, data) })
	t.Run("p256-slot1", func(t *testing.T) { pivSigned(t, g, "ec", ecCard, data) })
	r, err := g.vm.Wait()
	logMarks(t, r)
	if err != nil || r.Status != 0 {
		t.Fatalf("guest: err=%v status=%d", err, r.Status)
	}
	if reader.exited() {
		t.Errorf("vscard reader exited by itself: %v", reader.err)
	}
	t.Logf("TestGuestPIVReader: guest boot and steps took %v (%s)", time.Since(start).Round(10*time.Millisecond), accel)
}

// TestPIVGuestChecks covers the host-side checks of the PIV guest tests
// (no QEMU): signatures in pkcs11-tool's forms verify, tampered or
// mismatched ones do not, and a certificate is found in a card directory
// whichever way it is stored.
func TestPIVGuestChecks(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	certOf := func(k crypto.Signer) *x509.Certificate {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	rsaCert, ecCert, p384Cert := certOf(rsaKey), certOf(ecKey), certOf(p384)
	data := []byte("signed in the guest")
	h := sha256.Sum256(data)
	rsaSig, err := rsa.SignPKCS1v15(rand.Reader, rsaKey, crypto.SHA256, h[:])
	if err != nil {
		t.Fatal(err)
	}
	r, s, err := ecdsa.Sign(rand.Reader, ecKey, h[:])
	if err != nil {
		t.Fatal(err)
	}
	ecSig := append(r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))...)
	flip := func(b []byte) []byte { c := bytes.Clone(b); c[len(c)/2] ^= 1; return c }
	tests := []struct {
		name string
		cert *x509.Certificate
		alg  string
		data []byte
		sig  []byte
		ok   bool
	}{
		{"rsa", rsaCert, "rsa", data, rsaSig, true},
		{"rsa tampered", rsaCert, "rsa", data, flip(rsaSig), false},
		{"rsa other data", rsaCert, "rsa", []byte("other"), rsaSig, false},
		{"rsa short", rsaCert, "rsa", data, rsaSig[1:], false},
		{"rsa cert, ec card", rsaCert, "ec", data, rsaSig, false},
		{"ec r||s", ecCert, "ec", data, ecSig, true},
		{"ec tampered", ecCert, "ec", data, flip(ecSig), false},
		{"ec other data", ecCert, "ec", []byte("other"), ecSig, false},
		{"ec DER form", ecCert, "ec", data, mustASN1(t, r, s), false},
		{"ec cert, rsa card", ecCert, "rsa", data, ecSig, false},
		{"p384 cert", p384Cert, "ec", data, ecSig, false},
	}
	for _, tt := range tests {
		if err := pivVerifySig(tt.cert, tt.alg, tt.data, tt.sig); (err == nil) != tt.ok {
			t.Errorf("%s: pivVerifySig = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}

	der := ecCert.Raw
	pemCert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	object := append([]byte{0x53, 0x82, 0x01, 0x00, 0x70, 0x82, byte(len(der) >> 8), byte(len(der))}, der...)
	for _, tt := range []struct {
		name  string
		files map[string][]byte
		ok    bool
	}{
		{"pem", map[string][]byte{"9a.pem": pemCert}, true},
		{"pem after another", map[string][]byte{"certs.pem": append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rsaCert.Raw}), pemCert...)}, true},
		{"der in an object, nested", map[string][]byte{"objects/5fc105": object}, true},
		{"other certificate", map[string][]byte{"9a.pem": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rsaCert.Raw})}, false},
		{"empty", nil, false},
	} {
		dir := t.TempDir()
		for name, b := range tt.files {
			p := filepath.Join(dir, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := pivCardHolds(dir, der); (err == nil) != tt.ok {
			t.Errorf("%s: pivCardHolds = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func mustASN1(t *testing.T, r, s *big.Int) []byte {
	t.Helper()
	b, err := asn1.Marshal(struct{ R, S *big.Int }{r, s})
	if err != nil {
		t.Fatal(err)
	}
	return b
}
