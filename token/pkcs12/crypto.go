package pkcs12

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/des"
	"crypto/pbkdf2"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"hash"
	"unicode/utf16"
)

var (
	oidPBES2       = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 13}
	oidPBKDF2      = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 12}
	oidSHA3DES     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 12, 1, 3}
	oidHMACSHA1    = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 7}
	oidHMACSHA256  = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 9}
	oidHMACSHA384  = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 10}
	oidHMACSHA512  = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 11}
	oidAES128CBC   = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 2}
	oidAES192CBC   = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 22}
	oidAES256CBC   = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 42}
	oidDESEDE3CBC  = asn1.ObjectIdentifier{1, 2, 840, 113549, 3, 7}
	errUnsupported = errors.New("encryption algorithm not supported (re-export with a current pk12util or openssl)")
)

// bmpPassword encodes a password as RFC 7292 appendix B.1 wants for the
// PKCS#12 KDF: UTF-16 big-endian with a two-byte NUL terminator.
func bmpPassword(password string) ([]byte, error) {
	u := utf16.Encode([]rune(password))
	out := make([]byte, 0, 2*len(u)+2)
	for _, c := range u {
		out = append(out, byte(c>>8), byte(c))
	}
	return append(out, 0, 0), nil
}

// kdf is the PKCS#12 key derivation function (RFC 7292 appendix B.2): id 1
// derives cipher keys, 2 IVs, 3 MAC keys.
func kdf(h func() hash.Hash, password, salt []byte, iterations int, id byte, n int) []byte {
	v := h().BlockSize()
	u := h().Size()
	d := make([]byte, v)
	for i := range d {
		d[i] = id
	}
	// I = S || P, each repeated to a multiple of v bytes.
	fill := func(x []byte) []byte {
		if len(x) == 0 {
			return nil
		}
		out := make([]byte, v*((len(x)+v-1)/v))
		for i := range out {
			out[i] = x[i%len(x)]
		}
		return out
	}
	I := append(fill(salt), fill(password)...)
	var out []byte
	hh := h()
	for {
		hh.Reset()
		hh.Write(d)
		hh.Write(I)
		a := hh.Sum(nil)
		for r := 1; r < iterations; r++ {
			hh.Reset()
			hh.Write(a)
			a = hh.Sum(a[:0])
		}
		out = append(out, a...)
		if len(out) >= n {
			return out[:n]
		}
		// I_j = (I_j + B + 1) mod 2^(8v), B = A repeated to v bytes.
		for j := 0; j < len(I); j += v {
			carry := 1
			for k := v - 1; k >= 0; k-- {
				s := int(I[j+k]) + int(a[k%u]) + carry
				I[j+k] = byte(s)
				carry = s >> 8
			}
		}
	}
}

type pbes2Params struct {
	KDF pkix.AlgorithmIdentifier
	Enc pkix.AlgorithmIdentifier
}

type pbkdf2Params struct {
	Salt       []byte
	Iterations int
	KeyLength  int                      `asn1:"optional"`
	PRF        pkix.AlgorithmIdentifier `asn1:"optional"`
}

type pbeParams struct {
	Salt       []byte
	Iterations int
}

// decrypt undoes a password-based encryption of RFC 7292 or RFC 8018.
func decrypt(alg pkix.AlgorithmIdentifier, password string, ct []byte, maxIter int) ([]byte, error) {
	var (
		block cipher.Block
		iv    []byte
	)
	switch {
	case alg.Algorithm.Equal(oidPBES2):
		var p pbes2Params
		if err := unmarshalDER(alg.Parameters.FullBytes, &p); err != nil {
			return nil, fmt.Errorf("PBES2 parameters: %w", err)
		}
		if !p.KDF.Algorithm.Equal(oidPBKDF2) {
			return nil, fmt.Errorf("PBES2 key derivation %v: %w", p.KDF.Algorithm, errUnsupported)
		}
		var kp pbkdf2Params
		if err := unmarshalDER(p.KDF.Parameters.FullBytes, &kp); err != nil {
			return nil, fmt.Errorf("PBKDF2 parameters: %w", err)
		}
		if kp.Iterations < 1 || kp.Iterations > maxIter {
			return nil, fmt.Errorf("PBKDF2 iteration count %d out of range", kp.Iterations)
		}
		prf := sha1.New // RFC 8018 §A.2 default
		switch a := kp.PRF.Algorithm; {
		case len(a) == 0 || a.Equal(oidHMACSHA1):
		case a.Equal(oidHMACSHA256):
			prf = sha256.New
		case a.Equal(oidHMACSHA384):
			prf = sha512.New384
		case a.Equal(oidHMACSHA512):
			prf = sha512.New
		default:
			return nil, fmt.Errorf("PBKDF2 PRF %v: %w", a, errUnsupported)
		}
		var keyLen int
		switch a := p.Enc.Algorithm; {
		case a.Equal(oidAES128CBC):
			keyLen = 16
		case a.Equal(oidAES192CBC):
			keyLen = 24
		case a.Equal(oidAES256CBC):
			keyLen = 32
		case a.Equal(oidDESEDE3CBC):
			keyLen = 24
		default:
			return nil, fmt.Errorf("PBES2 cipher %v: %w", a, errUnsupported)
		}
		if kp.KeyLength != 0 && kp.KeyLength != keyLen {
			return nil, fmt.Errorf("PBKDF2 key length %d does not fit the cipher", kp.KeyLength)
		}
		if err := unmarshalDER(p.Enc.Parameters.FullBytes, &iv); err != nil {
			return nil, fmt.Errorf("PBES2 IV: %w", err)
		}
		// RFC 8018 §3 and OpenSSL pass the password to PBKDF2 as UTF-8
		// bytes; NSS 3.87 pk12util does the same.
		key, err := pbkdf2.Key(prf, password, kp.Salt, kp.Iterations, keyLen)
		if err != nil {
			return nil, fmt.Errorf("PBKDF2: %w", err)
		}
		if p.Enc.Algorithm.Equal(oidDESEDE3CBC) {
			block, err = des.NewTripleDESCipher(key)
		} else {
			block, err = aes.NewCipher(key)
		}
		if err != nil {
			return nil, err
		}
	case alg.Algorithm.Equal(oidSHA3DES):
		var p pbeParams
		if err := unmarshalDER(alg.Parameters.FullBytes, &p); err != nil {
			return nil, fmt.Errorf("PBE parameters: %w", err)
		}
		if p.Iterations < 1 || p.Iterations > maxIter {
			return nil, fmt.Errorf("PBE iteration count %d out of range", p.Iterations)
		}
		pw, err := bmpPassword(password)
		if err != nil {
			return nil, err
		}
		key := kdf(sha1.New, pw, p.Salt, p.Iterations, 1, 24)
		iv = kdf(sha1.New, pw, p.Salt, p.Iterations, 2, 8)
		if block, err = des.NewTripleDESCipher(key); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%v: %w", alg.Algorithm, errUnsupported)
	}
	bs := block.BlockSize()
	if len(iv) != bs {
		return nil, fmt.Errorf("IV of %d bytes, want %d", len(iv), bs)
	}
	if len(ct) == 0 || len(ct)%bs != 0 {
		return nil, fmt.Errorf("ciphertext of %d bytes is not a whole number of blocks", len(ct))
	}
	pt := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(pt, ct)
	// PKCS#7 padding. The MAC already proved the password, so bad
	// padding means a damaged file, not a wrong password.
	n := int(pt[len(pt)-1])
	if n == 0 || n > bs {
		return nil, errors.New("decryption failed: bad padding")
	}
	for _, c := range pt[len(pt)-n:] {
		if int(c) != n {
			return nil, errors.New("decryption failed: bad padding")
		}
	}
	return pt[:len(pt)-n], nil
}
