// Package nss reads Mozilla NSS sql databases (cert9.db and key4.db) in
// pure Go, so that a database made with certutil, as in QEMU's smart card
// documentation, can back a virtual card the way libcacard's soft cards do.
//
// # Files and tables
//
// An NSS "sql:" database is a directory with cert9.db (one table,
// nssPublic: certificates, public keys, trust), key4.db (nssPrivate:
// private keys; metaData: the password check and integrity MACs) and
// pkcs11.txt (the module list: only used to name the other PKCS#11
// modules, such as SoftHSM, whose keys this package cannot reach). Every row is a PKCS#11
// object whose attribute of type T lives in column "a" + T in lower-case
// hex; CK_ULONG values are 4 bytes big-endian and an empty attribute is
// the sentinel A5 00 5A (shared reference peers.md §6.1). A certificate
// (CKA_CLASS 1) is found by its label (CKA_LABEL, a3: the nickname) and
// linked to its private key (CKA_CLASS 3) by equal CKA_ID (a102).
//
// Both files are opened read-only through modernc.org/sqlite (no cgo),
// never with immutable=1, so NSS may keep writing while a card is served.
// Certificates are read at Open; key rows when a Token is made.
//
// # Encryption
//
// The sensitive key attributes (RSA a123..a128, the EC scalar a11) are
// stored encrypted with the database password (peers.md §6.2):
// PBES2 with PBKDF2 over SHA1(globalSalt || password) and AES-256-CBC
// (NSS ≥ 3.49), or the legacy pbeWithSha1AndTripleDES-CBC. The metaData
// row "password" holds the global salt and an encrypted "password-check"
// string, which tells a right password from a wrong one before any key is
// touched. The integrity MACs (sig_key_*) are not checked: this package
// never writes. PBKDF2 iteration counts above a million (NSS writes 10000)
// are refused so a hostile file cannot stall a card.
//
// # Password semantics
//
// As with libcacard, the database password is the card PIN. A database
// whose password is empty (certutil -N --empty-password, or Enter at the
// prompt) has its keys encrypted under a key derived with one PBKDF2
// iteration from public data: they are effectively unprotected. Its
// Token.PIN is nil, so the card accepts any PIN, and a warning is logged
// once per DB. Otherwise the Token's PIN checks the password; the keys are
// decrypted on the first right password and stay locked (ErrLocked) until
// then.
//
// NSS keeps no retry counter. The Token's PIN has an in-memory counter of
// MaxTries wrong passwords that resets on a right one; it is not
// persistent (a restart resets it) because the real protection of the keys
// is the strength of the database password, which an attacker holding the
// files can attack offline anyway.
package nss

import (
	"bytes"
	"context"
	"crypto/subtle"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	_ "modernc.org/sqlite" // pure-Go sqlite driver "sqlite" (peers.md §6.4)
)

// Options configures Open. A nil *Options is valid.
type Options struct {
	// Logger receives warnings (an empty-password database). Nil
	// discards them.
	Logger *slog.Logger
}

// DB is an open NSS sql database directory.
type DB struct {
	dir      string
	log      *slog.Logger
	certDB   *sql.DB
	keyDB    *sql.DB
	certs    []certRow
	salt     []byte // metaData 'password' item1, the global salt
	check    []byte // metaData 'password' item2, encrypted "password-check"
	needsPW  bool
	warnOnce sync.Once
	modules  []string // other PKCS#11 libraries named in pkcs11.txt
}

// certRow is one certificate object of nssPublic.
type certRow struct {
	label string
	der   []byte
	id    []byte // CKA_ID, nil when absent
}

// passwordCheck is the plaintext of the metaData password entry (§6.2).
const passwordCheck = "password-check"

// dbmHint is the message for old Berkeley DB databases, which this
// package does not read.
const dbmHint = "old dbm: database (cert8.db/key3.db); convert it with: certutil --upgrade-merge --source-dir %[1]s -d sql:%[1]s (or create a new one with certutil -N -d sql:%[1]s)"

// Open opens the NSS database in dir ("sql:DIR" or "DIR") read-only.
// A "dbm:" database, or a directory holding only cert8.db/key3.db, is
// refused with the certutil command that converts it.
func Open(dir string, opts *Options) (*DB, error) {
	var log *slog.Logger
	if opts != nil {
		log = opts.Logger
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	switch {
	case strings.HasPrefix(dir, "sql:"):
		dir = dir[len("sql:"):]
	case strings.HasPrefix(dir, "dbm:"):
		return nil, fmt.Errorf("nss: "+dbmHint, dir[len("dbm:"):])
	case strings.HasPrefix(dir, "extern:"), strings.HasPrefix(dir, "rdb:"), strings.HasPrefix(dir, "multiaccess:"):
		return nil, fmt.Errorf("nss: %q: only sql: databases are supported", dir)
	}
	if dir == "" {
		return nil, errors.New("nss: empty database directory")
	}
	certPath := filepath.Join(dir, "cert9.db")
	keyPath := filepath.Join(dir, "key4.db")
	if _, err := os.Stat(certPath); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			for _, old := range []string{"cert8.db", "key3.db"} {
				if _, err := os.Stat(filepath.Join(dir, old)); err == nil {
					return nil, fmt.Errorf("nss: %s: "+dbmHint, dir, dir)
				}
			}
			return nil, fmt.Errorf("nss: %s: no NSS database here (no cert9.db; create one with certutil -N -d sql:%s)", dir, dir)
		}
		return nil, fmt.Errorf("nss: %w", err)
	}
	if _, err := os.Stat(keyPath); err != nil {
		return nil, fmt.Errorf("nss: %s: cert9.db without key4.db: %w", dir, err)
	}

	db := &DB{dir: dir, log: log, modules: externalModules(filepath.Join(dir, "pkcs11.txt"))}
	var err error
	if db.certDB, err = openRO(certPath); err != nil {
		return nil, err
	}
	if db.keyDB, err = openRO(keyPath); err != nil {
		db.certDB.Close()
		return nil, err
	}
	if err := db.load(); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

// externalModules returns the library= entries of pkcs11.txt other than
// NSS's own (empty) one: keys behind them, e.g. SoftHSM added with modutil,
// are not in key4.db and so not reachable here (peers.md §6.1).
func externalModules(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var libs []string
	for _, line := range strings.Split(string(b), "\n") {
		if lib, ok := strings.CutPrefix(strings.TrimSpace(line), "library="); ok && lib != "" {
			libs = append(libs, lib)
		}
	}
	return libs
}

// openRO opens one sqlite file read-only. mode=ro lets NSS keep writing;
// immutable=1 would make sqlite ignore its locks and changes (§6.4).
func openRO(path string) (*sql.DB, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("nss: %w", err)
	}
	// A URI, so that '?' or '#' in a directory name stay part of the path.
	u := url.URL{Scheme: "file", Path: abs, RawQuery: "mode=ro"}
	db, err := sql.Open("sqlite", u.String())
	if err != nil {
		return nil, fmt.Errorf("nss: open %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

// load reads the password entry and the certificate list.
func (db *DB) load() error {
	ctx := context.Background()
	var item1, item2 any
	err := db.keyDB.QueryRowContext(ctx, `SELECT item1, item2 FROM metaData WHERE id = 'password'`).Scan(&item1, &item2)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("nss: %s: key4.db has no password entry (not initialized? run certutil -N -d sql:%s)", db.dir, db.dir)
	}
	if err != nil {
		return fmt.Errorf("nss: %s: read key4.db password entry: %w", db.dir, err)
	}
	salt, ok1 := item1.([]byte)
	check, ok2 := item2.([]byte)
	if !ok1 || !ok2 || len(check) == 0 {
		return fmt.Errorf("nss: %s: key4.db password entry is malformed", db.dir)
	}
	db.salt = bytes.Clone(salt)
	db.check = bytes.Clone(check)
	switch err := checkPassword(db.salt, db.check, nil); {
	case err == nil:
		db.needsPW = false
	case errors.Is(err, errWrongPassword):
		db.needsPW = true
	default:
		return fmt.Errorf("nss: %s: key4.db password entry: %w", db.dir, err)
	}

	q := fmt.Sprintf(`SELECT %s, %s, %s, %s, %s FROM nssPublic ORDER BY rowid`,
		column(ckaClass), column(ckaCertificateType), column(ckaLabel), column(ckaValue), column(ckaID))
	rows, err := db.certDB.QueryContext(ctx, q)
	if err != nil {
		return fmt.Errorf("nss: %s: read cert9.db: %w", db.dir, err)
	}
	defer rows.Close()
	for rows.Next() {
		var class, ctype, label, value, id any
		if err := rows.Scan(&class, &ctype, &label, &value, &id); err != nil {
			return fmt.Errorf("nss: %s: read cert9.db: %w", db.dir, err)
		}
		cls, ok, err := attrULONG(class)
		if err != nil || !ok || cls != ckoCertificate {
			continue
		}
		if t, ok, err := attrULONG(ctype); err != nil || (ok && t != ckcX509) {
			continue
		}
		der, ok := attrValue(value)
		if !ok {
			continue
		}
		r := certRow{der: bytes.Clone(der)}
		if l, ok := attrValue(label); ok {
			r.label = string(l)
		}
		if v, ok := attrValue(id); ok {
			r.id = bytes.Clone(v)
		}
		db.certs = append(db.certs, r)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("nss: %s: read cert9.db: %w", db.dir, err)
	}
	return nil
}

// errWrongPassword is what checkPassword returns for a wrong password.
var errWrongPassword = errors.New("nss: wrong database password")

// checkPassword decrypts the password-check entry with pw. A wrong
// password gives bad padding or a wrong plaintext; both are
// errWrongPassword. Malformed entries give other errors.
func checkPassword(salt, check, pw []byte) error {
	pt, err := decryptPBE(check, salt, pw, maxIterations)
	if errors.Is(err, errDecrypt) {
		return errWrongPassword
	}
	if err != nil {
		return err
	}
	if subtle.ConstantTimeCompare(pt, []byte(passwordCheck)) != 1 {
		return errWrongPassword
	}
	return nil
}

// Close closes the database. Tokens made from it stay usable: they hold
// their own copy of what they need.
func (db *DB) Close() error {
	var errs []error
	if db.certDB != nil {
		errs = append(errs, db.certDB.Close())
	}
	if db.keyDB != nil {
		errs = append(errs, db.keyDB.Close())
	}
	return errors.Join(errs...)
}

// Nicknames returns the certificate nicknames present, in table order. A
// nickname shared by several certificates (renewals) appears once.
func (db *DB) Nicknames() []string {
	var out []string
	seen := map[string]bool{}
	for _, c := range db.certs {
		if c.label == "" || seen[c.label] {
			continue
		}
		seen[c.label] = true
		out = append(out, c.label)
	}
	return out
}

// NeedsPassword reports whether the key database has a non-empty password.
func (db *DB) NeedsPassword() bool { return db.needsPW }

// quoteList formats names for an error message.
func quoteList(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = strconv.Quote(n)
	}
	return strings.Join(q, ", ")
}
