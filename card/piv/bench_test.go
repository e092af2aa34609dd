package piv

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"testing"

	"github.com/vscard/vscard/tlv"
)

// BenchmarkSignP256 is one ECDSA P-256 signature through Transmit: GENERAL
// AUTHENTICATE on 9A (PIN verified once, as in a session) with a SHA-256
// digest, answered in one APDU.
func BenchmarkSignP256(b *testing.B) {
	key := testKeys()["p256"].(*ecdsa.PrivateKey)
	c, _ := keyCard(b, key, KeyAuthentication)
	verifyPIN(b, c, "123456")
	h := sha256.Sum256([]byte("bench"))
	body := tlv.AppendBER(nil, 0x7C, tlv.AppendBER(tlv.AppendBER(nil, 0x82, nil), 0x81, h[:]))
	cmd := append(append([]byte{0x00, 0x87, AlgECCP256, KeyAuthentication, byte(len(body))}, body...), 0x00)
	ctx := context.Background()
	out, _ := c.Transmit(ctx, cmd)
	v := authValue(b, out[:len(out)-2], 0x82)
	if !ecdsa.VerifyASN1(&key.PublicKey, h[:], v) {
		b.Fatal("signature does not verify")
	}
	b.ReportAllocs()
	for b.Loop() {
		out, err := c.Transmit(ctx, cmd)
		if err != nil || out[len(out)-2] != 0x90 {
			b.Fatalf("%X %v", out, err)
		}
	}
}

// BenchmarkSignRSA2048 is one RSA-2048 signature through Transmit as
// OpenSC sends it: the 256-byte PKCS#1 block in a chained part (CLA 10)
// and a final part, then GET RESPONSE for the 264-byte answer.
func BenchmarkSignRSA2048(b *testing.B) {
	key := testKeys()["rsa2048"].(*rsa.PrivateKey)
	c, _ := keyCard(b, key, KeyAuthentication)
	verifyPIN(b, c, "123456")
	block, h := pkcs1Block(b, &key.PublicKey, []byte("bench"))
	body := tlv.AppendBER(nil, 0x7C, tlv.AppendBER(tlv.AppendBER(nil, 0x82, nil), 0x81, block))
	part1 := append([]byte{0x10, 0x87, AlgRSA2048, KeyAuthentication, 0xFF}, body[:255]...)
	part2 := append(append([]byte{0x00, 0x87, AlgRSA2048, KeyAuthentication, byte(len(body) - 255)}, body[255:]...), 0x00)
	getResp := []byte{0x00, 0xC0, 0x00, 0x00, 0x00}
	ctx := context.Background()
	sign := func() []byte {
		if out, err := c.Transmit(ctx, part1); err != nil || len(out) != 2 || out[0] != 0x90 {
			b.Fatalf("part 1: %X %v", out, err)
		}
		out, err := c.Transmit(ctx, part2)
		if err != nil || out[0] != 0x61 {
			b.Fatalf("part 2: %X %v", out, err)
		}
		var data []byte
		for out[len(out)-2] == 0x61 {
			out, _ = c.Transmit(ctx, getResp)
			data = append(data, out[:len(out)-2]...)
		}
		return data
	}
	if err := rsa.VerifyPKCS1v15(&key.PublicKey, crypto.SHA256, h, authValue(b, sign(), 0x82)); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		sign()
	}
}
