package token

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"math/big"
)

// ErrInputRange is returned by RawRSA for a block of the wrong length or a
// value not less than the modulus.
var ErrInputRange = errors.New("token: RSA input out of range")

// RSAKey is an in-memory RSA private key that implements Key, RawRSA and
// crypto.Decrypter.
type RSAKey struct {
	*rsa.PrivateKey
}

// NewRSAKey wraps k after precomputing its CRT values.
func NewRSAKey(k *rsa.PrivateKey) *RSAKey {
	k.Precompute()
	return &RSAKey{PrivateKey: k}
}

var _ interface {
	Key
	RawRSA
	crypto.Decrypter
} = (*RSAKey)(nil)

// RawRSA computes block^d mod n with CRT and blinding, and checks the result
// against the public key before returning it, so a computation fault can
// never leak a CRT factor.
func (k *RSAKey) RawRSA(ctx context.Context, block []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	size := k.Size()
	if len(block) != size {
		return nil, fmt.Errorf("%w: %d bytes for a %d-byte modulus", ErrInputRange, len(block), size)
	}
	n := k.N
	c := new(big.Int).SetBytes(block)
	if c.Cmp(n) >= 0 {
		return nil, fmt.Errorf("%w: input not less than modulus", ErrInputRange)
	}
	e := big.NewInt(int64(k.E))

	// Blinding: compute (c*r^e)^d = m*r, then multiply by r^-1.
	var r, rInv *big.Int
	for {
		var err error
		r, err = rand.Int(rand.Reader, n)
		if err != nil {
			return nil, fmt.Errorf("token: blinding: %w", err)
		}
		if r.Sign() == 0 {
			continue
		}
		rInv = new(big.Int).ModInverse(r, n)
		if rInv != nil {
			break
		}
	}
	cb := new(big.Int).Exp(r, e, n)
	cb.Mul(cb, c).Mod(cb, n)

	var m *big.Int
	if len(k.Primes) == 2 && k.Precomputed.Dp != nil {
		p, q := k.Primes[0], k.Primes[1]
		m1 := new(big.Int).Exp(cb, k.Precomputed.Dp, p)
		m2 := new(big.Int).Exp(cb, k.Precomputed.Dq, q)
		m1.Sub(m1, m2)
		m1.Mul(m1, k.Precomputed.Qinv).Mod(m1, p)
		m1.Mul(m1, q)
		m = m1.Add(m1, m2)
	} else {
		m = new(big.Int).Exp(cb, k.D, n)
	}
	m.Mul(m, rInv).Mod(m, n)

	// Fault check: m^e must give back the input.
	if new(big.Int).Exp(m, e, n).Cmp(c) != 0 {
		return nil, errors.New("token: RSA private operation failed its self-check")
	}
	out := make([]byte, size)
	m.FillBytes(out)
	return out, nil
}

// Sign implements crypto.Signer.
func (k *RSAKey) Sign(rnd io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return k.PrivateKey.Sign(rnd, digest, opts)
}

// Decrypt implements crypto.Decrypter.
func (k *RSAKey) Decrypt(rnd io.Reader, msg []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	return k.PrivateKey.Decrypt(rnd, msg, opts)
}
