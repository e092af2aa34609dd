package nss

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card/cac"
	"github.com/vscard/vscard/token"
)

// This file builds databases with the real NSS tools (Debian
// libnss3-tools), exactly as QEMU's smart card documentation does (issue
// 4), and reads them back.

const testPassword = "vscard db pw"

func pemDER(t *testing.T, b []byte) []byte {
	t.Helper()
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("no PEM block")
	}
	return blk.Bytes
}

// needCertutil skips without certutil, unless VSCARD_E2E=1 requires it.
func needCertutil(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("certutil")
	if err != nil {
		if os.Getenv("VSCARD_E2E") == "1" {
			t.Fatal("certutil not found (install libnss3-tools); VSCARD_E2E=1 requires it")
		}
		t.Skip("certutil not found: install libnss3-tools (scripts/setup) to test against real NSS databases")
	}
	return p
}

var fixtures struct {
	sync.Mutex
	dirs map[bool]string // by password
	errs map[bool]error
}

// recipeDB returns a database made with the QEMU recipe, with the empty
// password or testPassword; the password one also holds an EC P-256 key.
// It is built once per test binary.
func recipeDB(t *testing.T, password bool) string {
	t.Helper()
	certutil := needCertutil(t)
	fixtures.Lock()
	defer fixtures.Unlock()
	if fixtures.dirs == nil {
		fixtures.dirs, fixtures.errs = map[bool]string{}, map[bool]error{}
	}
	if d, ok := fixtures.dirs[password]; ok {
		return d
	}
	if err, ok := fixtures.errs[password]; ok {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "vscard-nss-*")
	if err != nil {
		t.Fatal(err)
	}
	err = buildRecipe(certutil, dir, password)
	if err != nil {
		os.RemoveAll(dir)
		fixtures.errs[password] = err
		t.Fatal(err)
	}
	fixtures.dirs[password] = dir
	return dir
}

func TestMain(m *testing.M) {
	code := m.Run()
	for _, d := range fixtures.dirs {
		os.RemoveAll(d)
	}
	os.Exit(code)
}

func buildRecipe(certutil, dir string, password bool) error {
	db := "sql:" + dir
	noise := filepath.Join(dir, "noise")
	pwfile := filepath.Join(dir, "pwfile")
	buf := make([]byte, 2048)
	rand.Read(buf)
	if err := os.WriteFile(noise, buf, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(pwfile, []byte(testPassword+"\n"), 0o600); err != nil {
		return err
	}
	auth := []string{"--empty-password"}
	if password {
		auth = []string{"-f", pwfile}
	}
	cmds := [][]string{
		append([]string{"-N", "-d", db}, auth...),
		{"-S", "-d", db, "-s", "CN=Fake Smart Card CA", "-x", "-t", "TC,TC,TC", "-n", "fake-smartcard-ca"},
		{"-S", "-d", db, "-t", ",,", "-s", "CN=John Doe", "-n", "id-cert", "-c", "fake-smartcard-ca"},
		{"-S", "-d", db, "-t", ",,", "-s", "CN=John Doe (signing)", "--nsCertType", "smime", "-n", "signing-cert", "-c", "fake-smartcard-ca"},
		{"-S", "-d", db, "-t", ",,", "-s", "CN=John Doe (encryption)", "--nsCertType", "sslClient", "-n", "encryption-cert", "-c", "fake-smartcard-ca"},
	}
	if password {
		cmds = append(cmds, []string{"-S", "-d", db, "-t", ",,", "-k", "ec", "-q", "nistp256", "-s", "CN=John Doe (EC)", "-n", "ec-cert", "-c", "fake-smartcard-ca"})
	}
	for i, args := range cmds {
		if i > 0 {
			// -z: no keyboard entropy prompt; -f: the password (an
			// empty-password database needs none).
			// -m: certutil's default serial is the time in
			// seconds, and two certificates made in one second
			// collide (SEC_ERROR_REUSED_ISSUER_AND_SERIAL).
			args = append(args, "-z", noise, "-m", fmt.Sprint(1000+i))
			if password {
				args = append(args, "-f", pwfile)
			}
		}
		cmd := exec.Command(certutil, args...)
		// Skip NSS's timing probe of the directory (a second per run).
		cmd.Env = append(os.Environ(), "NSS_SDB_USE_CACHE=no")
		if out, err := cmd.CombinedOutput(); err != nil {
			return errors.New("certutil " + args[0] + ": " + err.Error() + ": " + string(out))
		}
	}
	return nil
}

// certutilPEM is `certutil -L -n nick -a`, the certificate as NSS sees it.
func certutilPEM(t *testing.T, dir, nick string) []byte {
	t.Helper()
	out, err := exec.Command(needCertutil(t), "-L", "-d", "sql:"+dir, "-n", nick, "-a").Output()
	if err != nil {
		t.Fatalf("certutil -L -n %s: %v", nick, err)
	}
	return pemDER(t, out)
}

var recipeNicks = []string{"id-cert", "signing-cert", "encryption-cert"}

func TestCertutilRecipe(t *testing.T) {
	for _, password := range []bool{false, true} {
		name := map[bool]string{false: "empty password", true: "password"}[password]
		t.Run(name, func(t *testing.T) {
			dir := recipeDB(t, password)
			db, err := Open("sql:"+dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			want := []string{"fake-smartcard-ca", "id-cert", "signing-cert", "encryption-cert"}
			if password {
				want = append(want, "ec-cert")
			}
			if got := db.Nicknames(); !slices.Equal(got, want) {
				t.Errorf("Nicknames = %q, want %q", got, want)
			}
			if db.NeedsPassword() != password {
				t.Errorf("NeedsPassword = %v", db.NeedsPassword())
			}
			tok, err := db.Token(recipeNicks)
			if err != nil {
				t.Fatal(err)
			}
			for i, cr := range tok.Credentials() {
				if cr.Label != recipeNicks[i] {
					t.Errorf("credential %d is %q", i, cr.Label)
				}
				if der := certutilPEM(t, dir, cr.Label); !slices.Equal(der, cr.Cert.Raw) {
					t.Errorf("%s: certificate differs from certutil -L -a", cr.Label)
				}
			}
			if !password {
				if tok.PIN() != nil {
					t.Fatal("PIN() != nil for an empty-password database")
				}
				for _, cr := range tok.Credentials() {
					checkSign(t, cr)
				}
				return
			}
			checkPasswordToken(t, tok)
		})
	}
}

// checkPasswordToken drives a password database's token: locked keys, a
// wrong password, the right one.
func checkPasswordToken(t *testing.T, tok *Token) {
	pin := tok.PIN()
	if pin == nil {
		t.Fatal("PIN() == nil for a password database")
	}
	cr := tok.Credentials()[0]
	block := make([]byte, cr.Cert.PublicKey.(interface{ Size() int }).Size())
	block[1] = 5
	if _, err := cr.Key.(token.RawRSA).RawRSA(context.Background(), block); !errors.Is(err, ErrLocked) {
		t.Errorf("RawRSA before VERIFY: %v, want ErrLocked", err)
	}
	if _, err := tok.PrivateKeys(); !errors.Is(err, ErrLocked) {
		t.Errorf("PrivateKeys before VERIFY: %v, want ErrLocked", err)
	}
	for i, wrong := range []string{"", "vscard db pW", testPassword + "x"} {
		left, err := pin.Verify([]byte(wrong))
		if !errors.Is(err, token.ErrPINIncorrect) {
			t.Fatalf("Verify(wrong #%d): %v, want ErrPINIncorrect", i, err)
		}
		if left != MaxTries-1-i {
			t.Errorf("tries left %d after %d wrong, want %d", left, i+1, MaxTries-1-i)
		}
	}
	if _, err := cr.Key.(token.RawRSA).RawRSA(context.Background(), block); !errors.Is(err, ErrLocked) {
		t.Errorf("RawRSA after wrong passwords: %v, want ErrLocked", err)
	}
	left, err := pin.Verify([]byte(testPassword))
	if err != nil || left != MaxTries {
		t.Fatalf("Verify(right) = %d, %v", left, err)
	}
	if l, m := pin.TriesLeft(); l != MaxTries || m != MaxTries {
		t.Errorf("TriesLeft = %d, %d", l, m)
	}
	for _, cr := range tok.Credentials() {
		checkSign(t, cr)
	}
	if keys, err := tok.PrivateKeys(); err != nil || len(keys) != len(tok.Credentials()) {
		t.Errorf("PrivateKeys after VERIFY: %d, %v", len(keys), err)
	}
}

// TestPasswordCard runs the password database on a CAC card: VERIFY with
// the database password is the card login (issue 4 §1).
func TestPasswordCard(t *testing.T) {
	dir := recipeDB(t, true)
	db, err := Open("sql:"+dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tok, err := db.Token(recipeNicks)
	if err != nil {
		t.Fatal(err)
	}
	c, err := cac.New(tok, cac.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c.PowerOn()
	ctx := context.Background()
	tx := func(cmd []byte) ([]byte, apdu.SW) {
		t.Helper()
		r, err := c.Transmit(ctx, cmd)
		if err != nil {
			t.Fatal(err)
		}
		data := r[:len(r)-2]
		sw := apdu.SW(uint16(r[len(r)-2])<<8 | uint16(r[len(r)-1]))
		for sw>>8 == 0x61 {
			r, err = c.Transmit(ctx, []byte{0x00, 0xC0, 0x00, 0x00, byte(sw)})
			if err != nil {
				t.Fatal(err)
			}
			data = append(data, r[:len(r)-2]...)
			sw = apdu.SW(uint16(r[len(r)-2])<<8 | uint16(r[len(r)-1]))
		}
		return data, sw
	}
	verify := func(pin string) apdu.SW {
		_, sw := tx(append([]byte{0x00, 0x20, 0x00, 0x00, byte(len(pin))}, pin...))
		return sw
	}
	cert := tok.Credentials()[0].Cert
	pub := cert.PublicKey.(*rsa.PublicKey)
	digest := sha256.Sum256([]byte("card login"))
	block := pkcs1Block(pub, digest[:])
	// SIGN as one extended APDU (cac.md §4.6, as in vectors s6).
	sign := append([]byte{0x80, 0x42, 0x00, 0x00, 0x00, byte(len(block) >> 8), byte(len(block))}, block...)

	if _, sw := tx([]byte{0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x79, 0x01, 0x00, 0x00}); sw != apdu.SWOK {
		t.Fatalf("SELECT PKI: %v", sw)
	}
	if _, sw := tx(sign); sw != apdu.SWConditionsNotSatisfied {
		t.Errorf("SIGN before VERIFY: %v, want 69 85", sw)
	}
	if sw := verify("wrong"); sw != apdu.SWVerifyFailed|apdu.SW(MaxTries-1) {
		t.Errorf("VERIFY wrong: %v, want 63 C%X", sw, MaxTries-1)
	}
	if _, sw := tx(sign); sw != apdu.SWConditionsNotSatisfied {
		t.Errorf("SIGN after a wrong VERIFY: %v, want 69 85", sw)
	}
	if sw := verify(testPassword); sw != apdu.SWOK {
		t.Fatalf("VERIFY right: %v", sw)
	}
	sig, sw := tx(sign)
	if sw != apdu.SWOK {
		t.Fatalf("SIGN after VERIFY: %v", sw)
	}
	if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
		t.Errorf("card signature does not verify: %v", err)
	}
}

func TestECKey(t *testing.T) {
	dir := recipeDB(t, true)
	db, err := Open("sql:"+dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tok, err := db.Token([]string{"ec-cert"})
	if err != nil {
		t.Fatal(err)
	}
	if err := tok.Unlock([]byte("wrong")); !errors.Is(err, token.ErrPINIncorrect) {
		t.Fatalf("Unlock(wrong) = %v", err)
	}
	if err := tok.Unlock([]byte(testPassword)); err != nil {
		t.Fatal(err)
	}
	keys, err := tok.PrivateKeys()
	if err != nil {
		t.Fatal(err)
	}
	k, ok := keys[0].(*ecdsa.PrivateKey)
	if !ok {
		t.Fatalf("key is %T", keys[0])
	}
	cr := tok.Credentials()[0]
	if !k.PublicKey.Equal(cr.Cert.PublicKey) {
		t.Fatal("EC key does not match the certificate")
	}
	digest := sha256.Sum256([]byte("ec"))
	sig, err := cr.Key.Sign(rand.Reader, digest[:], nil)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(cr.Cert.PublicKey.(*ecdsa.PublicKey), digest[:], sig) {
		t.Error("EC signature does not verify")
	}
	// A CAC card refuses it (RSA only).
	if _, err := cac.New(tok, cac.Options{}); err == nil {
		t.Error("cac.New accepted an EC credential")
	}
}

// TestNSSWritesWhileOpen: the database is opened read-only and holds no
// lock between calls, so certutil can keep writing while a card is served
// (issue 4 §1), and a fresh Open sees the change.
func TestNSSWritesWhileOpen(t *testing.T) {
	certutil := needCertutil(t)
	dir := t.TempDir()
	for _, f := range []string{"cert9.db", "key4.db", "pkcs11.txt"} {
		b, err := os.ReadFile(filepath.Join(testDB, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	db, err := Open("sql:"+dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tok, err := db.Token([]string{"cert1"})
	if err != nil {
		t.Fatal(err)
	}
	noise := filepath.Join(t.TempDir(), "noise")
	buf := make([]byte, 2048)
	rand.Read(buf)
	os.WriteFile(noise, buf, 0o600)
	cmd := exec.Command(certutil, "-S", "-d", "sql:"+dir, "-s", "CN=Added While Open", "-x", "-t", ",,", "-n", "added", "-z", noise, "-m", "4242")
	cmd.Env = append(os.Environ(), "NSS_SDB_USE_CACHE=no")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("certutil -S while the database is open: %v\n%s", err, out)
	}
	// The open handle still works...
	if _, err := db.Token([]string{"cert2"}); err != nil {
		t.Errorf("Token after a concurrent write: %v", err)
	}
	checkSign(t, tok.Credentials()[0])
	// ...and a fresh one sees the new certificate and its key.
	db2, err := Open("sql:"+dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db2.Close()
	tok2, err := db2.Token([]string{"added"})
	if err != nil {
		t.Fatal(err)
	}
	checkSign(t, tok2.Credentials()[0])
}

// TestConcurrentVerifyAndSign runs VERIFY and raw RSA at the same time
// (the race detector checks the key hand-over).
func TestConcurrentVerifyAndSign(t *testing.T) {
	dir := recipeDB(t, true)
	db, err := Open("sql:"+dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tok, err := db.Token(recipeNicks)
	if err != nil {
		t.Fatal(err)
	}
	cr := tok.Credentials()[0]
	pub := cr.Cert.PublicKey.(*rsa.PublicKey)
	digest := sha256.Sum256([]byte("concurrent"))
	block := pkcs1Block(pub, digest[:])
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 4 {
		wg.Go(func() {
			for range 5 {
				sig, err := cr.Key.(token.RawRSA).RawRSA(context.Background(), block)
				if errors.Is(err, ErrLocked) {
					continue
				}
				if err != nil {
					errs <- err
					return
				}
				if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Go(func() {
		if _, err := tok.PIN().Verify([]byte(testPassword)); err != nil {
			errs <- err
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if _, err := cr.Key.(token.RawRSA).RawRSA(context.Background(), block); err != nil {
		t.Errorf("RawRSA after VERIFY: %v", err)
	}
}
