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

// RawRSA computes block^d mod n.
//
// A block that is an EMSA-PKCS1-v1_5 signature encoding (00 01 FF.. 00 T),
// which is what hosts send for nearly every CAC signature, goes through
// crypto/rsa: the result is the same number, computed in constant time and
// about a third faster than math/big. Every other block (PSS encodings,
// ciphertexts to decrypt, raw X.509 operations) takes the math/big path
// with CRT and blinding, and its result is checked against the public key
// before it is returned, so a computation fault can never leak a CRT
// factor.
func (k *RSAKey) RawRSA(ctx context.Context, block []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	size := k.Size()
	if len(block) != size {
		return nil, fmt.Errorf("%w: %d bytes for a %d-byte modulus", ErrInputRange, len(block), size)
	}
	if t, ok := pkcs1v15Payload(block); ok {
		// crypto.Hash(0) signs t as given: crypto/rsa pads it back into
		// exactly this block.
		if sig, err := rsa.SignPKCS1v15(nil, k.PrivateKey, crypto.Hash(0), t); err == nil {
			return sig, nil
		}
		// crypto/rsa refuses some keys (e.g. under 1024 bits); math/big
		// does not.
	}
	return k.rawBig(block)
}

// pkcs1v15Payload returns T when block is 00 01 PS 00 T with PS at least
// 8 bytes of FF (RFC 8017 §9.2).
func pkcs1v15Payload(block []byte) ([]byte, bool) {
	if len(block) < 11 || block[0] != 0x00 || block[1] != 0x01 {
		return nil, false
	}
	i := 2
	for i < len(block) && block[i] == 0xFF {
		i++
	}
	if i-2 < 8 || i >= len(block) || block[i] != 0x00 {
		return nil, false
	}
	return block[i+1:], true
}

// rawBig is the textbook operation with math/big, CRT and blinding.
func (k *RSAKey) rawBig(block []byte) ([]byte, error) {
	size := k.Size()
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
