// Package token is where a card's keys, certificates and PIN come from.
//
// A card personality (card/cac, card/piv) sees a Token: an ordered list of
// credentials (certificate plus private key) and a PIN. The keys are
// crypto.Signer values; RSA keys also implement RawRSA, because CAC and PIV
// cards do a raw private-key operation and leave padding to the host.
//
// Implementations live in subpackages: token/store (vscard's own card
// directory) and, later, NSS databases, PKCS#12/PEM files and physical
// cards. Memory (in this package) holds keys in memory, for tests and
// imports.
package token

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
)

// Errors returned by PIN.Verify. Use errors.Is.
var (
	// ErrPINIncorrect means the PIN was wrong; the retry counter has been
	// decremented and persisted before Verify returned.
	ErrPINIncorrect = errors.New("token: PIN incorrect")
	// ErrPINBlocked means no tries are left; the PIN was not checked.
	ErrPINBlocked = errors.New("token: PIN blocked")
)

// Key is a private key held by a token.
type Key interface {
	crypto.Signer
}

// RawRSA is implemented by RSA keys that can do the textbook private-key
// operation m^d mod n on a block exactly as long as the modulus. CAC SIGN
// and DECRYPT (shared reference cac.md §4.6) need it: the host does all
// padding, so one operation serves PKCS#1 v1.5, PSS, OAEP and raw.
type RawRSA interface {
	RawRSA(ctx context.Context, block []byte) ([]byte, error)
}

// Credential is one certificate and its private key.
type Credential struct {
	// Label is a name for logs and listings (a file name or nickname).
	Label string
	Cert  *x509.Certificate
	Key   Key
}

// PIN is a card's user PIN with its retry counter.
type PIN interface {
	// Verify checks pin. On success the retry counter is reset to its
	// maximum. On a wrong PIN it returns an error wrapping
	// ErrPINIncorrect with the tries left; when no tries are left it
	// returns ErrPINBlocked without checking. Counter changes are durable
	// when Verify returns.
	Verify(pin []byte) (triesLeft int, err error)
	// TriesLeft returns the remaining and maximum tries.
	TriesLeft() (left, max int)
}

// Token is a set of credentials protected by one PIN.
type Token interface {
	// Credentials returns the credentials in card order (the first one is
	// the identity certificate). The slice must not be modified.
	Credentials() []Credential
	// PIN returns the token's PIN, or nil when the token needs no PIN (an
	// NSS database without a password): then any PIN is accepted.
	PIN() PIN
}
