package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/token"
)

// fastOpts makes cards quickly: RSA-1024 and a cheap PIN hash.
func fastOpts(pin string) Options {
	return Options{PIN: pin, KeyType: "rsa1024", iterations: minIterations}
}

// template caches one created card; tests copy it instead of generating
// keys again (key generation dominates under -race).
var template struct {
	once sync.Once
	dir  string
	err  error
}

const testPIN = "12345678"

// newCard returns a fresh copy of a card made by Create with testPIN.
func newCard(t *testing.T) string {
	t.Helper()
	template.once.Do(func() {
		d, err := os.MkdirTemp("", "store-template-")
		if err != nil {
			template.err = err
			return
		}
		template.dir = filepath.Join(d, "card")
		_, template.err = Create(template.dir, fastOpts(testPIN))
	})
	if template.err != nil {
		t.Fatal(template.err)
	}
	dst := filepath.Join(t.TempDir(), "card")
	if err := os.CopyFS(dst, os.DirFS(template.dir)); err != nil {
		t.Fatal(err)
	}
	// CopyFS makes files 0644/0755-ish; restore the modes Create used.
	if err := filepath.WalkDir(template.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(template.dir, p)
		return os.Chmod(filepath.Join(dst, rel), fi.Mode().Perm())
	}); err != nil {
		t.Fatal(err)
	}
	return dst
}

func TestMain(m *testing.M) {
	code := m.Run()
	if template.dir != "" {
		os.RemoveAll(filepath.Dir(template.dir))
	}
	if pivTemplate.dir != "" {
		os.RemoveAll(filepath.Dir(pivTemplate.dir))
	}
	os.Exit(code)
}

func TestCreate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cards", "john")
	c, err := Create(dir, Options{CN: "Jane Roe", KeyType: "rsa1024", MaxTries: 5, iterations: minIterations})
	if err != nil {
		t.Fatal(err)
	}
	pin := c.GeneratedPIN()
	if len(pin) != 8 || strings.Trim(pin, "0123456789") != "" {
		t.Errorf("generated PIN %q is not 8 digits", pin)
	}
	if err := CheckPIN(pin); err != nil {
		t.Error(err)
	}

	ca := c.CA()
	if ca == nil || ca.Subject.CommonName != "Fake Smart Card CA" || !ca.IsCA || !ca.BasicConstraintsValid {
		t.Fatalf("CA = %+v", ca)
	}
	if ca.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("CA key usage %v", ca.KeyUsage)
	}
	if err := ca.CheckSignatureFrom(ca); err != nil {
		t.Errorf("CA not self-signed: %v", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)

	want := []struct {
		label, cn string
		ku        x509.KeyUsage
		eku       []x509.ExtKeyUsage
		logon     bool
	}{
		{"id", "Jane Roe", x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, true},
		{"signing", "Jane Roe (signing)", x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment, []x509.ExtKeyUsage{x509.ExtKeyUsageEmailProtection}, false},
		{"encryption", "Jane Roe (encryption)", x509.KeyUsageKeyEncipherment | x509.KeyUsageDataEncipherment, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageEmailProtection}, false},
	}
	creds := c.Credentials()
	if len(creds) != len(want) {
		t.Fatalf("%d credentials, want %d", len(creds), len(want))
	}
	serials := map[string]bool{ca.SerialNumber.String(): true}
	for i, w := range want {
		cr := creds[i]
		if cr.Label != w.label || cr.Cert.Subject.CommonName != w.cn {
			t.Errorf("credential %d: label %q CN %q, want %q %q", i, cr.Label, cr.Cert.Subject.CommonName, w.label, w.cn)
		}
		if cr.Cert.KeyUsage != w.ku || !slices.Equal(cr.Cert.ExtKeyUsage, w.eku) {
			t.Errorf("%s: usage %v %v, want %v %v", w.label, cr.Cert.KeyUsage, cr.Cert.ExtKeyUsage, w.ku, w.eku)
		}
		logon := slices.ContainsFunc(cr.Cert.UnknownExtKeyUsage, func(o asn1.ObjectIdentifier) bool { return o.Equal(oidSmartcardLogon) })
		if logon != w.logon {
			t.Errorf("%s: smart card logon EKU = %v, want %v", w.label, logon, w.logon)
		}
		if _, err := cr.Cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("%s: does not chain to the CA: %v", w.label, err)
		}
		if got := KeyDescription(cr.Cert.PublicKey); got != "RSA-1024" {
			t.Errorf("%s: key %s", w.label, got)
		}
		if serials[cr.Cert.SerialNumber.String()] {
			t.Errorf("%s: serial repeated", w.label)
		}
		serials[cr.Cert.SerialNumber.String()] = true
		if d := time.Until(cr.Cert.NotAfter); d < 9*365*24*time.Hour {
			t.Errorf("%s: valid only %v more", w.label, d)
		}
		if cr.Cert.NotBefore.After(time.Now().Add(-time.Hour)) {
			t.Errorf("%s: NotBefore %v leaves no clock skew margin", w.label, cr.Cert.NotBefore)
		}
		raw, ok := cr.Key.(token.RawRSA)
		if !ok {
			t.Fatalf("%s: key %T does not implement token.RawRSA", w.label, cr.Key)
		}
		// A raw private operation must invert the public one.
		blk := make([]byte, 128)
		blk[1] = 1
		out, err := raw.RawRSA(context.Background(), blk)
		if err != nil || len(out) != 128 {
			t.Errorf("%s: RawRSA: %v", w.label, err)
		}
	}
	info := c.Info()
	if info.Type != "cac" || info.CN != "Jane Roe" || len(info.ID) != 16 || info.MaxTries != 5 || info.Version != 1 {
		t.Errorf("Info = %+v", info)
	}
	if left, max := c.PIN().TriesLeft(); left != 5 || max != 5 {
		t.Errorf("TriesLeft = %d, %d", left, max)
	}

	// Modes as created (not chmod afterwards: the umask cannot widen them).
	modes := map[string]fs.FileMode{
		".": 0o700, "card.json": 0o600, "state.json": 0o600, "ca-key.pem": 0o600,
		"id-key.pem": 0o600, "signing-key.pem": 0o600, "encryption-key.pem": 0o600,
	}
	for name, want := range modes {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s: mode %04o, want %04o", name, fi.Mode().Perm(), want)
		}
	}
	// The new parent directory is private too.
	if fi, err := os.Stat(filepath.Dir(dir)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("parent: %v %v", fi.Mode(), err)
	}
	// ca.der and ca.pem hold the same certificate.
	der, err := os.ReadFile(filepath.Join(dir, "ca.der"))
	if err != nil || !bytes.Equal(der, ca.Raw) {
		t.Errorf("ca.der differs from the CA certificate (%v)", err)
	}
	if got := c.CAFiles(); len(got) != 2 {
		t.Errorf("CAFiles = %v", got)
	}
	// No PIN in clear anywhere in the card.
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if d != nil && !d.IsDir() {
			b, _ := os.ReadFile(p)
			if bytes.Contains(b, []byte(pin)) {
				t.Errorf("%s contains the PIN", p)
			}
		}
		return nil
	})
	// No leftover temporary directory beside the card.
	ents, _ := os.ReadDir(filepath.Dir(dir))
	if len(ents) != 1 {
		t.Errorf("parent holds %d entries, want only the card", len(ents))
	}

	// Open gives the same card, without the generated PIN.
	o, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if o.GeneratedPIN() != "" {
		t.Error("Open returned a PIN")
	}
	for i, cr := range o.Credentials() {
		if !cr.Cert.Equal(creds[i].Cert) {
			t.Errorf("credential %d differs after Open", i)
		}
	}
	if _, err := o.PIN().Verify([]byte(pin)); err != nil {
		t.Errorf("generated PIN does not verify: %v", err)
	}

	// Refuses to overwrite.
	if _, err := Create(dir, fastOpts("1234")); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("Create over an existing card: %v", err)
	}
}

func TestKeyBits(t *testing.T) {
	for _, tc := range []struct {
		typ  string
		bits int
	}{
		{"", 2048}, {"rsa2048", 2048}, {"rsa3072", 3072}, {"rsa1024", 1024}, {"RSA2048", 0}, {"ec256", 0},
	} {
		bits, err := keyBits(tc.typ)
		if bits != tc.bits || (err != nil) != (tc.bits == 0) {
			t.Errorf("keyBits(%q) = %d, %v; want %d", tc.typ, bits, err, tc.bits)
		}
	}
	for _, k := range KeyTypes() {
		if _, err := keyBits(k); err != nil {
			t.Errorf("KeyTypes lists %q, which keyBits refuses", k)
		}
	}
}

// TestCreateDefaults makes the default card: RSA-2048 and "John Doe".
// (RSA-3072 generation is left out: it takes tens of seconds under -race.)
func TestCreateDefaults(t *testing.T) {
	c, err := Create(filepath.Join(t.TempDir(), "c"), Options{PIN: "1234", iterations: minIterations})
	if err != nil {
		t.Fatal(err)
	}
	for _, cr := range c.Credentials() {
		if got := KeyDescription(cr.Cert.PublicKey); got != "RSA-2048" {
			t.Errorf("%s key %s, want RSA-2048", cr.Label, got)
		}
	}
	if got := KeyDescription(c.CA().PublicKey); got != "RSA-2048" {
		t.Errorf("CA key %s", got)
	}
	if c.Info().CN != "John Doe" || c.Credentials()[0].Cert.Subject.CommonName != "John Doe" {
		t.Errorf("default CN: %q", c.Info().CN)
	}
	if left, max := c.PIN().TriesLeft(); left != 3 || max != 3 {
		t.Errorf("default tries %d/%d", left, max)
	}
}

func TestCreateErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"key type", Options{KeyType: "rsa512", PIN: "1234"}, "unknown key type"},
		{"short PIN", Options{KeyType: "rsa1024", PIN: "123"}, "4 to 8 characters"},
		{"long PIN", Options{KeyType: "rsa1024", PIN: "123456789"}, "4 to 8 characters"},
		{"FF in PIN", Options{KeyType: "rsa1024", PIN: "1234\xff"}, "printable ASCII"},
		{"NUL in PIN", Options{KeyType: "rsa1024", PIN: "12\x0034"}, "printable ASCII"},
		{"tries", Options{KeyType: "rsa1024", PIN: "1234", MaxTries: 16}, "PIN tries"},
		{"negative tries", Options{KeyType: "rsa1024", PIN: "1234", MaxTries: -1}, "PIN tries"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "c")
			_, err := Create(dir, tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("failed Create left %s behind", dir)
			}
		})
	}
	// An existing empty directory is not overwritten either.
	dir := t.TempDir()
	if _, err := Create(dir, fastOpts("1234")); err == nil || !strings.Contains(err.Error(), "already exists; choose another DIR or remove it") {
		t.Errorf("Create into existing dir: %v", err)
	}
}

func readTries(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		t.Fatal(err)
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	return s.TriesLeft
}

func TestVerifySequence(t *testing.T) {
	type step struct {
		pin    string
		reopen bool // open the card again first, as a restarted serve would
		left   int
		err    error
	}
	ok, bad := testPIN, "87654321"
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"right", []step{{pin: ok, left: 3}}},
		{"wrong then right resets", []step{{pin: bad, left: 2, err: token.ErrPINIncorrect}, {pin: bad, left: 1, err: token.ErrPINIncorrect}, {pin: ok, left: 3}, {pin: bad, left: 2, err: token.ErrPINIncorrect}}},
		{"blocks", []step{{pin: bad, left: 2, err: token.ErrPINIncorrect}, {pin: bad, left: 1, err: token.ErrPINIncorrect}, {pin: bad, left: 0, err: token.ErrPINIncorrect}, {pin: ok, left: 0, err: token.ErrPINBlocked}}},
		{"counter survives reopen", []step{{pin: bad, left: 2, err: token.ErrPINIncorrect}, {pin: bad, reopen: true, left: 1, err: token.ErrPINIncorrect}, {pin: bad, reopen: true, left: 0, err: token.ErrPINIncorrect}, {pin: ok, reopen: true, left: 0, err: token.ErrPINBlocked}}},
		{"too short counts", []step{{pin: "", left: 2, err: token.ErrPINIncorrect}, {pin: "123", left: 1, err: token.ErrPINIncorrect}}},
		{"too long counts", []step{{pin: "123456789", left: 2, err: token.ErrPINIncorrect}}},
		{"prefix is wrong", []step{{pin: "1234567", left: 2, err: token.ErrPINIncorrect}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := newCard(t)
			c, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			for i, s := range tc.steps {
				if s.reopen {
					if c, err = Open(dir); err != nil {
						t.Fatal(err)
					}
				}
				left, err := c.PIN().Verify([]byte(s.pin))
				if left != s.left || !errors.Is(err, s.err) || (s.err == nil) != (err == nil) {
					t.Fatalf("step %d: Verify = %d, %v; want %d, %v", i, left, err, s.left, s.err)
				}
				// Durable before Verify returned.
				if got := readTries(t, dir); got != s.left {
					t.Fatalf("step %d: state.json holds %d, want %d", i, got, s.left)
				}
				if got, max := c.PIN().TriesLeft(); got != s.left || max != 3 {
					t.Fatalf("step %d: TriesLeft = %d/%d", i, got, max)
				}
			}
		})
	}
}

func TestVerifyPaddedPIN(t *testing.T) {
	// CAC VERIFY sends the PIN FF-padded to 8 bytes (cac.md §8.3).
	c, err := Create(filepath.Join(t.TempDir(), "c"), fastOpts("1234"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.PIN().Verify([]byte("1234\xff\xff\xff\xff")); err != nil {
		t.Errorf("padded PIN: %v", err)
	}
	if _, err := c.PIN().Verify([]byte("1234\xff\xff\xff\x00")); !errors.Is(err, token.ErrPINIncorrect) {
		t.Errorf("PIN with NUL: %v", err)
	}
}

// TestVerifyCountsFirst checks that the counter is already decremented on
// disk while the PIN is being compared, even for the right PIN.
func TestVerifyCountsFirst(t *testing.T) {
	dir := newCard(t)
	c, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	var during []int
	c.pin.beforeCompare = func() { during = append(during, readTries(t, dir)) }
	c.PIN().Verify([]byte("00000000"))
	c.PIN().Verify([]byte(testPIN))
	if !slices.Equal(during, []int{2, 1}) {
		t.Errorf("tries on disk during comparison = %v, want [2 1]", during)
	}
	if got := readTries(t, dir); got != 3 {
		t.Errorf("after right PIN: %d", got)
	}
}

func TestVerifyConcurrent(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "c")
	if _, err := Create(dir, Options{PIN: "1234", KeyType: "rsa1024", MaxTries: 15, iterations: minIterations}); err != nil {
		t.Fatal(err)
	}
	// Two Cards on one directory stand for two serve processes: flock
	// locks belong to open file descriptions, so they exclude each other
	// within one process too.
	a, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	const n = 12
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			c := a
			if i%2 == 1 {
				c = b
			}
			if _, err := c.PIN().Verify([]byte("0000")); !errors.Is(err, token.ErrPINIncorrect) {
				t.Errorf("Verify: %v", err)
			}
		})
	}
	wg.Wait()
	if got := readTries(t, dir); got != 15-n {
		t.Errorf("after %d concurrent wrong PINs: %d tries left, want %d (a try was lost)", n, got, 15-n)
	}
}

func TestOpenDamaged(t *testing.T) {
	write := func(name, s string) func(t *testing.T, dir string) {
		return func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	editManifest := func(f func(m map[string]any)) func(t *testing.T, dir string) {
		return func(t *testing.T, dir string) {
			p := filepath.Join(dir, ManifestFile)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			var m map[string]any
			if err := json.Unmarshal(b, &m); err != nil {
				t.Fatal(err)
			}
			f(m)
			b, _ = json.Marshal(m)
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, dir string)
		want   []string // substrings of the error
	}{
		{"manifest not JSON", write("card.json", "{not json"), []string{"card.json", "not valid JSON", "restore"}},
		{"manifest truncated", write("card.json", `{"version":1,"type":"cac"`), []string{"card.json", "not valid JSON"}},
		{"manifest empty", write("card.json", ""), []string{"card.json"}},
		{"unknown version", editManifest(func(m map[string]any) { m["version"] = 2 }), []string{"card.json", "unknown format version 2"}},
		{"unknown type", editManifest(func(m map[string]any) { m["type"] = "piv2" }), []string{"card.json", "unknown card type"}},
		{"path traversal", editManifest(func(m map[string]any) {
			m["credentials"].([]any)[0].(map[string]any)["key"] = "../../etc/shadow"
		}), []string{"card.json", "not a plain name"}},
		{"no credentials", editManifest(func(m map[string]any) { m["credentials"] = []any{} }), []string{"0 credentials"}},
		{"weak iterations", editManifest(func(m map[string]any) { m["pin"].(map[string]any)["iterations"] = 1 }), []string{"iterations"}},
		{"huge iterations", editManifest(func(m map[string]any) { m["pin"].(map[string]any)["iterations"] = 1e12 }), []string{"iterations"}},
		{"unknown PIN alg", editManifest(func(m map[string]any) { m["pin"].(map[string]any)["alg"] = "md5" }), []string{"PIN hash algorithm"}},
		{"manifest missing", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, "card.json")) }, []string{"not a vscard card", "card.json"}},
		{"key missing", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, "id-key.pem")) }, []string{"id-key.pem", "restore"}},
		{"cert missing", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, "signing.pem")) }, []string{"signing.pem"}},
		{"key swapped", func(t *testing.T, dir string) {
			b, _ := os.ReadFile(filepath.Join(dir, "signing-key.pem"))
			write("id-key.pem", string(b))(t, dir)
		}, []string{"id-key.pem", "does not hold the private key of", "id.pem"}},
		{"bad PEM key", write("id-key.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), []string{"id-key.pem"}},
		{"no PEM in key", write("id-key.pem", "garbage"), []string{"id-key.pem", "0 keys"}},
		{"bad cert", write("id.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), []string{"id.pem"}},
		{"state not JSON", write("state.json", "{"), []string{"state.json", "never reset"}},
		{"state missing", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, "state.json")) }, []string{"state.json"}},
		{"state over max", write("state.json", `{"version":1,"tries_left":9}`), []string{"state.json", "out of range"}},
		{"state negative", write("state.json", `{"version":1,"tries_left":-1}`), []string{"state.json", "out of range"}},
		{"state unknown version", write("state.json", `{"version":7,"tries_left":3}`), []string{"state.json", "version"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := newCard(t)
			tc.damage(t, dir)
			before, _ := os.ReadFile(filepath.Join(dir, StateFile))
			_, err := Open(dir)
			if err == nil {
				t.Fatal("Open of a damaged card succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			// Never reset silently.
			after, _ := os.ReadFile(filepath.Join(dir, StateFile))
			if !bytes.Equal(before, after) {
				t.Errorf("state.json changed from %q to %q", before, after)
			}
		})
	}
}

// TestStateDamagedAfterOpen: a counter damaged while serving blocks the PIN
// (fail closed) instead of resetting it.
func TestStateDamagedAfterOpen(t *testing.T) {
	dir := newCard(t)
	c, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, StateFile), []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.PIN().Verify([]byte(testPIN)); err == nil || !strings.Contains(err.Error(), "state.json") {
		t.Errorf("Verify with damaged counter: %v", err)
	}
	if left, _ := c.PIN().TriesLeft(); left != 0 {
		t.Errorf("TriesLeft with damaged counter = %d, want 0", left)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, StateFile)); string(b) != "junk" {
		t.Errorf("state.json rewritten to %q", b)
	}
}

func TestOpenPermissions(t *testing.T) {
	for _, tc := range []struct {
		file string
		mode fs.FileMode
		want string
	}{
		{".", 0o755, "chmod 0700"},
		{".", 0o701, "chmod 0700"},
		{"id-key.pem", 0o640, "chmod 0600"},
		{"encryption-key.pem", 0o604, "chmod 0600"},
		{"ca-key.pem", 0o644, "chmod 0600"},
		{"card.json", 0o644, "chmod 0600"},
		{"state.json", 0o660, "chmod 0600"},
	} {
		t.Run(tc.file+"-"+tc.mode.String(), func(t *testing.T) {
			dir := newCard(t)
			p := filepath.Join(dir, tc.file)
			if err := os.Chmod(p, tc.mode); err != nil {
				t.Fatal(err)
			}
			_, err := Open(dir)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), filepath.Clean(p)) {
				t.Fatalf("Open = %v, want an error naming %s and %q", err, p, tc.want)
			}
			if err := os.Chmod(p, tc.mode&^0o077); err != nil {
				t.Fatal(err)
			}
			if _, err := Open(dir); err != nil {
				t.Errorf("after chmod: %v", err)
			}
		})
	}
}

func TestOpenSymlinkKey(t *testing.T) {
	dir := newCard(t)
	p := filepath.Join(dir, "id-key.pem")
	outside := filepath.Join(t.TempDir(), "k.pem")
	if err := os.Rename(p, outside); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, p); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("Open with symlinked key: %v", err)
	}
}

func TestOpenSymlinkDir(t *testing.T) {
	dir := newCard(t)
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(link); err != nil {
		t.Errorf("Open through a linked card directory: %v", err)
	}
}

func TestGeneratePIN(t *testing.T) {
	// Bytes ≥ 250 are rejected so that digits stay uniform.
	p, err := GeneratePIN(bytes.NewReader([]byte{250, 255, 0, 1, 2, 3, 4, 5, 6, 249}))
	if err != nil || p != "01234569" {
		t.Errorf("GeneratePIN = %q, %v", p, err)
	}
	if _, err := GeneratePIN(bytes.NewReader([]byte{1, 2})); err == nil {
		t.Error("short random source: no error")
	}
}

func TestCreateUnique(t *testing.T) {
	// The certificates' fingerprints differ between two cards: serials and
	// keys are random.
	a, b := newCard(t), filepath.Join(t.TempDir(), "b")
	if _, err := Create(b, fastOpts("1234")); err != nil {
		t.Fatal(err)
	}
	ha, _ := os.ReadFile(filepath.Join(a, "id.pem"))
	hb, _ := os.ReadFile(filepath.Join(b, "id.pem"))
	if sha256.Sum256(ha) == sha256.Sum256(hb) {
		t.Error("two cards share an identity certificate")
	}
}
