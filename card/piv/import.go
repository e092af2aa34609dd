package piv

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"math/big"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/tlv"
)

// rsaBits maps the RSA algorithm identifiers to modulus sizes.
var rsaBits = map[byte]int{AlgRSA1024: 1024, AlgRSA2048: 2048, AlgRSA3072: 3072, AlgRSA4096: 4096}

// importKey implements Yubico's IMPORT ASYMMETRIC KEY (INS FE, P1
// algorithm, P2 key reference), which yubico-piv-tool's import-key sends:
// RSA as 01 p, 02 q, 03 dp, 04 dq, 05 qinv (public exponent 65537, as on
// a YubiKey); EC as 06 <private scalar>; optionally AA/AB policies, which
// this card's fixed slot policies ignore. It needs the management key.
// The key is checked for consistency before it is stored.
func (c *Card) importKey(cmd apdu.Command) apdu.Response {
	if !isAsymmetric(cmd.P2) {
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	if !c.mgmAuthed {
		return apdu.Status(apdu.SWSecurityNotSatisfied)
	}
	elems, err := tlv.ParseBER(cmd.Data)
	if err != nil {
		return apdu.Status(apdu.SWWrongData)
	}
	var parts [7][]byte // index = tag 01..06
	for _, e := range elems {
		switch {
		case e.Tag >= 0x01 && e.Tag <= 0x06:
			if parts[e.Tag] != nil {
				return apdu.Status(apdu.SWWrongData)
			}
			parts[e.Tag] = e.Value
		case e.Tag == 0xAA || e.Tag == 0xAB:
			if len(e.Value) != 1 {
				return apdu.Status(apdu.SWWrongData)
			}
		default:
			return apdu.Status(apdu.SWWrongData)
		}
	}
	var key crypto.Signer
	switch cmd.P1 {
	case AlgECCP256, AlgECCP384:
		curve := elliptic.P256()
		if cmd.P1 == AlgECCP384 {
			curve = elliptic.P384()
		}
		for _, p := range parts[1:6] {
			if p != nil {
				return apdu.Status(apdu.SWWrongData)
			}
		}
		k, err := ecdsa.ParseRawPrivateKey(curve, parts[6])
		if err != nil {
			return apdu.Status(apdu.SWWrongData)
		}
		key = k
	case AlgRSA1024, AlgRSA2048, AlgRSA3072, AlgRSA4096:
		if parts[6] != nil {
			return apdu.Status(apdu.SWWrongData)
		}
		k, ok := rsaFromCRT(parts[1:6], rsaBits[cmd.P1])
		if !ok {
			return apdu.Status(apdu.SWWrongData)
		}
		key = k
	default:
		return apdu.Status(swIncorrectP1)
	}
	if err := c.st.SetKey(cmd.P2, key); err != nil {
		c.log.Warn("piv: IMPORT KEY: store failed", "ref", cmd.P2, "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
	return apdu.Status(apdu.SWOK)
}

// rsaFromCRT rebuilds an RSA key with e = 65537 from p, q, dp, dq, qinv
// and checks that every part agrees and the modulus has bits bits.
func rsaFromCRT(parts [][]byte, bits int) (*rsa.PrivateKey, bool) {
	for _, p := range parts {
		if len(p) == 0 || len(p) > bits/16+1 {
			return nil, false
		}
	}
	one := big.NewInt(1)
	e := big.NewInt(65537)
	p, q := new(big.Int).SetBytes(parts[0]), new(big.Int).SetBytes(parts[1])
	if p.Cmp(one) <= 0 || q.Cmp(one) <= 0 || p.Cmp(q) == 0 {
		return nil, false
	}
	n := new(big.Int).Mul(p, q)
	if n.BitLen() != bits {
		return nil, false
	}
	p1, q1 := new(big.Int).Sub(p, one), new(big.Int).Sub(q, one)
	phi := new(big.Int).Mul(p1, q1)
	d := new(big.Int).ModInverse(e, phi)
	if d == nil {
		return nil, false
	}
	k := &rsa.PrivateKey{PublicKey: rsa.PublicKey{N: n, E: 65537}, D: d, Primes: []*big.Int{p, q}}
	if k.Validate() != nil {
		return nil, false
	}
	k.Precompute()
	if k.Precomputed.Dp.Cmp(new(big.Int).SetBytes(parts[2])) != 0 ||
		k.Precomputed.Dq.Cmp(new(big.Int).SetBytes(parts[3])) != 0 ||
		k.Precomputed.Qinv.Cmp(new(big.Int).SetBytes(parts[4])) != 0 {
		return nil, false
	}
	return k, true
}
