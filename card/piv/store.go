package piv

import (
	"crypto"
	"errors"

	"github.com/vscard/vscard/token"
)

// ErrNotFound is returned by a Store for an object or key that does not
// exist. Use errors.Is.
var ErrNotFound = errors.New("piv: not found")

// Store is where a PIV card keeps everything that survives a restart: its
// data objects, private keys, PIN, PUK and card management key. The card
// itself holds only volatile state (selected applet, verified PIN,
// chaining buffers, a pending management-key challenge).
//
// Every method that changes state is durable when it returns (temporary
// file, fsync, rename): the card answers 90 00 only after that, so a
// killed process never loses a key a tool generated or an object it
// wrote, and never gains a PIN try.
//
// The interface uses only standard and token types, so token/store
// implements it without importing this package. Implementations must be
// safe for concurrent use.
type Store interface {
	// Object returns the value of a data object: the content of its
	// 53 template (for Discovery, 7E's content), keyed by the object's
	// BER tag as a number (0x5FC102 for the CHUID, 0x7E for Discovery).
	// A missing object is ErrNotFound.
	Object(tag uint32) ([]byte, error)
	// PutObject stores value as the object's content; an empty value
	// deletes the object, as PUT DATA with an empty 53 does.
	PutObject(tag uint32, value []byte) error

	// Key returns the private key in a key reference (9A, 9C, 9D, 9E,
	// 82–95). RSA keys implement token.RawRSA; EC keys implement
	// token.ECDH. An empty slot is ErrNotFound.
	Key(ref byte) (token.Key, error)
	// SetKey stores a private key (*rsa.PrivateKey or *ecdsa.PrivateKey)
	// in a key reference, replacing any key there: GENERATE ASYMMETRIC
	// KEY PAIR and imports use it.
	SetKey(ref byte, key crypto.Signer) error

	// PIN is the card's PIV application PIN (key reference 80); PUK is
	// its unblocking key (81). Their retry counters are persistent.
	PIN() token.SettablePIN
	PUK() token.SettablePIN

	// ManagementKey returns the card management key (reference 9B): its
	// algorithm identifier (03 3DES, 08 AES-128, 0A AES-192, 0C AES-256)
	// and value.
	ManagementKey() (alg byte, key []byte, err error)
	// SetManagementKey replaces the card management key.
	SetManagementKey(alg byte, key []byte) error
}
