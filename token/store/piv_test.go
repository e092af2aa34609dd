package store

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vscard/vscard/token"
)

// fakePersonalize stands in for piv.Personalize (this package cannot
// import card/piv): each certificate's DER under a tag derived from its
// reference, and one CHUID-like object.
func fakePersonalize(st *PIVCard, certs map[byte]*x509.Certificate) error {
	for ref, c := range certs {
		if err := st.PutObject(0x5FC100|uint32(ref), c.Raw); err != nil {
			return err
		}
	}
	return st.PutObject(0x5FC102, []byte{0x30, 0x01, 0x02})
}

func fastPIV() PIVOptions {
	return PIVOptions{KeyType: "p256", iterations: minIterations, Personalize: fakePersonalize}
}

// pivTemplate caches one created PIV card (key generation is slow under
// -race); tests copy it.
var pivTemplate struct {
	once sync.Once
	dir  string
	sec  [3]string
	err  error
}

func newPIV(t *testing.T) (string, string, string) {
	t.Helper()
	pivTemplate.once.Do(func() {
		d, err := os.MkdirTemp("", "vscard-piv-template-")
		if err != nil {
			pivTemplate.err = err
			return
		}
		pivTemplate.dir = filepath.Join(d, "card")
		o := fastPIV()
		o.PIN, o.PUK = "123456", "12345678"
		_, pivTemplate.err = CreatePIV(pivTemplate.dir, o)
	})
	if pivTemplate.err != nil {
		t.Fatal(pivTemplate.err)
	}
	dir := filepath.Join(t.TempDir(), "card")
	copyDir(t, pivTemplate.dir, dir)
	return dir, "123456", "12345678"
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.Mkdir(to, 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := e.Info()
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, fi.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
}

func openPIV(t *testing.T, dir string) *PIVCard {
	t.Helper()
	c, err := OpenPIV(dir, PIVOpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestCreatePIV(t *testing.T) {
	for _, kt := range []string{"p256", "p384", "rsa2048"} {
		t.Run(kt, func(t *testing.T) {
			if kt == "rsa2048" && testing.Short() {
				t.Skip("RSA key generation in -short")
			}
			dir := filepath.Join(t.TempDir(), "sub", "card")
			o := fastPIV()
			o.KeyType = kt
			c, err := CreatePIV(dir, o)
			if err != nil {
				t.Fatal(err)
			}
			pin, puk, mgm := c.GeneratedSecrets()
			if len(pin) != 8 || len(puk) != 8 || len(mgm) != 24 || pin == puk {
				t.Fatalf("generated secrets: PIN %d chars, PUK %d chars, management key %d bytes", len(pin), len(puk), len(mgm))
			}
			if typ, err := Type(dir); err != nil || typ != TypePIV {
				t.Fatalf("Type = %q, %v", typ, err)
			}
			c = openPIV(t, dir)
			if got, want := c.Slots(), []byte{0x9A, 0x9C, 0x9D, 0x9E}; !bytes.Equal(got, want) {
				t.Fatalf("slots %X, want %X", got, want)
			}
			for _, ref := range c.Slots() {
				k, err := c.Key(ref)
				if err != nil {
					t.Fatal(err)
				}
				der, err := c.Object(0x5FC100 | uint32(ref))
				if err != nil {
					t.Fatal(err)
				}
				cert, err := x509.ParseCertificate(der)
				if err != nil {
					t.Fatal(err)
				}
				if !matches(cert, k) {
					t.Errorf("key %02X does not match its certificate", ref)
				}
				if err := cert.CheckSignatureFrom(c.CA()); err != nil {
					t.Errorf("certificate %02X: %v", ref, err)
				}
				switch kt {
				case "rsa2048":
					if _, ok := k.(token.RawRSA); !ok {
						t.Errorf("key %02X (%T) is not token.RawRSA", ref, k)
					}
				default:
					if _, ok := k.(token.ECDH); !ok {
						t.Errorf("key %02X (%T) is not token.ECDH", ref, k)
					}
				}
			}
			if left, max := c.PIN().TriesLeft(); left != 3 || max != 3 {
				t.Errorf("PIN tries %d/%d", left, max)
			}
			if _, err := c.PIN().Verify([]byte(pin)); err != nil {
				t.Errorf("generated PIN: %v", err)
			}
			if _, err := c.PUK().Verify([]byte(puk)); err != nil {
				t.Errorf("generated PUK: %v", err)
			}
			if alg, key, err := c.ManagementKey(); err != nil || alg != MgmAlgTDES || !bytes.Equal(key, mgm) || !distinctDESKeys(key) {
				t.Errorf("management key %02X %x, %v", alg, key, err)
			}
			checkModes(t, dir)
			// Nothing but the card is left in the parent: the temporary
			// build directory was renamed.
			if ents, _ := os.ReadDir(filepath.Dir(dir)); len(ents) != 1 {
				t.Errorf("parent holds %d entries, want 1", len(ents))
			}
		})
	}
}

// checkModes: the directory is 0700 and every file but the public CA
// certificates 0600.
func checkModes(t *testing.T, dir string) {
	t.Helper()
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("%s: mode %o", dir, fi.Mode().Perm())
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		fi, _ := e.Info()
		want := fs.FileMode(0o600)
		if e.Name() == "ca.pem" || e.Name() == "ca.der" {
			want = 0o644
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s: mode %o, want %o", e.Name(), fi.Mode().Perm(), want)
		}
	}
}

func TestCreatePIVOptions(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "card")
	o := fastPIV()
	o.PIN, o.PUK, o.MaxPINTries, o.MaxPUKTries = "2468", "13579135", 5, 2
	o.MgmAlg, o.MgmKey = MgmAlgAES128, bytes.Repeat([]byte{7}, 16)
	c, err := CreatePIV(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	if p, u, m := c.GeneratedSecrets(); p != "" || u != "" || m != nil {
		t.Errorf("secrets given but GeneratedSecrets = %q %q %x", p, u, m)
	}
	if left, max := c.PIN().TriesLeft(); left != 5 || max != 5 {
		t.Errorf("PIN tries %d/%d", left, max)
	}
	if left, max := c.PUK().TriesLeft(); left != 2 || max != 2 {
		t.Errorf("PUK tries %d/%d", left, max)
	}
	if alg, key, _ := c.ManagementKey(); alg != MgmAlgAES128 || !bytes.Equal(key, o.MgmKey) {
		t.Errorf("management key %02X %x", alg, key)
	}

	bad := []struct {
		name string
		mod  func(*PIVOptions)
		want string
	}{
		{"key type", func(o *PIVOptions) { o.KeyType = "rsa1024" }, "unknown PIV key type"},
		{"no personalize", func(o *PIVOptions) { o.Personalize = nil }, "Personalize"},
		{"short PIN", func(o *PIVOptions) { o.PIN = "12" }, "PIN must be"},
		{"PUK tries", func(o *PIVOptions) { o.MaxPUKTries = 16 }, "PUK"},
		{"mgm length", func(o *PIVOptions) { o.MgmAlg, o.MgmKey = MgmAlgAES256, make([]byte, 24) }, "24 bytes, want 32"},
		{"mgm alg", func(o *PIVOptions) { o.MgmAlg, o.MgmKey = 0x99, make([]byte, 24) }, "unknown management key algorithm"},
		{"personalize fails", func(o *PIVOptions) {
			o.Personalize = func(*PIVCard, map[byte]*x509.Certificate) error { return errors.New("boom") }
		}, "boom"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			parent := t.TempDir()
			o := fastPIV()
			tc.mod(&o)
			_, err := CreatePIV(filepath.Join(parent, "card"), o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			// A failed creation leaves nothing behind.
			if ents, _ := os.ReadDir(parent); len(ents) != 0 {
				t.Errorf("left %d entries", len(ents))
			}
		})
	}
	if _, err := CreatePIV(dir, fastPIV()); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("existing dir: %v", err)
	}
}

func TestPIVPersistence(t *testing.T) {
	dir, _, _ := newPIV(t)
	c := openPIV(t, dir)
	if err := c.PutObject(0x5FC109, []byte("printed")); err != nil {
		t.Fatal(err)
	}
	if err := c.PutObject(0x7E, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	rk, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetKey(0x82, rk); err != nil {
		t.Fatal(err)
	}
	ek, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err := c.SetKey(0x9A, token.NewECKey(ek)); err != nil {
		t.Fatal(err)
	}
	mk := bytes.Repeat([]byte{0x11}, 32)
	if err := c.SetManagementKey(MgmAlgAES256, mk); err != nil {
		t.Fatal(err)
	}
	if err := c.PIN().Set([]byte("87654321")); err != nil {
		t.Fatal(err)
	}
	if err := c.PUK().Set([]byte("abcdefgh\xff\xff")[:8]); err != nil {
		t.Fatal(err)
	}

	c2 := openPIV(t, dir)
	if v, err := c2.Object(0x5FC109); err != nil || string(v) != "printed" {
		t.Errorf("object 5FC109 = %q, %v", v, err)
	}
	if v, err := c2.Object(0x7E); err != nil || !bytes.Equal(v, []byte{1, 2, 3}) {
		t.Errorf("object 7E = %x, %v", v, err)
	}
	k, err := c2.Key(0x82)
	if err != nil || !k.Public().(*rsa.PublicKey).Equal(&rk.PublicKey) {
		t.Errorf("key 82: %v", err)
	}
	k, err = c2.Key(0x9A)
	if err != nil || !k.Public().(*ecdsa.PublicKey).Equal(&ek.PublicKey) {
		t.Errorf("key 9A: %v", err)
	}
	if got := c2.Slots(); !bytes.Equal(got, []byte{0x9A, 0x9C, 0x9D, 0x9E, 0x82}) {
		t.Errorf("slots %X", got)
	}
	if alg, key, err := c2.ManagementKey(); err != nil || alg != MgmAlgAES256 || !bytes.Equal(key, mk) {
		t.Errorf("management key %02X %x %v", alg, key, err)
	}
	if _, err := c2.PIN().Verify([]byte("87654321\xff")); err != nil {
		t.Errorf("new PIN (padded): %v", err)
	}
	if _, err := c2.PUK().Verify([]byte("abcdefgh")); err != nil {
		t.Errorf("new PUK: %v", err)
	}
	// The key cache notices a key replaced by another instance (another
	// process serving the card).
	ek2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err := c2.SetKey(0x9A, ek2); err != nil {
		t.Fatal(err)
	}
	if k, err := c.Key(0x9A); err != nil || !k.Public().(*ecdsa.PublicKey).Equal(&ek2.PublicKey) {
		t.Errorf("first instance still sees the old 9A key (%v)", err)
	}
	// Deleting: an empty value removes the object, twice is fine.
	for range 2 {
		if err := c.PutObject(0x5FC109, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := openPIV(t, dir).Object(0x5FC109); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("deleted object: %v", err)
	}
	tags, err := c.Objects()
	if err != nil || !slices.Contains(tags, 0x7E) || slices.Contains(tags, 0x5FC109) {
		t.Errorf("objects %X, %v", tags, err)
	}
	checkModes(t, dir)
}

func TestPIVNotFound(t *testing.T) {
	dir, _, _ := newPIV(t)
	mine := errors.New("mine")
	c, err := OpenPIV(dir, PIVOpenOptions{NotFound: mine})
	if err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"object":     func() error { _, err := c.Object(0x5FC10D); return err }(),
		"tag 0":      func() error { _, err := c.Object(0); return err }(),
		"key":        func() error { _, err := c.Key(0x95); return err }(),
		"key ref 9B": func() error { _, err := c.Key(0x9B); return err }(),
	} {
		if !errors.Is(err, mine) || !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: %v is not the NotFound error", name, err)
		}
	}
	for name, err := range map[string]error{
		"SetKey 9B":   c.SetKey(0x9B, mustEC(t)),
		"SetKey P224": c.SetKey(0x9A, func() *ecdsa.PrivateKey { k, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader); return k }()),
		"big object":  c.PutObject(0x5FC101, make([]byte, maxObjectSize+1)),
		"tag range":   c.PutObject(0x1000000, []byte{1}),
		"mgm":         c.SetManagementKey(MgmAlgTDES, make([]byte, 16)),
		"PIN short":   c.PIN().Set([]byte("12\xff\xff")),
		"PUK long":    c.PUK().Set([]byte("123456789")),
	} {
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func mustEC(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func readPINFile(t *testing.T, dir, name string) state {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestPIVCounters: wrong PINs count down across reopens, the PIN blocks,
// the PUK unblocks it (the card checks the PUK, then sets the PIN), and
// the PUK blocks too.
func TestPIVCounters(t *testing.T) {
	dir, pin, puk := newPIV(t)
	step := func(what string, p func(*PIVCard) token.SettablePIN, value string, wantLeft int, wantErr error) {
		t.Helper()
		// A fresh instance every time: as after a restart of vscard.
		c := openPIV(t, dir)
		left, err := p(c).Verify([]byte(value))
		if !errors.Is(err, wantErr) || (wantErr == nil && err != nil) || left != wantLeft {
			t.Fatalf("%s: left %d, err %v; want %d, %v", what, left, err, wantLeft, wantErr)
		}
		if l, _ := p(openPIV(t, dir)).TriesLeft(); l != wantLeft {
			t.Fatalf("%s: reopened card shows %d tries, want %d", what, l, wantLeft)
		}
	}
	pinOf := func(c *PIVCard) token.SettablePIN { return c.PIN() }
	pukOf := func(c *PIVCard) token.SettablePIN { return c.PUK() }
	step("wrong PIN 1", pinOf, "000000", 2, token.ErrPINIncorrect)
	step("right PIN", pinOf, pin, 3, nil)
	step("wrong PIN 1", pinOf, "000000", 2, token.ErrPINIncorrect)
	step("wrong PIN 2", pinOf, "000000", 1, token.ErrPINIncorrect)
	step("wrong PIN 3", pinOf, "000000", 0, token.ErrPINIncorrect)
	step("blocked, right PIN", pinOf, pin, 0, token.ErrPINBlocked)
	step("wrong PUK", pukOf, "00000000", 2, token.ErrPINIncorrect)
	step("right PUK", pukOf, puk, 3, nil)
	if err := openPIV(t, dir).PIN().Set([]byte("654321")); err != nil {
		t.Fatal(err)
	}
	step("new PIN", pinOf, "654321", 3, nil)
	step("old PIN", pinOf, pin, 2, token.ErrPINIncorrect)
	for i := 2; i >= 0; i-- {
		step("wrong PUK", pukOf, "00000000", i, token.ErrPINIncorrect)
	}
	step("PUK blocked", pukOf, puk, 0, token.ErrPINBlocked)
	// The PIN still has its own counter.
	step("PIN after PUK blocked", pinOf, "654321", 3, nil)
}

// TestPIVCrashBeforeCompare: the counter is durable before the PIN is
// compared, so a process killed then has spent a try even with the right
// PIN; the snapshot taken at that moment is what a restart sees.
func TestPIVCrashBeforeCompare(t *testing.T) {
	for _, which := range []string{PINFile, PUKFile} {
		t.Run(which, func(t *testing.T) {
			dir, pin, puk := newPIV(t)
			c := openPIV(t, dir)
			p, value := c.pin, pin
			if which == PUKFile {
				p, value = c.puk, puk
			}
			crashed := filepath.Join(t.TempDir(), "crashed")
			p.beforeCompare = func() { copyDir(t, dir, crashed) }
			if _, err := p.Verify([]byte(value)); err != nil {
				t.Fatal(err)
			}
			if s := readPINFile(t, crashed, which); s.TriesLeft != 2 {
				t.Fatalf("at compare time the file says %d tries, want 2", s.TriesLeft)
			}
			c2 := openPIV(t, crashed)
			got := c2.PIN()
			if which == PUKFile {
				got = c2.PUK()
			}
			if left, _ := got.TriesLeft(); left != 2 {
				t.Errorf("after the crash %d tries left, want 2", left)
			}
			if left, _ := p.TriesLeft(); left != 3 {
				t.Errorf("without the crash %d tries left, want 3", left)
			}
		})
	}
}

// TestPIVConcurrentVerify: two instances (as two processes) guessing at
// once lose no try.
func TestPIVConcurrentVerify(t *testing.T) {
	dir, _, _ := newPIV(t)
	a, b := openPIV(t, dir), openPIV(t, dir)
	var wg sync.WaitGroup
	for _, c := range []*PIVCard{a, b, a} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.PIN().Verify([]byte("999999"))
		}()
	}
	wg.Wait()
	if left, _ := openPIV(t, dir).PIN().TriesLeft(); left != 0 {
		t.Errorf("%d tries left after 3 concurrent wrong PINs, want 0", left)
	}
}

// TestPIVAtomicWrites: a change replaces the file by rename (a new inode),
// never rewrites it in place, and leaves no temporary file.
func TestPIVAtomicWrites(t *testing.T) {
	dir, _, _ := newPIV(t)
	c := openPIV(t, dir)
	for _, tc := range []struct {
		file string
		do   func() error
	}{
		{objFileName(0x5FC102), func() error { return c.PutObject(0x5FC102, []byte{9}) }},
		{keyFileName(0x9C), func() error { return c.SetKey(0x9C, mustEC(t)) }},
		{MgmFile, func() error { return c.SetManagementKey(MgmAlgAES128, make([]byte, 16)) }},
		{PINFile, func() error { _, err := c.PIN().Verify([]byte("000000")); return err }},
		{PUKFile, func() error { return c.PUK().Set([]byte("11112222")) }},
	} {
		// A reader holding the old file keeps its old content: the new
		// one was renamed over it, not written into it (which a crash
		// could leave half done).
		path := filepath.Join(dir, tc.file)
		before, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := tc.do(); err != nil && !errors.Is(err, token.ErrPINIncorrect) {
			t.Fatal(err)
		}
		old, err := io.ReadAll(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		after, _ := os.ReadFile(path)
		if !bytes.Equal(old, before) || bytes.Equal(after, before) {
			t.Errorf("%s: not replaced by rename (old handle changed: %v, file changed: %v)", tc.file, !bytes.Equal(old, before), !bytes.Equal(after, before))
		}
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("temporary file %s left", e.Name())
		}
	}
}

func TestPIVOpenErrors(t *testing.T) {
	write := func(name, data string) func(t *testing.T, dir string) {
		return func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	chmod := func(name string, mode fs.FileMode) func(t *testing.T, dir string) {
		return func(t *testing.T, dir string) {
			if err := os.Chmod(filepath.Join(dir, name), mode); err != nil {
				t.Fatal(err)
			}
		}
	}
	tests := []struct {
		name string
		mod  func(t *testing.T, dir string)
		want []string
	}{
		{"manifest not JSON", write(ManifestFile, "{"), []string{"card.json", "damaged"}},
		{"manifest version", write(ManifestFile, `{"version":9,"type":"piv"}`), []string{"version 9"}},
		{"manifest type", write(ManifestFile, `{"version":1,"type":"xyz"}`), []string{"unknown card type"}},
		{"manifest unknown field", write(ManifestFile, `{"version":1,"type":"piv","id":"00000000000000000000000000000000","x":1}`), []string{"unknown field"}},
		{"manifest ca path", write(ManifestFile, `{"version":1,"type":"piv","id":"00000000000000000000000000000000","ca":{"cert":"../ca.pem"}}`), []string{"plain name"}},
		{"manifest ca is key", write(ManifestFile, `{"version":1,"type":"piv","id":"00000000000000000000000000000000","ca":{"cert":"key-9a.pem"}}`), []string{"something else"}},
		{"pin not JSON", write(PINFile, "{"), []string{"pin.json", "never reset"}},
		{"pin no hash", write(PINFile, `{"version":1,"tries_left":3}`), []string{"pin.json", "no PIN hash"}},
		{"puk over max", func(t *testing.T, dir string) {
			s := readPINFile(t, dir, PUKFile)
			s.TriesLeft = 9
			b, _ := json.Marshal(s)
			write(PUKFile, string(b))(t, dir)
		}, []string{"puk.json", "out of range"}},
		{"pin missing", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, PINFile)) }, []string{"pin.json"}},
		{"mgm bad length", write(MgmFile, `{"version":1,"alg":10,"key":"0011"}`), []string{"mgm.json", "2 bytes, want 24"}},
		{"mgm not hex", write(MgmFile, `{"version":1,"alg":10,"key":"zz"}`), []string{"mgm.json", "hex"}},
		{"mgm missing", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, MgmFile)) }, []string{"mgm.json"}},
		{"key garbage", write(keyFileName(0x9A), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), []string{"key-9a.pem"}},
		{"key empty", write(keyFileName(0x9C), ""), []string{"key-9c.pem", "0 keys"}},
		{"key unknown ref", write("key-9b.pem", ""), []string{"key-9b.pem", "remove it"}},
		{"object name", write("obj-5FC105", "x"), []string{"obj-5FC105", "remove it"}},
		{"object too big", write(objFileName(0x5FC105), strings.Repeat("x", maxObjectSize+1)), []string{"obj-5fc105", "larger than"}},
		{"dir mode", chmod(".", 0o755), []string{"mode 0755", "chmod 0700"}},
		{"key mode", chmod(keyFileName(0x9D), 0o640), []string{"key-9d.pem", "chmod 0600"}},
		{"pin mode", chmod(PINFile, 0o604), []string{"pin.json", "chmod 0600"}},
		{"mgm mode", chmod(MgmFile, 0o644), []string{"mgm.json", "chmod 0600"}},
		{"object mode", chmod(objFileName(0x5FC102), 0o644), []string{"obj-5fc102", "chmod 0600"}},
		{"manifest mode", chmod(ManifestFile, 0o644), []string{"card.json", "chmod 0600"}},
		{"key symlink", func(t *testing.T, dir string) {
			p := filepath.Join(dir, keyFileName(0x9E))
			os.Rename(p, p+".real")
			os.Symlink(p+".real", p)
		}, []string{"symbolic link"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir, _, _ := newPIV(t)
			tc.mod(t, dir)
			_, err := OpenPIV(dir, PIVOpenOptions{})
			if err == nil {
				t.Fatal("opened")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// TestCardTypes: each Open refuses the other kind, naming it, and Type
// tells them apart.
func TestCardTypes(t *testing.T) {
	pivDir, _, _ := newPIV(t)
	cacDir := newCard(t)
	if _, err := Open(pivDir); !errors.Is(err, ErrWrongType) || !strings.Contains(err.Error(), "PIV card, not a CAC card") {
		t.Errorf("Open(PIV card) = %v", err)
	}
	if _, err := OpenPIV(cacDir, PIVOpenOptions{}); !errors.Is(err, ErrWrongType) || !strings.Contains(err.Error(), "CAC card, not a PIV card") {
		t.Errorf("OpenPIV(CAC card) = %v", err)
	}
	for dir, want := range map[string]string{pivDir: TypePIV, cacDir: TypeCAC} {
		if got, err := Type(dir); err != nil || got != want {
			t.Errorf("Type(%s) = %q, %v; want %q", dir, got, err, want)
		}
	}
	if _, err := Type(filepath.Join(t.TempDir(), "none")); err == nil || !strings.Contains(err.Error(), "vscard card new") {
		t.Errorf("Type(missing) = %v", err)
	}
	if _, err := Type(t.TempDir()); err == nil || !strings.Contains(err.Error(), "not a vscard card") {
		t.Errorf("Type(empty dir) = %v", err)
	}
}

func TestImportPIV(t *testing.T) {
	read := func(n string) []byte {
		b, err := os.ReadFile(filepath.Join("testdata", n))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	rsaCert, rsaKey := read("rsa-pkcs1.crt"), read("rsa-pkcs1.key")
	ecCert, ecKey := read("ec-sec1.crt"), read("ec-sec1.key")
	p8Cert, p8Key := read("rsa-pkcs8.crt"), read("rsa-pkcs8.key")
	o := fastPIV()
	o.CA = read("ca.der")
	dir := filepath.Join(t.TempDir(), "card")
	var got map[byte]*x509.Certificate
	o.Personalize = func(st *PIVCard, certs map[byte]*x509.Certificate) error {
		got = certs
		return fakePersonalize(st, certs)
	}
	c, err := ImportPIV(dir, []PIVSlot{
		{Ref: 0x9A, Certs: [][]byte{rsaCert}, KeyPEM: [][]byte{rsaKey}},
		// A chain (the CA after the leaf) and the key in one file.
		{Ref: 0x9C, Certs: [][]byte{append(slices.Clone(ecCert), read("ca.crt")...)}, KeyPEM: [][]byte{ecKey}},
		{Ref: 0x85, Certs: [][]byte{p8Cert}, KeyPEM: [][]byte{p8Key}},
	}, o)
	if err != nil {
		t.Fatal(err)
	}
	if s := c.Slots(); !bytes.Equal(s, []byte{0x9A, 0x9C, 0x85}) {
		t.Errorf("slots %X", s)
	}
	ecLeaf, err := parseCertPEM(ecCert)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got[0x9C] == nil || !got[0x9C].Equal(ecLeaf[0]) {
		t.Errorf("Personalize got %v; want 9C to be the leaf, not the chain's CA", got)
	}
	if c.CA() == nil || len(c.CAFiles()) != 2 {
		t.Errorf("CA not stored")
	}
	if pin, puk, mgm := c.GeneratedSecrets(); pin == "" || puk == "" || mgm == nil {
		t.Errorf("secrets not generated")
	}
	checkModes(t, dir)

	bad := []struct {
		name  string
		slots []PIVSlot
		want  string
	}{
		{"no slots", nil, "no slots"},
		{"bad ref", []PIVSlot{{Ref: 0x9B, Certs: [][]byte{rsaCert}, KeyPEM: [][]byte{rsaKey}}}, "not a PIV key reference"},
		{"twice", []PIVSlot{{Ref: 0x9A, Certs: [][]byte{rsaCert}, KeyPEM: [][]byte{rsaKey}}, {Ref: 0x9A, Certs: [][]byte{ecCert}, KeyPEM: [][]byte{ecKey}}}, "twice"},
		{"wrong key", []PIVSlot{{Ref: 0x9A, Certs: [][]byte{rsaCert}, KeyPEM: [][]byte{ecKey}}}, "no private key matches"},
		{"extra key", []PIVSlot{{Ref: 0x9A, Certs: [][]byte{rsaCert}, KeyPEM: [][]byte{rsaKey, ecKey}}}, "matches no certificate"},
		{"no cert", []PIVSlot{{Ref: 0x9A, KeyPEM: [][]byte{rsaKey}}}, "no certificate"},
		{"no key", []PIVSlot{{Ref: 0x9A, Certs: [][]byte{rsaCert}}}, "no private key given"},
		{"encrypted", []PIVSlot{{Ref: 0x9A, Certs: [][]byte{rsaCert}, KeyPEM: [][]byte{read("encrypted.key")}}}, "encrypted"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ImportPIV(filepath.Join(t.TempDir(), "card"), tc.slots, fastPIV())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

// Benchmarks of what a PIV command costs the store: a signature's key
// lookup (cached while the file is unchanged), an object read (GET DATA),
// and a durable object write (PUT DATA: temp file, fsync, rename, fsync).
func BenchmarkPIVKey(b *testing.B) {
	dir := filepath.Join(b.TempDir(), "card")
	o := fastPIV()
	o.KeyType = "rsa2048"
	c, err := CreatePIV(dir, o)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := c.Key(0x9A); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkPIVObject(b *testing.B) {
	dir := filepath.Join(b.TempDir(), "card")
	c, err := CreatePIV(dir, fastPIV())
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := c.Object(0x5FC102); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkPIVPutObject(b *testing.B) {
	dir := filepath.Join(b.TempDir(), "card")
	c, err := CreatePIV(dir, fastPIV())
	if err != nil {
		b.Fatal(err)
	}
	v := make([]byte, 1024)
	for b.Loop() {
		if err := c.PutObject(0x5FC109, v); err != nil {
			b.Fatal(err)
		}
	}
}
