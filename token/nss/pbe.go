package nss

import (
	"crypto/cipher"
	"crypto/des"
	"crypto/hmac"
	"crypto/sha1"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/vscard/vscard/internal/pbes2"
)

// Object identifiers of the encryption schemes key4.db uses (peers.md §6.2).
var (
	oidPBESHA13DESCBC = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 12, 5, 1, 3}
)

// maxIterations bounds the PBKDF2 work a database can ask for. NSS 3.87
// uses 10000 (1 for an empty password, peers.md §6.2); a million is far
// above anything NSS writes and still finishes in well under a second,
// so a hostile file cannot stall the card.
const maxIterations = 1_000_000

// errDecrypt is returned when a blob decrypts to bad padding, the usual
// sign of a wrong password.
var errDecrypt = errors.New("nss: decryption failed (wrong password?)")

// algorithmIdentifier is X.509's AlgorithmIdentifier. Params is optional:
// NSS writes hmacWithSHA256 without the NULL parameter (peers.md §6.2).
type algorithmIdentifier struct {
	Algorithm asn1.ObjectIdentifier
	Params    asn1.RawValue `asn1:"optional"`
}

// encryptedData is the blob NSS stores for every private attribute and
// for the password check: EncryptedPrivateKeyInfo's shape.
type encryptedData struct {
	Algo       algorithmIdentifier
	Ciphertext []byte
}

// legacyParams are pbeWithSha1AndTripleDES-CBC's {entrySalt, iterations}.
type legacyParams struct {
	Salt       []byte
	Iterations int
}

// decryptPBE decrypts an NSS EncryptedData blob with the database password
// pw and the global salt from metaData (peers.md §6.2). Both NSS shapes
// are handled: PBES2 (PBKDF2 + AES-CBC, NSS ≥ 3.49) and the legacy
// pbeWithSha1AndTripleDES-CBC. maxIter bounds the PBKDF2 iteration count.
func decryptPBE(der, globalSalt, pw []byte, maxIter int) ([]byte, error) {
	var ed encryptedData
	rest, err := asn1.Unmarshal(der, &ed)
	if err != nil {
		return nil, fmt.Errorf("nss: encrypted attribute: %w", err)
	}
	if len(rest) != 0 {
		return nil, errors.New("nss: encrypted attribute: trailing data")
	}
	// Both schemes start from SHA1(globalSalt || password) (§6.2).
	h := sha1.New()
	h.Write(globalSalt)
	h.Write(pw)
	hp := h.Sum(nil)

	switch {
	case ed.Algo.Algorithm.Equal(pbes2.OID):
		// The PBKDF2 "password" is SHA1(globalSalt||pw) as raw bytes.
		pt, err := pbes2.Decrypt(ed.Algo.Params.FullBytes, hp, ed.Ciphertext, maxIter)
		if errors.Is(err, pbes2.ErrPadding) {
			return nil, errDecrypt
		}
		if err != nil {
			return nil, fmt.Errorf("nss: %w", err)
		}
		return pt, nil
	case ed.Algo.Algorithm.Equal(oidPBESHA13DESCBC):
		var p legacyParams
		if err := unmarshalAll(ed.Algo.Params.FullBytes, &p); err != nil {
			return nil, fmt.Errorf("nss: 3DES PBE parameters: %w", err)
		}
		key, iv := legacy3DESKey(hp, p.Salt)
		block, err := des.NewTripleDESCipher(key)
		if err != nil {
			return nil, fmt.Errorf("nss: 3DES: %w", err)
		}
		return cbcDecrypt(block, iv, ed.Ciphertext)
	}
	return nil, fmt.Errorf("nss: unsupported encryption algorithm %v", ed.Algo.Algorithm)
}

func unmarshalAll(der []byte, v any) error {
	rest, err := asn1.Unmarshal(der, v)
	if err != nil {
		return err
	}
	if len(rest) != 0 {
		return errors.New("trailing data")
	}
	return nil
}

// legacy3DESKey derives the key and IV of pbeWithSha1AndTripleDES-CBC as
// NSS's legacy key database does (peers.md §6.2, firepwd decryptMoz3DES):
// chp = SHA1(hp||salt), pes = salt zero-padded to 20 bytes,
// k1 = HMAC(chp, pes||salt), tk = HMAC(chp, pes), k2 = HMAC(chp, tk||salt),
// key = (k1||k2)[:24], iv = (k1||k2)[32:40].
func legacy3DESKey(hp, salt []byte) (key, iv []byte) {
	h := sha1.New()
	h.Write(hp)
	h.Write(salt)
	chp := h.Sum(nil)
	pes := make([]byte, max(20, len(salt)))
	copy(pes, salt)
	mac := func(parts ...[]byte) []byte {
		m := hmac.New(sha1.New, chp)
		for _, p := range parts {
			m.Write(p)
		}
		return m.Sum(nil)
	}
	k1 := mac(pes, salt)
	tk := mac(pes)
	k2 := mac(tk, salt)
	k := append(k1, k2...)
	return k[:24], k[len(k)-8:]
}

// cbcDecrypt decrypts CBC and strips PKCS#7 padding. Bad padding means a
// wrong key, i.e. almost always a wrong password.
func cbcDecrypt(block cipher.Block, iv, ct []byte) ([]byte, error) {
	pt, err := pbes2.DecryptCBC(block, iv, ct)
	if errors.Is(err, pbes2.ErrPadding) {
		return nil, errDecrypt
	}
	if err != nil {
		return nil, fmt.Errorf("nss: %w", err)
	}
	return pt, nil
}
