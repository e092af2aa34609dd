package nss

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vscard/vscard/token"
)

// copyDB copies the libcacard test database into a fresh directory.
func copyDB(t testing.TB) string {
	t.Helper()
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
	return dir
}

// execSQL modifies a copied database (the package itself never writes).
func execSQL(t *testing.T, file, stmt string, args ...any) {
	t.Helper()
	db, err := sql.Open("sqlite", file)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	res, err := db.Exec(stmt, args...)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		t.Fatalf("%s: no row changed", stmt)
	}
}

func TestLibcacardDB(t *testing.T) {
	db, err := Open(testDB, nil) // without the sql: prefix
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if got, want := strings.Join(db.Nicknames(), ","), "cert1,cert2,cert3"; got != want {
		t.Errorf("Nicknames = %s, want %s", got, want)
	}
	if db.NeedsPassword() {
		t.Error("NeedsPassword = true for libcacard's empty-password test database")
	}
	// Order is the caller's, not the table's.
	tok, err := db.Token([]string{"cert3", "cert1"})
	if err != nil {
		t.Fatal(err)
	}
	creds := tok.Credentials()
	if len(creds) != 2 || creds[0].Label != "cert3" || creds[1].Label != "cert1" {
		t.Fatalf("credentials %v", creds)
	}
	keys, err := tok.PrivateKeys()
	if err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		rk, ok := k.(*rsa.PrivateKey)
		if !ok {
			t.Fatalf("key %d is %T", i, k)
		}
		if !rk.PublicKey.Equal(creds[i].Cert.PublicKey) {
			t.Errorf("key %d does not match its certificate", i)
		}
	}
	// The golden PEM exported for card/cac is the same certificate.
	pemCert, err := os.ReadFile(filepath.Join("..", "..", "card", "cac", "testdata", "testdb", "cert3.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pemDER(t, pemCert), creds[0].Cert.Raw) {
		t.Error("cert3 differs from card/cac/testdata/testdb/cert3.pem")
	}
	checkSign(t, creds[0])
}

// checkSign signs a digest through RawRSA with PKCS#1 v1.5 padding done
// here, as a CAC host does, and verifies it with the certificate.
func checkSign(t *testing.T, cr token.Credential) {
	t.Helper()
	pub := cr.Cert.PublicKey.(*rsa.PublicKey)
	digest := sha256.Sum256([]byte("vscard token/nss " + cr.Label))
	block := pkcs1Block(pub, digest[:])
	sig, err := cr.Key.(token.RawRSA).RawRSA(context.Background(), block)
	if err != nil {
		t.Fatalf("%s: RawRSA: %v", cr.Label, err)
	}
	if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
		t.Errorf("%s: signature does not verify: %v", cr.Label, err)
	}
	// crypto.Signer too.
	sig, err = cr.Key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("%s: Sign: %v", cr.Label, err)
	}
	if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
		t.Errorf("%s: Sign signature does not verify: %v", cr.Label, err)
	}
}

// pkcs1Block is the EMSA-PKCS1-v1_5 encoding of a SHA-256 digest, the
// block a CAC host sends to SIGN.
func pkcs1Block(pub *rsa.PublicKey, digest []byte) []byte {
	prefix, _ := hex.DecodeString("3031300d060960864801650304020105000420")
	tdata := append(prefix, digest...)
	block := make([]byte, pub.Size())
	block[1] = 1
	for i := 2; i < len(block)-len(tdata)-1; i++ {
		block[i] = 0xFF
	}
	copy(block[len(block)-len(tdata):], tdata)
	return block
}

// countHandler counts warnings.
type countHandler struct {
	mu   sync.Mutex
	warn int
	msgs []string
}

func (h *countHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if r.Level == slog.LevelWarn {
		h.warn++
		h.msgs = append(h.msgs, r.Message)
	}
	return nil
}
func (h *countHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countHandler) WithGroup(string) slog.Handler      { return h }

// TestNicknameChoice covers the token-name prefix and a nickname shared by
// two certificates (a renewal: NSS gives both the same nickname).
func TestNicknameChoice(t *testing.T) {
	dir := copyDB(t)
	// cert2 becomes a second "cert1"; the first cert1 loses its key.
	execSQL(t, filepath.Join(dir, "cert9.db"), "UPDATE nssPublic SET a3 = CAST('cert1' AS BLOB) WHERE a3 = CAST('cert2' AS BLOB)")
	id, _ := hex.DecodeString("D4B333FDBFC33DBFC796B68016EC58FD3E51601A") // cert1's CKA_ID
	execSQL(t, filepath.Join(dir, "key4.db"), "DELETE FROM nssPrivate WHERE a102 = ?", id)
	db, err := Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if got := strings.Join(db.Nicknames(), ","); got != "cert1,cert3" {
		t.Errorf("Nicknames = %s", got)
	}
	tok, err := db.Token([]string{"NSS Certificate DB:cert1", "cert3"})
	if err != nil {
		t.Fatal(err)
	}
	got := tok.Credentials()[0]
	if got.Label != "cert1" || !strings.Contains(got.Cert.Subject.String(), "cert2") {
		t.Errorf("chose %q %s, want the renewal with a key (subject of cert2)", got.Label, got.Cert.Subject)
	}
	checkSign(t, got)
}

func TestEmptyPasswordWarnsOnce(t *testing.T) {
	h := &countHandler{}
	db, err := Open("sql:"+testDB, &Options{Logger: slog.New(h)})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if h.warn != 0 {
		t.Fatalf("warning before any token was made: %v", h.msgs)
	}
	for range 2 {
		tok, err := db.Token([]string{"cert1"})
		if err != nil {
			t.Fatal(err)
		}
		if tok.PIN() != nil {
			t.Fatal("PIN() != nil for an empty-password database")
		}
		// Unlock with any password is accepted, like libcacard.
		if err := tok.Unlock([]byte("anything")); err != nil {
			t.Fatalf("Unlock on an empty-password database: %v", err)
		}
	}
	if h.warn != 1 || !strings.Contains(h.msgs[0], "unprotected") {
		t.Errorf("warnings %d %q, want one about unprotected keys", h.warn, h.msgs)
	}
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T) string // returns the Open argument
		nicks []string
		want  []string // substrings of the error
	}{
		{
			name:  "unknown nickname lists present ones",
			setup: func(t *testing.T) string { return testDB },
			nicks: []string{"cert1", "id-cert"},
			want:  []string{`"id-cert"`, `"cert1", "cert2", "cert3"`},
		},
		{
			name:  "no nicknames",
			setup: func(t *testing.T) string { return testDB },
			nicks: []string{},
			want:  []string{"no certificate nicknames", `"cert1"`},
		},
		{
			name:  "dbm prefix",
			setup: func(t *testing.T) string { return "dbm:/some/dir" },
			want:  []string{"certutil --upgrade-merge --source-dir /some/dir -d sql:/some/dir", "certutil -N -d sql:/some/dir"},
		},
		{
			name: "only cert8.db and key3.db",
			setup: func(t *testing.T) string {
				dir := t.TempDir()
				for _, f := range []string{"cert8.db", "key3.db", "secmod.db"} {
					if err := os.WriteFile(filepath.Join(dir, f), []byte("old"), 0o644); err != nil {
						t.Fatal(err)
					}
				}
				return "sql:" + dir
			},
			want: []string{"old dbm: database", "certutil --upgrade-merge"},
		},
		{
			name:  "empty directory",
			setup: func(t *testing.T) string { return t.TempDir() },
			want:  []string{"no cert9.db", "certutil -N"},
		},
		{
			name: "no key4.db",
			setup: func(t *testing.T) string {
				dir := copyDB(t)
				os.Remove(filepath.Join(dir, "key4.db"))
				return dir
			},
			want: []string{"without key4.db"},
		},
		{
			name: "certificate without private key",
			setup: func(t *testing.T) string {
				dir := copyDB(t)
				id, _ := hex.DecodeString("4CB2ADFFD8CF4A51DC85C8E41BEA2767EE645D1D") // cert2's CKA_ID
				execSQL(t, filepath.Join(dir, "key4.db"), "DELETE FROM nssPrivate WHERE a102 = ?", id)
				return dir
			},
			nicks: []string{"cert1", "cert2"},
			want:  []string{`"cert2" has no private key`},
		},
		{
			name: "key in a SoftHSM module",
			setup: func(t *testing.T) string {
				dir := copyDB(t)
				id, _ := hex.DecodeString("4CB2ADFFD8CF4A51DC85C8E41BEA2767EE645D1D") // cert2's CKA_ID
				execSQL(t, filepath.Join(dir, "key4.db"), "DELETE FROM nssPrivate WHERE a102 = ?", id)
				f, err := os.OpenFile(filepath.Join(dir, "pkcs11.txt"), os.O_APPEND|os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				f.WriteString("\nlibrary=/usr/lib/softhsm/libsofthsm2.so\nname=SoftHSM PKCS#11\n")
				return dir
			},
			nicks: []string{"cert2"},
			want:  []string{`"cert2" has no private key`, `"/usr/lib/softhsm/libsofthsm2.so"`},
		},
		{
			name: "corrupted private attribute",
			setup: func(t *testing.T) string {
				dir := copyDB(t)
				// Flip the last ciphertext byte of cert1's private
				// exponent: bad padding (or, 1 in 256, a wrong value
				// that fails Validate).
				execSQL(t, filepath.Join(dir, "key4.db"),
					"UPDATE nssPrivate SET a123 = substr(a123, 1, length(a123)-1) || x'00' WHERE id = 555161895")
				return dir
			},
			nicks: []string{"cert1"},
			want:  []string{`private key of "cert1"`, "a123"},
		},
		{
			name: "malformed private attribute",
			setup: func(t *testing.T) string {
				dir := copyDB(t)
				execSQL(t, filepath.Join(dir, "key4.db"), "UPDATE nssPrivate SET a124 = x'3003020101' WHERE id = 555161895")
				return dir
			},
			nicks: []string{"cert1"},
			want:  []string{`private key of "cert1"`, "a124"},
		},
		{
			name: "corrupted password check",
			setup: func(t *testing.T) string {
				dir := copyDB(t)
				execSQL(t, filepath.Join(dir, "key4.db"), "UPDATE metaData SET item2 = x'0102' WHERE id = 'password'")
				return dir
			},
			want: []string{"password entry"},
		},
		{
			name: "missing password entry",
			setup: func(t *testing.T) string {
				dir := copyDB(t)
				execSQL(t, filepath.Join(dir, "key4.db"), "DELETE FROM metaData WHERE id = 'password'")
				return dir
			},
			want: []string{"no password entry"},
		},
		{
			name: "key of another certificate",
			setup: func(t *testing.T) string {
				dir := copyDB(t)
				id, _ := hex.DecodeString("D4B333FDBFC33DBFC796B68016EC58FD3E51601A") // cert1's key
				execSQL(t, filepath.Join(dir, "cert9.db"), "UPDATE nssPublic SET a102 = ? WHERE a3 = CAST('cert2' AS BLOB)", id)
				return dir
			},
			nicks: []string{"cert2"},
			want:  []string{"does not match the certificate"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			db, err := Open(tt.setup(t), nil)
			if err == nil {
				defer db.Close()
				if tt.nicks == nil {
					t.Fatal("Open succeeded")
				}
				_, err = db.Token(tt.nicks)
			}
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// TestTruncatedAndCorrupted damages copies of the database files: every
// case must give an error, never a panic.
func TestTruncatedAndCorrupted(t *testing.T) {
	type damage struct {
		name string
		file string
		do   func(b []byte) []byte
	}
	var tests []damage
	for _, f := range []string{"key4.db", "cert9.db"} {
		for _, n := range []int{0, 1, 100, 4096, 8192, 20000} {
			tests = append(tests, damage{name: "truncate " + f, file: f, do: func(b []byte) []byte { return b[:min(n, len(b))] }})
		}
		tests = append(tests, damage{name: "FF second half " + f, file: f, do: func(b []byte) []byte {
			for i := len(b) / 2; i < len(b); i++ {
				b[i] = 0xFF
			}
			return b
		}})
		tests = append(tests, damage{name: "zero header " + f, file: f, do: func(b []byte) []byte {
			clear(b[:100])
			return b
		}})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := copyDB(t)
			path := filepath.Join(dir, tt.file)
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, tt.do(b), 0o644); err != nil {
				t.Fatal(err)
			}
			db, err := Open(dir, nil)
			if err == nil {
				defer db.Close()
				_, err = db.Token([]string{"cert1", "cert2", "cert3"})
			}
			if err == nil {
				t.Fatal("damaged database opened and loaded without error")
			}
			t.Log(err)
		})
	}
}

func TestPBE(t *testing.T) {
	// libcacard's password-check entry (empty password, 1 iteration).
	db, err := Open(testDB, nil)
	if err != nil {
		t.Fatal(err)
	}
	salt, check := db.salt, db.check
	db.Close()
	legacy := readVector(t, filepath.Join("testdata", "legacy3des.txt"))

	tests := []struct {
		name             string
		blob, salt, pw   []byte
		want             string
		wantErr, wrongPW bool
	}{
		{name: "PBES2 password check", blob: check, salt: salt, want: passwordCheck},
		{name: "PBES2 wrong password", blob: check, salt: salt, pw: []byte("x"), wantErr: true, wrongPW: true},
		{name: "PBES2 wrong salt", blob: check, salt: []byte("salt"), wantErr: true, wrongPW: true},
		{name: "legacy 3DES", blob: legacy["blob"], salt: legacy["globalsalt"], pw: legacy["password"], want: string(legacy["plaintext"])},
		{name: "legacy 3DES wrong password", blob: legacy["blob"], salt: legacy["globalsalt"], pw: []byte("legacy pX"), wantErr: true, wrongPW: true},
		{name: "trailing data", blob: append(bytes.Clone(check), 0), salt: salt, wantErr: true},
		{name: "truncated", blob: check[:len(check)-1], salt: salt, wantErr: true},
		{name: "empty", blob: nil, salt: salt, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decryptPBE(tt.blob, tt.salt, tt.pw, maxIterations)
			if tt.wantErr {
				// A wrong key can, 1 time in 256, give valid padding;
				// the password check then compares the plaintext.
				if err == nil && string(got) == tt.want {
					t.Fatalf("decrypted with the wrong input: %q", got)
				}
				if tt.wrongPW && err != nil && !errors.Is(err, errDecrypt) {
					t.Errorf("wrong password gave %v, want errDecrypt", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Errorf("plaintext %q, want %q", got, tt.want)
			}
		})
	}
	// An iteration count above the limit is refused before any work.
	if _, err := decryptPBE(check, salt, nil, 0); err == nil || !strings.Contains(err.Error(), "iteration") {
		t.Errorf("iteration limit: %v", err)
	}
}

// readVector reads "name hex" lines.
func readVector(t *testing.T, path string) map[string][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]byte{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), " ")
		if !ok || strings.HasPrefix(k, "#") {
			continue
		}
		if m[k], err = hex.DecodeString(v); err != nil {
			t.Fatalf("%s: %s: %v", path, k, err)
		}
	}
	return m
}

func TestAttrValue(t *testing.T) {
	tests := []struct {
		in     any
		want   []byte
		ok     bool
		ulong  uint32
		ulOK   bool
		ulFail bool
	}{
		{in: nil},
		{in: int64(5)},
		{in: []byte{0xA5, 0x00, 0x5A}},
		{in: []byte{}, want: []byte{}, ok: true, ulFail: true},
		{in: []byte{0, 0, 0, 3}, want: []byte{0, 0, 0, 3}, ok: true, ulong: 3, ulOK: true},
		{in: []byte{0xCE, 0x53, 0x43, 0x53}, want: []byte{0xCE, 0x53, 0x43, 0x53}, ok: true, ulong: 0xCE534353, ulOK: true},
		{in: "cert1", want: []byte("cert1"), ok: true, ulFail: true},
		{in: []byte{0xA5, 0x00, 0x5A, 0x00}, want: []byte{0xA5, 0x00, 0x5A, 0x00}, ok: true, ulong: 0xA5005A00, ulOK: true},
		{in: []byte{0, 0, 0, 0, 1}, want: []byte{0, 0, 0, 0, 1}, ok: true, ulFail: true},
	}
	for i, tt := range tests {
		got, ok := attrValue(tt.in)
		if ok != tt.ok || !bytes.Equal(got, tt.want) {
			t.Errorf("%d: attrValue(%v) = %x, %v; want %x, %v", i, tt.in, got, ok, tt.want, tt.ok)
		}
		ul, ulOK, err := attrULONG(tt.in)
		if (err != nil) != tt.ulFail || ul != tt.ulong || ulOK != tt.ulOK {
			t.Errorf("%d: attrULONG(%v) = %#x, %v, %v", i, tt.in, ul, ulOK, err)
		}
	}
}

// BenchmarkOpenLoad measures what a card start costs: open the database
// (a fresh sqlite handle each time) and load a three-certificate token.
func BenchmarkOpenLoad(b *testing.B) {
	for b.Loop() {
		db, err := Open("sql:"+testDB, nil)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := db.Token([]string{"cert1", "cert2", "cert3"}); err != nil {
			b.Fatal(err)
		}
		db.Close()
	}
}
