package piv

import (
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/des"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"math/big"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/tlv"
	"github.com/vscard/vscard/token"
)

// mgmKeyLen returns the key length of a management-key algorithm.
func mgmKeyLen(alg byte) (int, bool) {
	switch alg {
	case AlgTDES, AlgAES192:
		return 24, true
	case AlgAES128:
		return 16, true
	case AlgAES256:
		return 32, true
	}
	return 0, false
}

// mgmCipher returns the block cipher of the card management key.
func mgmCipher(alg byte, key []byte) (cipher.Block, error) {
	if n, ok := mgmKeyLen(alg); !ok || n != len(key) {
		return nil, fmt.Errorf("piv: management key: algorithm %02X with a %d-byte key", alg, len(key))
	}
	if alg == AlgTDES {
		return des.NewTripleDESCipher(key)
	}
	return aes.NewCipher(key)
}

// isAsymmetric reports whether ref names an asymmetric key slot.
func isAsymmetric(ref byte) bool {
	_, ok := CertTag(ref)
	return ok
}

// authTemplate is the content of a 7C dynamic authentication template
// (SP 800-73-4 Part 2 table 7): each tag's value, present marks empty
// tags too.
type authTemplate struct {
	witness, challenge, response, exponent []byte
	has                                    [4]bool // 80 81 82 85
}

func parseAuth(data []byte) (authTemplate, bool) {
	var t authTemplate
	outer, rest, err := tlv.ReadBER(data)
	if err != nil || outer.Tag != 0x7C || len(rest) != 0 {
		return t, false
	}
	elems, err := tlv.ParseBER(outer.Value)
	if err != nil {
		return t, false
	}
	for _, e := range elems {
		var i int
		switch e.Tag {
		case 0x80:
			i, t.witness = 0, e.Value
		case 0x81:
			i, t.challenge = 1, e.Value
		case 0x82:
			i, t.response = 2, e.Value
		case 0x85:
			i, t.exponent = 3, e.Value
		default:
			return t, false
		}
		if t.has[i] {
			return t, false
		}
		t.has[i] = true
	}
	return t, true
}

func authResponse(tag uint32, v []byte) apdu.Response {
	return apdu.OK(tlv.AppendBER(nil, 0x7C, tlv.AppendBER(nil, tag, v)))
}

// generalAuthenticate implements GENERAL AUTHENTICATE (INS 87): P1 is
// the algorithm, P2 the key reference.
func (c *Card) generalAuthenticate(ctx context.Context, cmd apdu.Command) (apdu.Response, error) {
	t, ok := parseAuth(cmd.Data)
	if !ok {
		return apdu.Status(apdu.SWWrongData), nil
	}
	if cmd.P2 == KeyManagementKey {
		return c.mgmAuthenticate(cmd.P1, t), nil
	}
	if !isAsymmetric(cmd.P2) {
		return apdu.Status(apdu.SWReferencedDataNotFound), nil
	}
	return c.privateOp(ctx, cmd.P1, cmd.P2, t)
}

// mgmAuthenticate runs the card management key's challenge/response
// (SP 800-73-4 Part 2 appendix A.1–A.3), in the forms yubico-piv-tool and
// OpenSC send:
//
//   - 7C { 80 00 }: the card returns a witness, encrypted (80 E(w));
//   - 7C { 80 w, 81 c }: the host proves it decrypted the witness and
//     challenges the card, which returns 82 E(c) (mutual);
//   - 7C { 81 00 }: the card returns a plain challenge (81 c);
//   - 7C { 82 E(c) }: the host answers it (external).
//
// P1 00 is 3DES (SP 800-78-4 table 6-1 lists it as the legacy code).
func (c *Card) mgmAuthenticate(p1 byte, t authTemplate) apdu.Response {
	if p1 == 0x00 {
		p1 = AlgTDES
	}
	pend := c.pending
	c.pending = pendingAuth{}
	alg, key, err := c.st.ManagementKey()
	if err != nil {
		c.log.Warn("piv: management key unavailable", "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
	blk, err := mgmCipher(alg, key)
	clear(key)
	if err != nil {
		c.log.Warn("piv: management key unusable", "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
	bs := blk.BlockSize()
	has := t.has
	switch {
	case has == [4]bool{true, false, false, false} && len(t.witness) == 0:
		if p1 != alg {
			return apdu.Status(swIncorrectP1)
		}
		c.mgmAuthed = false
		w := make([]byte, bs)
		if _, err := io.ReadFull(c.rand, w); err != nil {
			return apdu.Status(apdu.SWExecutionError)
		}
		c.pending = pendingAuth{kind: 0x80, alg: alg, value: w}
		enc := make([]byte, bs)
		blk.Encrypt(enc, w)
		return authResponse(0x80, enc)

	case has == [4]bool{false, true, false, false} && len(t.challenge) == 0:
		// OpenSC also uses this as GET CHALLENGE (cac.md §11), with
		// P1 00: serve the block size of the card's algorithm.
		c.mgmAuthed = false
		ch := make([]byte, bs)
		if _, err := io.ReadFull(c.rand, ch); err != nil {
			return apdu.Status(apdu.SWExecutionError)
		}
		c.pending = pendingAuth{kind: 0x81, alg: p1, value: ch}
		return authResponse(0x81, ch)

	case has == [4]bool{true, true, false, false} || has == [4]bool{true, true, true, false} && len(t.response) == 0:
		if pend.kind != 0x80 || p1 != alg || len(t.witness) != bs || len(t.challenge) != bs || !equal(t.witness, pend.value) {
			c.mgmAuthed = false
			return apdu.Status(apdu.SWSecurityNotSatisfied)
		}
		c.mgmAuthed = true
		enc := make([]byte, bs)
		blk.Encrypt(enc, t.challenge)
		return authResponse(0x82, enc)

	case has == [4]bool{false, false, true, false}:
		if pend.kind != 0x81 || pend.alg != alg || p1 != alg || len(t.response) != bs {
			c.mgmAuthed = false
			return apdu.Status(apdu.SWSecurityNotSatisfied)
		}
		want := make([]byte, bs)
		blk.Encrypt(want, pend.value)
		if !equal(want, t.response) {
			c.mgmAuthed = false
			return apdu.Status(apdu.SWSecurityNotSatisfied)
		}
		c.mgmAuthed = true
		return apdu.Status(apdu.SWOK)
	}
	return apdu.Status(apdu.SWWrongData)
}

// mayUse applies the slot's PIN policy (preamble: 9E never, 9C always,
// others once per session).
func (c *Card) mayUse(ref byte) bool {
	switch ref {
	case KeyCardAuthentication:
		return true
	case KeySignature:
		return c.pinFresh
	}
	return c.pinVerified
}

// keyAlg returns the algorithm identifier of a key.
func keyAlg(k crypto.PublicKey) (byte, bool) {
	switch k := k.(type) {
	case *rsa.PublicKey:
		switch k.N.BitLen() {
		case 1024:
			return AlgRSA1024, true
		case 2048:
			return AlgRSA2048, true
		case 3072:
			return AlgRSA3072, true
		case 4096:
			return AlgRSA4096, true
		}
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return AlgECCP256, true
		case elliptic.P384():
			return AlgECCP384, true
		}
	}
	return 0, false
}

// privateOp is GENERAL AUTHENTICATE with an asymmetric key: 7C { 82 00,
// 81 <block or digest> } signs (raw RSA, ECDSA), 7C { 82 00, 85 <point> }
// derives an ECDH secret. The answer is 7C { 82 <result> }.
func (c *Card) privateOp(ctx context.Context, alg, ref byte, t authTemplate) (apdu.Response, error) {
	if !t.has[2] || len(t.response) != 0 || t.has[0] || t.has[1] == t.has[3] {
		return apdu.Status(apdu.SWWrongData), nil
	}
	key, err := c.st.Key(ref)
	if errors.Is(err, ErrNotFound) {
		return apdu.Status(apdu.SWReferencedDataNotFound), nil
	}
	if err != nil {
		c.log.Warn("piv: key unavailable", "ref", ref, "err", err)
		return apdu.Status(apdu.SWMemoryFailure), nil
	}
	have, ok := keyAlg(key.Public())
	if !ok || have != alg {
		return apdu.Status(swIncorrectP1), nil
	}
	if !c.mayUse(ref) {
		return apdu.Status(apdu.SWSecurityNotSatisfied), nil
	}
	if ref == KeySignature {
		// PIN Always: one verification, one use.
		c.pinFresh = false
	}

	var out []byte
	switch {
	case alg == AlgECCP256 || alg == AlgECCP384:
		if t.has[3] {
			x, ok := key.(token.ECDH)
			if !ok {
				return apdu.Status(apdu.SWFuncNotSupported), nil
			}
			out, err = x.ECDH(ctx, t.exponent)
			if errors.Is(err, token.ErrBadPoint) {
				return apdu.Status(apdu.SWWrongData), nil
			}
		} else {
			size := 32
			if alg == AlgECCP384 {
				size = 48
			}
			if len(t.challenge) == 0 || len(t.challenge) > size {
				return apdu.Status(apdu.SWWrongData), nil
			}
			if err := ctx.Err(); err != nil {
				return apdu.Response{}, err
			}
			out, err = key.Sign(c.rand, t.challenge, crypto.Hash(0))
		}
	default:
		if t.has[3] {
			return apdu.Status(apdu.SWWrongData), nil
		}
		raw, ok := key.(token.RawRSA)
		if !ok {
			return apdu.Status(apdu.SWFuncNotSupported), nil
		}
		out, err = raw.RawRSA(ctx, t.challenge)
		if errors.Is(err, token.ErrInputRange) {
			return apdu.Status(apdu.SWWrongData), nil
		}
	}
	if err != nil {
		if ctx.Err() != nil {
			return apdu.Response{}, ctx.Err()
		}
		c.log.Warn("piv: private key operation failed", "ref", ref, "err", err)
		return apdu.Status(apdu.SWExecutionError), nil
	}
	return authResponse(0x82, out), nil
}

// generate implements GENERATE ASYMMETRIC KEY PAIR (INS 47): data
// AC { 80 <alg> [AA pin policy] [AB touch policy] }; the management key
// must be authenticated. The key is stored before the card answers
// 7F 49 { 81 n, 82 e } or 7F 49 { 86 point }.
func (c *Card) generate(ctx context.Context, cmd apdu.Command) (apdu.Response, error) {
	if cmd.P1 != 0x00 || !isAsymmetric(cmd.P2) {
		return apdu.Status(apdu.SWIncorrectP1P2), nil
	}
	if !c.mgmAuthed {
		return apdu.Status(apdu.SWSecurityNotSatisfied), nil
	}
	outer, rest, err := tlv.ReadBER(cmd.Data)
	if err != nil || outer.Tag != 0xAC || len(rest) != 0 {
		return apdu.Status(apdu.SWWrongData), nil
	}
	elems, err := tlv.ParseBER(outer.Value)
	if err != nil {
		return apdu.Status(apdu.SWWrongData), nil
	}
	alg := byte(0)
	for _, e := range elems {
		switch e.Tag {
		case 0x80:
			if len(e.Value) != 1 || alg != 0 {
				return apdu.Status(apdu.SWWrongData), nil
			}
			alg = e.Value[0]
		case 0xAA, 0xAB:
			// Yubico's PIN and touch policies: this card's policy is
			// fixed per slot, so they are accepted and not stored.
			if len(e.Value) != 1 {
				return apdu.Status(apdu.SWWrongData), nil
			}
		default:
			return apdu.Status(apdu.SWWrongData), nil
		}
	}
	if err := ctx.Err(); err != nil {
		return apdu.Response{}, err
	}
	var priv crypto.Signer
	var pub []byte
	switch alg {
	case AlgRSA1024, AlgRSA2048, AlgRSA3072, AlgRSA4096:
		bits := map[byte]int{AlgRSA1024: 1024, AlgRSA2048: 2048, AlgRSA3072: 3072, AlgRSA4096: 4096}[alg]
		k, err := rsa.GenerateKey(c.rand, bits)
		if err != nil {
			c.log.Warn("piv: GENERATE: RSA failed", "err", err)
			return apdu.Status(apdu.SWExecutionError), nil
		}
		priv = k
		pub = tlv.AppendBER(pub, 0x81, k.N.Bytes())
		pub = tlv.AppendBER(pub, 0x82, big.NewInt(int64(k.E)).Bytes())
	case AlgECCP256, AlgECCP384:
		curve := elliptic.P256()
		if alg == AlgECCP384 {
			curve = elliptic.P384()
		}
		k, err := ecdsa.GenerateKey(curve, c.rand)
		if err != nil {
			c.log.Warn("piv: GENERATE: EC failed", "err", err)
			return apdu.Status(apdu.SWExecutionError), nil
		}
		pk, err := k.PublicKey.ECDH()
		if err != nil {
			return apdu.Status(apdu.SWExecutionError), nil
		}
		priv = k
		pub = tlv.AppendBER(pub, 0x86, pointBytes(pk))
	default:
		return apdu.Status(swIncorrectP1), nil
	}
	if err := c.st.SetKey(cmd.P2, priv); err != nil {
		c.log.Warn("piv: GENERATE: store failed", "ref", cmd.P2, "err", err)
		return apdu.Status(apdu.SWMemoryFailure), nil
	}
	return apdu.OK(tlv.AppendBER(nil, 0x7F49, pub)), nil
}

// pointBytes is the uncompressed point 04 || X || Y.
func pointBytes(k *ecdh.PublicKey) []byte { return k.Bytes() }
