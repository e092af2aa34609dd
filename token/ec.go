package token

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"io"
)

// ECDH is implemented by elliptic-curve keys that can derive a shared
// secret with a peer's public point, as a PIV key-management key does
// (GENERAL AUTHENTICATE with tag 85, shared reference cac.md §11).
type ECDH interface {
	// ECDH returns the X coordinate of d·Q for the peer's uncompressed
	// point Q (04 || X || Y) on the key's curve.
	ECDH(ctx context.Context, peer []byte) ([]byte, error)
}

// SettablePIN is a PIN whose value can be replaced, as PIV's CHANGE
// REFERENCE DATA and RESET RETRY COUNTER do. The caller checks the old
// value (or the PUK) first; Set only stores.
type SettablePIN interface {
	PIN
	// Set replaces the value and restores the retry counter to its
	// maximum, durably, before it returns.
	Set(value []byte) error
}

// ErrBadPoint is returned by ECDH for a peer point that is not on the
// key's curve.
var ErrBadPoint = errors.New("token: peer point not on curve")

// ECKey is an in-memory ECDSA private key that implements Key and ECDH.
type ECKey struct {
	*ecdsa.PrivateKey
}

var _ interface {
	Key
	ECDH
} = (*ECKey)(nil)

// NewECKey wraps k.
func NewECKey(k *ecdsa.PrivateKey) *ECKey { return &ECKey{PrivateKey: k} }

// Sign returns an ASN.1 DER ECDSA-Sig-Value over digest, which the host
// has already hashed (and, for a digest longer than the curve order,
// which is truncated as FIPS 186-4 says). opts is ignored: a card signs
// whatever hash the host chose.
func (k *ECKey) Sign(rnd io.Reader, digest []byte, _ crypto.SignerOpts) ([]byte, error) {
	return ecdsa.SignASN1(rnd, k.PrivateKey, digest)
}

// ECDH implements ECDH.
func (k *ECKey) ECDH(ctx context.Context, peer []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	priv, err := k.PrivateKey.ECDH()
	if err != nil {
		return nil, fmt.Errorf("token: ECDH: %w", err)
	}
	pub, err := priv.Curve().NewPublicKey(peer)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadPoint, err)
	}
	secret, err := priv.ECDH(pub)
	if err != nil {
		return nil, fmt.Errorf("token: ECDH: %w", err)
	}
	return secret, nil
}

// Set implements SettablePIN.
func (p *MemoryPIN) Set(value []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pin = append([]byte(nil), value...)
	p.tries = p.max
	return nil
}

var _ SettablePIN = (*MemoryPIN)(nil)
