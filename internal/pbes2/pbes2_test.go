package pbes2

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/pbkdf2"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"testing"
)

// seal builds PBES2 parameters (PBKDF2-HMAC-SHA256, AES-256-CBC) and the
// ciphertext for plaintext, with fixed salt and IV so the test is
// deterministic. ivLen 14 writes the IV the way NSS's key4.db does.
func seal(t *testing.T, password, plaintext []byte, ivLen int) (params, ct []byte) {
	t.Helper()
	salt := bytes.Repeat([]byte{7}, 16)
	iv := make([]byte, 16)
	for i := range iv {
		iv[i] = byte(i * 3)
	}
	stored := iv
	if ivLen == 14 {
		iv[0], iv[1] = 0x04, 0x0E // NSS: the real IV starts with the DER header
		stored = iv[2:]
	}
	key, err := pbkdf2.Key(sha256.New, string(password), salt, 1000, 32)
	if err != nil {
		t.Fatal(err)
	}
	n := aes.BlockSize - len(plaintext)%aes.BlockSize
	padded := append(append([]byte(nil), plaintext...), bytes.Repeat([]byte{byte(n)}, n)...)
	block, _ := aes.NewCipher(key)
	ct = make([]byte, len(padded))
	cipher.NewCBCEncrypter(block, iv).CryptBlocks(ct, padded)

	ivDER, _ := asn1.Marshal(stored)
	kdf, _ := asn1.Marshal(struct {
		Salt       []byte
		Iterations int
		PRF        algorithmIdentifier
	}{salt, 1000, algorithmIdentifier{Algorithm: oidHMACSHA256}})
	params, err = asn1.Marshal(struct{ KDF, Cipher algorithmIdentifier }{
		algorithmIdentifier{Algorithm: oidPBKDF2, Params: asn1.RawValue{FullBytes: kdf}},
		algorithmIdentifier{Algorithm: oidAES256CBC, Params: asn1.RawValue{FullBytes: ivDER}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return params, ct
}

func TestDecrypt(t *testing.T) {
	msg := []byte("password-check")
	for _, ivLen := range []int{16, 14} {
		params, ct := seal(t, []byte("secret"), msg, ivLen)
		got, err := Decrypt(params, []byte("secret"), ct, 10000)
		if err != nil || !bytes.Equal(got, msg) {
			t.Errorf("IV %d bytes: Decrypt = %q, %v", ivLen, got, err)
		}
		// With this fixed salt and IV the wrong password's plaintext ends
		// in bad padding (checked once; the inputs never change).
		if _, err := Decrypt(params, []byte("wrong"), ct, 10000); !errors.Is(err, ErrPadding) {
			t.Errorf("IV %d bytes, wrong password: err = %v, want ErrPadding", ivLen, err)
		}
		if _, err := Decrypt(params, []byte("secret"), ct, 999); err == nil {
			t.Errorf("IV %d bytes: an iteration count above maxIter was accepted", ivLen)
		}
	}
	prm, ct := seal(t, []byte("x"), msg, 16)
	var pp params
	if _, err := asn1.Unmarshal(prm, &pp); err != nil {
		t.Fatal(err)
	}
	for name, mod := range map[string]func(*params){
		"cipher": func(p *params) { p.Cipher.Algorithm = asn1.ObjectIdentifier{1, 2, 3} },
		"kdf":    func(p *params) { p.KDF.Algorithm = asn1.ObjectIdentifier{1, 2, 3} },
	} {
		q := pp
		mod(&q)
		bad, err := asn1.Marshal(q)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Decrypt(bad, []byte("x"), ct, 10000); !errors.Is(err, ErrUnsupported) {
			t.Errorf("unknown %s: err = %v, want ErrUnsupported", name, err)
		}
	}
	for _, in := range [][]byte{nil, {0x30}, {0x30, 0x00}, append(prm, 0)} {
		if _, err := Decrypt(in, []byte("x"), ct, 10000); err == nil {
			t.Errorf("Decrypt(% x) accepted malformed parameters", in)
		}
	}
}
