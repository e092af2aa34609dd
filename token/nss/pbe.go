package nss

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/des"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/asn1"
	"errors"
	"fmt"
	"hash"
)

// Object identifiers of the encryption schemes key4.db uses (peers.md §6.2).
var (
	oidPBES2          = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 13}
	oidPBKDF2         = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 5, 12}
	oidHMACSHA1       = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 7}
	oidHMACSHA256     = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 9}
	oidHMACSHA384     = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 10}
	oidHMACSHA512     = asn1.ObjectIdentifier{1, 2, 840, 113549, 2, 11}
	oidAES128CBC      = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 2}
	oidAES192CBC      = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 22}
	oidAES256CBC      = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 42}
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

type pbes2Params struct {
	KDF    algorithmIdentifier
	Cipher algorithmIdentifier
}

type pbkdf2Params struct {
	Salt       []byte
	Iterations int
	KeyLength  int                 `asn1:"optional"`
	PRF        algorithmIdentifier `asn1:"optional"`
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
	case ed.Algo.Algorithm.Equal(oidPBES2):
		return decryptPBES2(ed, hp, maxIter)
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

func decryptPBES2(ed encryptedData, hp []byte, maxIter int) ([]byte, error) {
	var p pbes2Params
	if err := unmarshalAll(ed.Algo.Params.FullBytes, &p); err != nil {
		return nil, fmt.Errorf("nss: PBES2 parameters: %w", err)
	}
	if !p.KDF.Algorithm.Equal(oidPBKDF2) {
		return nil, fmt.Errorf("nss: unsupported PBES2 key derivation %v", p.KDF.Algorithm)
	}
	var kp pbkdf2Params
	if err := unmarshalAll(p.KDF.Params.FullBytes, &kp); err != nil {
		return nil, fmt.Errorf("nss: PBKDF2 parameters: %w", err)
	}
	if kp.Iterations < 1 || kp.Iterations > maxIter {
		return nil, fmt.Errorf("nss: PBKDF2 iteration count %d out of range [1, %d]", kp.Iterations, maxIter)
	}
	var keyLen int
	switch {
	case p.Cipher.Algorithm.Equal(oidAES128CBC):
		keyLen = 16
	case p.Cipher.Algorithm.Equal(oidAES192CBC):
		keyLen = 24
	case p.Cipher.Algorithm.Equal(oidAES256CBC):
		keyLen = 32
	default:
		return nil, fmt.Errorf("nss: unsupported PBES2 cipher %v", p.Cipher.Algorithm)
	}
	if kp.KeyLength != 0 && kp.KeyLength != keyLen {
		return nil, fmt.Errorf("nss: PBKDF2 key length %d does not fit the cipher (%d)", kp.KeyLength, keyLen)
	}
	var prf func() hash.Hash
	switch alg := kp.PRF.Algorithm; {
	case len(alg) == 0 || alg.Equal(oidHMACSHA1):
		// RFC 8018's default PRF when the field is absent.
		prf = sha1.New
	case alg.Equal(oidHMACSHA256):
		prf = sha256.New
	case alg.Equal(oidHMACSHA384):
		prf = sha512.New384
	case alg.Equal(oidHMACSHA512):
		prf = sha512.New
	default:
		return nil, fmt.Errorf("nss: unsupported PBKDF2 PRF %v", alg)
	}
	var iv []byte
	if err := unmarshalAll(p.Cipher.Params.FullBytes, &iv); err != nil {
		return nil, fmt.Errorf("nss: AES IV: %w", err)
	}
	switch len(iv) {
	case aes.BlockSize - 2:
		// NSS quirk: it stores only 14 IV bytes; the real IV is the DER
		// header 04 0E in front of them (peers.md §6.2).
		iv = append([]byte{0x04, 0x0E}, iv...)
	case aes.BlockSize:
	default:
		return nil, fmt.Errorf("nss: AES IV of %d bytes", len(iv))
	}
	// The PBKDF2 "password" is SHA1(globalSalt||pw) as raw bytes.
	key, err := pbkdf2.Key(prf, string(hp), kp.Salt, kp.Iterations, keyLen)
	if err != nil {
		return nil, fmt.Errorf("nss: PBKDF2: %w", err)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("nss: AES: %w", err)
	}
	return cbcDecrypt(block, iv, ed.Ciphertext)
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
	bs := block.BlockSize()
	if len(ct) == 0 || len(ct)%bs != 0 {
		return nil, fmt.Errorf("nss: ciphertext of %d bytes is not a whole number of %d-byte blocks", len(ct), bs)
	}
	out := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(out, ct)
	n := int(out[len(out)-1])
	if n == 0 || n > bs {
		return nil, errDecrypt
	}
	for _, b := range out[len(out)-n:] {
		if int(b) != n {
			return nil, errDecrypt
		}
	}
	return out[:len(out)-n], nil
}
