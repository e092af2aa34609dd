package pkcs12

import (
	"crypto/des"
	"crypto/sha1"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"hash"
	"unicode/utf16"

	"github.com/vscard/vscard/internal/pbes2"
)

var (
	oidSHA3DES     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 12, 1, 3}
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

type pbeParams struct {
	Salt       []byte
	Iterations int
}

// decrypt undoes a password-based encryption of RFC 7292 or RFC 8018.
func decrypt(alg pkix.AlgorithmIdentifier, password string, ct []byte, maxIter int) ([]byte, error) {
	var (
		pt  []byte
		err error
	)
	switch {
	case alg.Algorithm.Equal(pbes2.OID):
		// RFC 8018 §3 and OpenSSL pass the password to PBKDF2 as UTF-8
		// bytes; NSS 3.87 pk12util does the same.
		pt, err = pbes2.Decrypt(alg.Parameters.FullBytes, []byte(password), ct, maxIter)
	case alg.Algorithm.Equal(oidSHA3DES):
		var p pbeParams
		if err := unmarshalDER(alg.Parameters.FullBytes, &p); err != nil {
			return nil, fmt.Errorf("PBE parameters: %w", err)
		}
		if p.Iterations < 1 || p.Iterations > maxIter {
			return nil, fmt.Errorf("PBE iteration count %d out of range", p.Iterations)
		}
		pw, perr := bmpPassword(password)
		if perr != nil {
			return nil, perr
		}
		key := kdf(sha1.New, pw, p.Salt, p.Iterations, 1, 24)
		iv := kdf(sha1.New, pw, p.Salt, p.Iterations, 2, 8)
		block, berr := des.NewTripleDESCipher(key)
		if berr != nil {
			return nil, berr
		}
		pt, err = pbes2.DecryptCBC(block, iv, ct)
	default:
		return nil, fmt.Errorf("%v: %w", alg.Algorithm, errUnsupported)
	}
	if err != nil {
		return nil, decryptErr(err)
	}
	return pt, nil
}

// decryptErr words a pbes2 error for this package. The MAC already proved
// the password, so bad padding means a damaged file, not a wrong password.
func decryptErr(err error) error {
	switch {
	case errors.Is(err, pbes2.ErrUnsupported):
		return fmt.Errorf("%v: %w", err, errUnsupported)
	case errors.Is(err, pbes2.ErrPadding):
		return errors.New("decryption failed: bad padding")
	}
	return err
}
