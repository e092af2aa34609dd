// Package pkcs12 reads PKCS#12 (RFC 7292) files as written by
// `openssl pkcs12 -export` and by NSS's `pk12util -o`, for importing a
// certificate and its private key into a card.
//
// The model: a PKCS#12 file is an AuthenticatedSafe (a list of
// ContentInfos, some password-encrypted) protected by a MAC over its
// encoding, all under one password. Strict DER files go to
// software.sslmate.com/src/go-pkcs12, which knows every algorithm OpenSSL
// writes (PBES2/AES and the legacy RC2/3DES ones). NSS writes
// indefinite-length BER instead, at every level, including inside the
// encrypted parts (peers.md §7.1), which go-pkcs12 rejects; for those
// files this package walks the structure itself: it checks the MAC over the
// original BER bytes, decrypts (PBES2 with PBKDF2 and AES-CBC, as NSS 3.87
// writes, or PKCS#12 PBE with 3DES, as older NSS wrote), and normalizes
// each layer with BERToDER before parsing it.
//
// A wrong password is reported as ErrWrongPassword (from the MAC check,
// before any decryption).
package pkcs12

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"

	gopkcs12 "software.sslmate.com/src/go-pkcs12"
)

// ErrWrongPassword is returned when the MAC does not verify with the given
// password.
var ErrWrongPassword = errors.New("pkcs12: wrong password")

// Bundle is what a PKCS#12 file holds.
type Bundle struct {
	// Keys are the private keys, in file order (*rsa.PrivateKey,
	// *ecdsa.PrivateKey or ed25519.PrivateKey).
	Keys []crypto.PrivateKey
	// Certs are all certificates, in file order: the key holders' and
	// the chain (CA) certificates alike.
	Certs []*x509.Certificate
}

// Decode reads a PKCS#12 file, DER or BER, with password (UTF-8; it is
// converted to a BMPString where the algorithm asks for one).
func Decode(data []byte, password string) (*Bundle, error) {
	der, err := BERToDER(data)
	if err != nil {
		return nil, fmt.Errorf("pkcs12: not a PKCS#12 file: %w", err)
	}
	if bytes.Equal(der, data) {
		return decodeDER(data, password)
	}
	return decodeBER(der, password, maxIterations)
}

// decodeDER hands a strict DER file to go-pkcs12.
func decodeDER(data []byte, password string) (*Bundle, error) {
	key, cert, cas, err := gopkcs12.DecodeChain(data, password)
	if errors.Is(err, gopkcs12.ErrIncorrectPassword) {
		return nil, ErrWrongPassword
	}
	if err != nil {
		// go-pkcs12 wants exactly one key; this package's own reader
		// takes files with several keys or none (certificates only), and
		// DER is valid BER.
		if b, err2 := decodeBER(data, password, maxIterations); err2 == nil {
			return b, nil
		}
		return nil, fmt.Errorf("pkcs12: %w", err)
	}
	b := &Bundle{Keys: []crypto.PrivateKey{key}}
	if cert != nil {
		b.Certs = append(b.Certs, cert)
	}
	b.Certs = append(b.Certs, cas...)
	return b, nil
}
