// Package nss reads Mozilla NSS sql databases (cert9.db and key4.db) in
// pure Go, so that a database made with certutil can back a virtual card
// the way libcacard's soft cards do.
package nss

import (
	"crypto"
	"errors"
	"log/slog"

	"github.com/vscard/vscard/token"
)

// Options configures Open. A nil *Options is valid.
type Options struct {
	// Logger receives warnings (an empty-password database). Nil
	// discards them.
	Logger *slog.Logger
}

// DB is an open NSS sql database directory.
type DB struct{}

// Open opens the NSS database in dir ("sql:DIR" or "DIR") read-only.
func Open(dir string, opts *Options) (*DB, error) {
	return nil, errors.New("nss: not implemented yet")
}

// Close closes the database.
func (db *DB) Close() error { return nil }

// Nicknames returns the certificate nicknames present, in table order.
func (db *DB) Nicknames() []string { return nil }

// NeedsPassword reports whether the key database has a non-empty password.
func (db *DB) NeedsPassword() bool { return false }

// Token returns a token with the certificates chosen by nickname, in the
// given order.
func (db *DB) Token(nicknames []string) (*Token, error) {
	return nil, errors.New("nss: not implemented yet")
}

// Token is a set of NSS credentials; it implements token.Token.
type Token struct{}

var _ token.Token = (*Token)(nil)

// Credentials implements token.Token.
func (t *Token) Credentials() []token.Credential { return nil }

// PIN implements token.Token.
func (t *Token) PIN() token.PIN { return nil }

// Unlock decrypts the keys with the database password.
func (t *Token) Unlock(password []byte) error {
	return errors.New("nss: not implemented yet")
}

// PrivateKeys returns the decrypted private keys in credential order.
func (t *Token) PrivateKeys() ([]crypto.PrivateKey, error) {
	return nil, errors.New("nss: not implemented yet")
}
