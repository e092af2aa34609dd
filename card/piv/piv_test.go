package piv

import (
	"bytes"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/des"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/tlv"
	"github.com/vscard/vscard/token"
)

// testKeys are generated once per test binary: RSA generation is slow.
var testKeys = sync.OnceValue(func() map[string]crypto.Signer {
	m := map[string]crypto.Signer{}
	for name, bits := range map[string]int{"rsa1024": 1024, "rsa2048": 2048, "rsa3072": 3072, "rsa4096": 4096} {
		k, err := rsa.GenerateKey(rand.Reader, bits)
		if err != nil {
			panic(err)
		}
		m[name] = k
	}
	for name, c := range map[string]elliptic.Curve{"p256": elliptic.P256(), "p384": elliptic.P384()} {
		k, err := ecdsa.GenerateKey(c, rand.Reader)
		if err != nil {
			panic(err)
		}
		m[name] = k
	}
	return m
})

// tx sends a hex command (or raw bytes) and returns data and status,
// following 61 xx with GET RESPONSE as a host does.
func tx(t testing.TB, c *Card, cmd []byte) ([]byte, apdu.SW) {
	t.Helper()
	ctx := context.Background()
	var data []byte
	for range 300 {
		out, err := c.Transmit(ctx, cmd)
		if err != nil {
			t.Fatalf("%X: %v", cmd, err)
		}
		if len(out) < 2 {
			t.Fatalf("%X: answer %X", cmd, out)
		}
		sw := apdu.SW(out[len(out)-2])<<8 | apdu.SW(out[len(out)-1])
		data = append(data, out[:len(out)-2]...)
		if sw.SW1() != 0x61 {
			return data, sw
		}
		cmd = []byte{0x00, 0xC0, 0x00, 0x00, sw.SW2()}
	}
	t.Fatal("endless 61 xx")
	return nil, 0
}

// send builds a command, chaining data over 255 bytes with CLA 10 as
// OpenSC does, and returns the final answer.
func send(t testing.TB, c *Card, ins, p1, p2 byte, data []byte) ([]byte, apdu.SW) {
	t.Helper()
	for len(data) > 255 {
		cmd := append([]byte{0x10, ins, p1, p2, 0xFF}, data[:255]...)
		if out, sw := tx(t, c, cmd); sw != apdu.SWOK || len(out) != 0 {
			t.Fatalf("chained part: %X %v", out, sw)
		}
		data = data[255:]
	}
	cmd := []byte{0x00, ins, p1, p2}
	if len(data) > 0 {
		cmd = append(append(cmd, byte(len(data))), data...)
	}
	return tx(t, c, append(cmd, 0x00))
}

func pinBlock(pin string) []byte {
	b := bytes.Repeat([]byte{0xFF}, 8)
	copy(b, pin)
	return b
}

func verifyPIN(t testing.TB, c *Card, pin string) {
	t.Helper()
	if _, sw := send(t, c, 0x20, 0x00, 0x80, pinBlock(pin)); sw != apdu.SWOK {
		t.Fatalf("VERIFY: %v", sw)
	}
}

// authenticate runs mutual authentication with the management key.
func authenticate(t testing.TB, c *Card, alg byte, key []byte) apdu.SW {
	t.Helper()
	var blk cipher.Block
	var err error
	if alg == AlgTDES {
		blk, err = des.NewTripleDESCipher(key)
	} else {
		blk, err = aes.NewCipher(key)
	}
	if err != nil {
		t.Fatal(err)
	}
	bs := blk.BlockSize()
	resp, sw := send(t, c, 0x87, alg, 0x9B, []byte{0x7C, 0x02, 0x80, 0x00})
	if sw != apdu.SWOK {
		return sw
	}
	enc := authValue(t, resp, 0x80)
	if len(enc) != bs {
		t.Fatalf("witness of %d bytes for block size %d", len(enc), bs)
	}
	w := make([]byte, bs)
	blk.Decrypt(w, enc)
	ch := make([]byte, bs)
	rand.Read(ch)
	in := tlv.AppendBER(tlv.AppendBER(nil, 0x80, w), 0x81, ch)
	resp, sw = send(t, c, 0x87, alg, 0x9B, tlv.AppendBER(nil, 0x7C, in))
	if sw != apdu.SWOK {
		return sw
	}
	got := authValue(t, resp, 0x82)
	want := make([]byte, bs)
	blk.Encrypt(want, ch)
	if !bytes.Equal(got, want) {
		t.Fatalf("card's answer to the challenge %X, want %X", got, want)
	}
	return sw
}

func authValue(t testing.TB, resp []byte, tag uint32) []byte {
	t.Helper()
	outer, rest, err := tlv.ReadBER(resp)
	if err != nil || outer.Tag != 0x7C || len(rest) != 0 {
		t.Fatalf("answer %X is no 7C template", resp)
	}
	v, ok := tlv.FindBER(outer.Value, tag)
	if !ok {
		t.Fatalf("answer %X lacks tag %X", resp, tag)
	}
	return v
}

func selfSigned(t testing.TB, key crypto.Signer) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "piv test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestCertTag(t *testing.T) {
	for _, tc := range []struct {
		ref byte
		tag uint32
		ok  bool
	}{
		{0x9A, 0x5FC105, true}, {0x9C, 0x5FC10A, true}, {0x9D, 0x5FC10B, true}, {0x9E, 0x5FC101, true},
		{0x82, 0x5FC10D, true}, {0x83, 0x5FC10E, true}, {0x94, 0x5FC11F, true}, {0x95, 0x5FC120, true},
		{0x9B, 0, false}, {0x81, 0, false}, {0x96, 0, false}, {0x80, 0, false}, {0xF9, 0, false}, {0x00, 0, false},
	} {
		tag, ok := CertTag(tc.ref)
		if tag != tc.tag || ok != tc.ok {
			t.Errorf("CertTag(%02X) = %X, %v; want %X, %v", tc.ref, tag, ok, tc.tag, tc.ok)
		}
	}
}

func TestCertObject(t *testing.T) {
	for _, n := range []int{0, 1, 127, 128, 255, 256, 1500} {
		der := bytes.Repeat([]byte{0x30}, n)
		got := CertObject(der)
		elems, err := tlv.ParseBER(got)
		if err != nil || len(elems) != 3 {
			t.Fatalf("%d bytes: %X: %v", n, got, err)
		}
		if elems[0].Tag != 0x70 || !bytes.Equal(elems[0].Value, der) ||
			elems[1].Tag != 0x71 || !bytes.Equal(elems[1].Value, []byte{0}) ||
			elems[2].Tag != 0xFE || len(elems[2].Value) != 0 {
			t.Errorf("%d bytes: %X", n, got)
		}
	}
}

// decodeFASCN reverses the TIG SCEPACS 5-bit encoding, checking every
// character's odd parity and the LRC.
func decodeFASCN(t *testing.T, b []byte) []byte {
	t.Helper()
	if len(b) != 25 {
		t.Fatalf("FASC-N of %d bytes", len(b))
	}
	bit := func(i int) byte { return b[i/8] >> (7 - i%8) & 1 }
	var chars []byte
	var lrc byte
	for i := 0; i < 40; i++ {
		var c, ones byte
		for j := 0; j < 4; j++ {
			v := bit(i*5 + j)
			c |= v << j
			ones += v
		}
		if (ones+bit(i*5+4))%2 != 1 {
			t.Fatalf("character %d: even parity", i)
		}
		if i < 39 {
			lrc ^= c
		} else if c != lrc {
			t.Fatalf("LRC %X, want %X", c, lrc)
		}
		chars = append(chars, c)
	}
	return chars
}

func TestPersonalize(t *testing.T) {
	key := testKeys()["p256"]
	cert := selfSigned(t, key)
	a := NewMemoryStore("123456", "12345678", AlgAES192, make([]byte, 24))
	b := NewMemoryStore("123456", "12345678", AlgAES192, make([]byte, 24))
	exp := time.Date(2031, 7, 9, 12, 0, 0, 0, time.UTC)
	if err := Personalize(a, Personalization{Certs: map[byte]*x509.Certificate{KeyAuthentication: cert, 0x83: cert}, Expiry: exp}); err != nil {
		t.Fatal(err)
	}
	if err := Personalize(b, Personalization{}); err != nil {
		t.Fatal(err)
	}
	if err := Personalize(NewMemoryStore("1", "2", AlgTDES, nil), Personalization{Certs: map[byte]*x509.Certificate{0x9B: cert}}); err == nil {
		t.Error("Personalize accepted a certificate for 9B")
	}
	obj := func(st *MemoryStore, tag uint32) []byte {
		v, err := st.Object(tag)
		if err != nil {
			t.Fatalf("object %X: %v", tag, err)
		}
		return v
	}
	chuid := obj(a, TagCHUID)
	elems, err := tlv.ParseBER(chuid)
	if err != nil {
		t.Fatal(err)
	}
	var tags []uint32
	for _, e := range elems {
		tags = append(tags, e.Tag)
	}
	if fmt.Sprint(tags) != fmt.Sprint([]uint32{0x30, 0x34, 0x35, 0x3E, 0xFE}) {
		t.Fatalf("CHUID tags %X", tags)
	}
	chars := decodeFASCN(t, elems[0].Value)
	if chars[0] != 0xB || !bytes.Equal(chars[1:5], []byte{9, 9, 9, 9}) || chars[5] != 0xD || chars[38] != 0xF {
		t.Errorf("FASC-N characters %X", chars)
	}
	if len(elems[1].Value) != 16 || string(elems[2].Value) != "20310709" {
		t.Errorf("GUID %X, expiry %q", elems[1].Value, elems[2].Value)
	}
	if bytes.Equal(chuid, obj(b, TagCHUID)) {
		t.Error("two cards got the same CHUID")
	}
	if g, _ := tlv.FindBER(obj(b, TagCHUID), 0x34); bytes.Equal(g, elems[1].Value) {
		t.Error("two cards got the same GUID")
	}
	if !bytes.Equal(obj(a, TagDiscovery), mustHex(t, "4F0BA0000003080000100001005F2F024000")) {
		t.Errorf("Discovery %X", obj(a, TagDiscovery))
	}
	if !bytes.Equal(obj(a, 0x5FC105), CertObject(cert.Raw)) || !bytes.Equal(obj(a, 0x5FC10E), CertObject(cert.Raw)) {
		t.Error("certificate objects differ from CertObject")
	}
	if _, err := a.Object(0x5FC10A); !errors.Is(err, ErrNotFound) {
		t.Errorf("9C certificate present: %v", err)
	}
	if kh := obj(a, TagKeyHistory); !bytes.Equal(kh, mustHex(t, "C10101C20100FE00")) {
		t.Errorf("Key History %X, want one retired key on card", kh)
	}
	ccc := obj(a, TagCCC)
	if id, ok := tlv.FindBER(ccc, 0xF0); !ok || len(id) != 21 || !bytes.HasPrefix(id, []byte{0xA0, 0x00, 0x00, 0x01, 0x16}) {
		t.Errorf("CCC card identifier %X", id)
	}
	if p, ok := tlv.FindBER(obj(a, TagPrinted), 0x04); !ok || string(p) != "2031JUL09" {
		t.Errorf("printed expiry %q", p)
	}
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := apdu.ParseHex(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestATR(t *testing.T) {
	a, err := card.ParseATR(atr)
	if err != nil {
		t.Fatalf("ParseATR(%X): %v", atr, err)
	}
	var ts []int
	for _, g := range a.Groups {
		if g.HasTD {
			ts = append(ts, int(g.TD&0x0F))
		}
	}
	if fmt.Sprint(ts) != "[0 1]" {
		t.Errorf("ATR offers protocols %v, want T=0 (QEMU usb-ccid) and T=1 (yubico-piv-tool)", ts)
	}
	if len(atr) > card.MaxATRLen {
		t.Errorf("ATR of %d bytes", len(atr))
	}
	cac := []byte{0x3B, 0x7A, 0x18, 0x00, 0x00, 0x73, 0x66, 0x74, 0x65, 0x20, 0x63, 0x64, 0x31, 0x34, 0x34}
	if bytes.Equal(atr, cac) {
		t.Error("PIV ATR is the CAC ATR")
	}
}

func TestMatchAID(t *testing.T) {
	for n := 0; n <= len(aid)+1; n++ {
		sel := append([]byte(nil), aid[:min(n, len(aid))]...)
		if n > len(aid) {
			sel = append(sel, 0x00)
		}
		want := n >= 5 && n <= len(aid)
		if got := matchAID(nil, sel); got != want {
			t.Errorf("%X: match %v, want %v", sel, got, want)
		}
	}
	if matchAID(nil, []byte{0xA0, 0x00, 0x00, 0x03, 0x09}) {
		t.Error("a different RID matched")
	}
}

// keyCard is a card with key in ref (and its certificate), PIN 123456.
func keyCard(t testing.TB, key crypto.Signer, refs ...byte) (*Card, *MemoryStore) {
	t.Helper()
	st := NewMemoryStore("123456", "12345678", AlgAES128, bytes.Repeat([]byte{0x42}, 16))
	certs := map[byte]*x509.Certificate{}
	cert := selfSigned(t, key)
	for _, ref := range refs {
		if err := st.SetKey(ref, key); err != nil {
			t.Fatal(err)
		}
		certs[ref] = cert
	}
	if err := Personalize(st, Personalization{Certs: certs}); err != nil {
		t.Fatal(err)
	}
	c, err := New(st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	return c, st
}

// ga sends GENERAL AUTHENTICATE 7C { 82 00, tag <in> }.
func ga(t testing.TB, c *Card, alg, ref byte, tag uint32, in []byte) ([]byte, apdu.SW) {
	t.Helper()
	body := tlv.AppendBER(nil, 0x7C, tlv.AppendBER(tlv.AppendBER(nil, 0x82, nil), tag, in))
	resp, sw := send(t, c, 0x87, alg, ref, body)
	if sw != apdu.SWOK {
		return nil, sw
	}
	return authValue(t, resp, 0x82), sw
}

func pkcs1Block(t testing.TB, pub *rsa.PublicKey, msg []byte) ([]byte, []byte) {
	h := sha256.Sum256(msg)
	prefix := []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}
	k := pub.Size()
	block := bytes.Repeat([]byte{0xFF}, k)
	block[0], block[1] = 0, 1
	t0 := append(prefix, h[:]...)
	block[k-len(t0)-1] = 0
	copy(block[k-len(t0):], t0)
	return block, h[:]
}

// TestGeneralAuthenticateRSA: raw private operation for every RSA size,
// PKCS#1 v1.5 and a non-PKCS#1 block (decryption), chained over 255 bytes.
func TestGeneralAuthenticateRSA(t *testing.T) {
	for _, tc := range []struct {
		name string
		alg  byte
	}{{"rsa1024", AlgRSA1024}, {"rsa2048", AlgRSA2048}, {"rsa3072", AlgRSA3072}, {"rsa4096", AlgRSA4096}} {
		t.Run(tc.name, func(t *testing.T) {
			key := testKeys()[tc.name].(*rsa.PrivateKey)
			c, _ := keyCard(t, key, KeyAuthentication)
			block, h := pkcs1Block(t, &key.PublicKey, []byte("message"))
			if _, sw := ga(t, c, tc.alg, KeyAuthentication, 0x81, block); sw != apdu.SWSecurityNotSatisfied {
				t.Fatalf("before VERIFY: %v, want 69 82", sw)
			}
			verifyPIN(t, c, "123456")
			sig, sw := ga(t, c, tc.alg, KeyAuthentication, 0x81, block)
			if sw != apdu.SWOK {
				t.Fatalf("sign: %v", sw)
			}
			if err := rsa.VerifyPKCS1v15(&key.PublicKey, crypto.SHA256, h, sig); err != nil {
				t.Fatalf("signature does not verify: %v", err)
			}
			// Decryption: the raw operation on an OAEP ciphertext.
			ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, &key.PublicKey, []byte("secret"), nil)
			if err != nil {
				t.Fatal(err)
			}
			raw, sw := ga(t, c, tc.alg, KeyAuthentication, 0x81, ct)
			if sw != apdu.SWOK {
				t.Fatalf("decrypt: %v", sw)
			}
			em := new(big.Int).SetBytes(raw)
			if c := new(big.Int).Exp(em, big.NewInt(int64(key.E)), key.N); !bytes.Equal(c.FillBytes(make([]byte, key.Size())), ct) {
				t.Fatal("raw result is not the ciphertext's e-th root")
			}
			// Wrong length, wrong algorithm, empty slot.
			if _, sw := ga(t, c, tc.alg, KeyAuthentication, 0x81, block[1:]); sw != apdu.SWWrongData {
				t.Errorf("short block: %v", sw)
			}
			if _, sw := ga(t, c, AlgECCP256, KeyAuthentication, 0x81, block); sw != swIncorrectP1 {
				t.Errorf("wrong algorithm: %v", sw)
			}
			if _, sw := ga(t, c, tc.alg, KeyManagement, 0x81, block); sw != apdu.SWReferencedDataNotFound {
				t.Errorf("empty slot: %v", sw)
			}
			if _, sw := ga(t, c, tc.alg, KeyAuthentication, 0x85, block); sw != apdu.SWWrongData {
				t.Errorf("ECDH with an RSA key: %v", sw)
			}
		})
	}
}

// TestGeneralAuthenticateEC: ECDSA over a digest and ECDH with a peer
// point on P-256 and P-384, and the per-slot PIN policies.
func TestGeneralAuthenticateEC(t *testing.T) {
	for _, tc := range []struct {
		name string
		alg  byte
		hash crypto.Hash
	}{{"p256", AlgECCP256, crypto.SHA256}, {"p384", AlgECCP384, crypto.SHA384}} {
		t.Run(tc.name, func(t *testing.T) {
			key := testKeys()[tc.name].(*ecdsa.PrivateKey)
			c, st := keyCard(t, key, KeyAuthentication, KeySignature, KeyManagement, KeyCardAuthentication, 0x82)
			h := tc.hash.New()
			h.Write([]byte("message"))
			digest := h.Sum(nil)

			// 9E needs no PIN.
			sig, sw := ga(t, c, tc.alg, KeyCardAuthentication, 0x81, digest)
			if sw != apdu.SWOK || !ecdsa.VerifyASN1(&key.PublicKey, digest, sig) {
				t.Fatalf("9E sign without PIN: %v, verifies %v", sw, sw == apdu.SWOK && ecdsa.VerifyASN1(&key.PublicKey, digest, sig))
			}
			for _, ref := range []byte{KeyAuthentication, KeySignature, KeyManagement, 0x82} {
				if _, sw := ga(t, c, tc.alg, ref, 0x81, digest); sw != apdu.SWSecurityNotSatisfied {
					t.Errorf("%02X before VERIFY: %v, want 69 82", ref, sw)
				}
			}
			verifyPIN(t, c, "123456")
			// 9A, 9D and retired keys: once per session.
			for range 2 {
				for _, ref := range []byte{KeyAuthentication, KeyManagement, 0x82} {
					sig, sw := ga(t, c, tc.alg, ref, 0x81, digest)
					if sw != apdu.SWOK || !ecdsa.VerifyASN1(&key.PublicKey, digest, sig) {
						t.Fatalf("%02X after VERIFY: %v", ref, sw)
					}
				}
			}
			// 9C: one VERIFY, one signature.
			if sig, sw := ga(t, c, tc.alg, KeySignature, 0x81, digest); sw != apdu.SWOK || !ecdsa.VerifyASN1(&key.PublicKey, digest, sig) {
				t.Fatalf("9C after VERIFY: %v", sw)
			}
			if _, sw := ga(t, c, tc.alg, KeySignature, 0x81, digest); sw != apdu.SWSecurityNotSatisfied {
				t.Fatalf("second 9C signature without VERIFY: %v, want 69 82", sw)
			}
			verifyPIN(t, c, "123456")
			if _, sw := ga(t, c, tc.alg, KeySignature, 0x81, digest); sw != apdu.SWOK {
				t.Fatalf("9C after a second VERIFY: %v", sw)
			}

			// ECDH with the key management key.
			var curve ecdh.Curve = ecdh.P256()
			if tc.alg == AlgECCP384 {
				curve = ecdh.P384()
			}
			pk, err := curve.GenerateKey(rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			secret, sw := ga(t, c, tc.alg, KeyManagement, 0x85, pk.PublicKey().Bytes())
			if sw != apdu.SWOK {
				t.Fatalf("ECDH: %v", sw)
			}
			mine, _ := key.ECDH()
			want, err := pk.ECDH(mine.PublicKey())
			if err != nil || !bytes.Equal(secret, want) {
				t.Fatalf("ECDH secret %X, want %X (%v)", secret, want, err)
			}
			bad := pk.PublicKey().Bytes()
			bad[len(bad)-1] ^= 1
			if _, sw := ga(t, c, tc.alg, KeyManagement, 0x85, bad); sw != apdu.SWWrongData {
				t.Errorf("ECDH with a point off the curve: %v", sw)
			}
			// Digest longer than the curve, empty digest.
			if _, sw := ga(t, c, tc.alg, KeyAuthentication, 0x81, make([]byte, 65)); sw != apdu.SWWrongData {
				t.Errorf("65-byte digest: %v", sw)
			}
			if _, sw := ga(t, c, tc.alg, KeyAuthentication, 0x81, nil); sw != apdu.SWWrongData {
				t.Errorf("empty digest: %v", sw)
			}
			// Power off ends the session.
			c.PowerOff()
			c.PowerOn()
			if _, sw := ga(t, c, tc.alg, KeyAuthentication, 0x81, digest); sw != apdu.SWSecurityNotSatisfied {
				t.Errorf("after power cycle: %v", sw)
			}
			if left, _ := st.PIN().TriesLeft(); left != 3 {
				t.Errorf("PIN tries %d", left)
			}
		})
	}
}

// TestManagementKeyAlgorithms: mutual authentication with every
// management-key algorithm, and SET MANAGEMENT KEY to another one.
func TestManagementKeyAlgorithms(t *testing.T) {
	for _, tc := range []struct {
		alg byte
		n   int
	}{{AlgTDES, 24}, {AlgAES128, 16}, {AlgAES192, 24}, {AlgAES256, 32}} {
		t.Run(fmt.Sprintf("%02X", tc.alg), func(t *testing.T) {
			key := make([]byte, tc.n)
			rand.Read(key)
			st := NewMemoryStore("123456", "12345678", tc.alg, key)
			c, err := New(st, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if _, sw := send(t, c, 0xDB, 0x3F, 0xFF, mustHex(t, "7E00")); sw != apdu.SWSecurityNotSatisfied {
				t.Fatalf("PUT DATA before authentication: %v", sw)
			}
			wrong := append([]byte(nil), key...)
			wrong[0] ^= 0x80 // not a DES parity bit
			if tc.alg != AlgTDES {
				if sw := authenticate(t, c, tc.alg, wrong); sw != apdu.SWSecurityNotSatisfied {
					t.Fatalf("wrong key: %v", sw)
				}
			}
			if sw := authenticate(t, c, tc.alg, key); sw != apdu.SWOK {
				t.Fatalf("authenticate: %v", sw)
			}
			if _, sw := send(t, c, 0xDB, 0x3F, 0xFF, mustHex(t, "7E00")); sw != apdu.SWOK {
				t.Fatalf("PUT DATA after authentication: %v", sw)
			}
			// Switch to AES-256 with Yubico's SET MANAGEMENT KEY.
			nk := make([]byte, 32)
			rand.Read(nk)
			if _, sw := send(t, c, 0xFF, 0xFF, 0xFF, append([]byte{AlgAES256, 0x9B, 32}, nk...)); sw != apdu.SWOK {
				t.Fatalf("SET MANAGEMENT KEY: %v", sw)
			}
			if _, sw := send(t, c, 0xFF, 0xFF, 0xFF, append([]byte{AlgAES256, 0x9B, 31}, nk[:31]...)); sw != apdu.SWWrongData {
				t.Fatalf("SET MANAGEMENT KEY with 31 bytes for AES-256: %v", sw)
			}
			alg, k, _ := st.ManagementKey()
			if alg != AlgAES256 || !bytes.Equal(k, nk) {
				t.Fatal("new management key not stored")
			}
			c.Reset()
			if _, sw := send(t, c, 0xFF, 0xFF, 0xFF, append([]byte{AlgAES256, 0x9B, 32}, nk...)); sw != apdu.SWSecurityNotSatisfied {
				t.Fatalf("SET MANAGEMENT KEY without authentication: %v", sw)
			}
			if sw := authenticate(t, c, AlgAES256, nk); sw != apdu.SWOK {
				t.Fatalf("authenticate with the new key: %v", sw)
			}
		})
	}
}

// TestGenerate: GENERATE ASYMMETRIC KEY PAIR stores the key and answers
// its public part; the card then signs with it.
func TestGenerate(t *testing.T) {
	for _, tc := range []struct {
		alg byte
		ref byte
	}{{AlgECCP256, KeyAuthentication}, {AlgECCP384, KeySignature}, {AlgRSA1024, 0x95}, {AlgRSA2048, KeyManagement}, {AlgRSA3072, KeyCardAuthentication}, {AlgRSA4096, 0x82}} {
		t.Run(fmt.Sprintf("%02X", tc.alg), func(t *testing.T) {
			if testing.Short() && (tc.alg == AlgRSA4096 || tc.alg == AlgRSA3072) {
				t.Skip("slow key generation")
			}
			c, st := newTestCard(t)
			c.rand = rand.Reader
			body := []byte{0xAC, 0x03, 0x80, 0x01, tc.alg}
			if _, sw := send(t, c, 0x47, 0x00, tc.ref, body); sw != apdu.SWSecurityNotSatisfied {
				t.Fatalf("without management key: %v", sw)
			}
			if sw := authenticate(t, c, AlgTDES, defaultMgmKey); sw != apdu.SWOK {
				t.Fatal(sw)
			}
			// With Yubico's PIN and touch policies, accepted and ignored.
			out, sw := send(t, c, 0x47, 0x00, tc.ref, []byte{0xAC, 0x09, 0x80, 0x01, tc.alg, 0xAA, 0x01, 0x02, 0xAB, 0x01, 0x01})
			if sw != apdu.SWOK {
				t.Fatalf("GENERATE: %v", sw)
			}
			outer, rest, err := tlv.ReadBER(out)
			if err != nil || outer.Tag != 0x7F49 || len(rest) != 0 {
				t.Fatalf("answer %X", out)
			}
			key, err := st.Key(tc.ref)
			if err != nil {
				t.Fatal(err)
			}
			switch pub := key.Public().(type) {
			case *rsa.PublicKey:
				n, _ := tlv.FindBER(outer.Value, 0x81)
				e, _ := tlv.FindBER(outer.Value, 0x82)
				if !bytes.Equal(n, pub.N.Bytes()) || new(big.Int).SetBytes(e).Int64() != int64(pub.E) {
					t.Fatal("7F 49 is not the stored key")
				}
				if _, ok := key.(token.RawRSA); !ok {
					t.Fatal("stored RSA key cannot do raw RSA")
				}
			case *ecdsa.PublicKey:
				p, _ := tlv.FindBER(outer.Value, 0x86)
				want, _ := pub.ECDH()
				if !bytes.Equal(p, want.Bytes()) {
					t.Fatal("86 is not the stored key's point")
				}
			}
			if got, ok := keyAlg(key.Public()); !ok || got != tc.alg {
				t.Fatalf("stored key algorithm %02X", got)
			}
			for _, bad := range []string{"AC03800103", "AC0380011100", "AB03800111", "AC0480021111", "AC00"} {
				if _, sw := send(t, c, 0x47, 0x00, tc.ref, mustHex(t, bad)); sw == apdu.SWOK {
					t.Errorf("GENERATE %s: 90 00", bad)
				}
			}
			if _, sw := send(t, c, 0x47, 0x00, 0x9B, body); sw != apdu.SWIncorrectP1P2 {
				t.Errorf("GENERATE in 9B: %v", sw)
			}
		})
	}
}

// TestObjects: access rules of GET DATA, certificates through 61 xx, PUT
// DATA with command chaining.
func TestObjects(t *testing.T) {
	key := testKeys()["rsa4096"]
	c, _ := keyCard(t, key, KeyAuthentication, KeySignature, KeyManagement, KeyCardAuthentication, 0x82, 0x95)
	for _, ref := range []byte{0x9A, 0x9C, 0x9D, 0x9E, 0x82, 0x95} {
		tag, _ := CertTag(ref)
		out, sw := send(t, c, 0xCB, 0x3F, 0xFF, tlv.AppendBER(nil, 0x5C, tlv.AppendBERTag(nil, tag)))
		if sw != apdu.SWOK {
			t.Fatalf("certificate %02X: %v", ref, sw)
		}
		v, _ := tlv.FindBER(out, 0x53)
		der, _ := tlv.FindBER(v, 0x70)
		if _, err := x509.ParseCertificate(der); err != nil || len(out) < 256 {
			t.Fatalf("certificate %02X: %v", ref, err)
		}
	}
	for _, ref := range []byte{0x83, 0x94} {
		tag, _ := CertTag(ref)
		if _, sw := send(t, c, 0xCB, 0x3F, 0xFF, tlv.AppendBER(nil, 0x5C, tlv.AppendBERTag(nil, tag))); sw != apdu.SWFileNotFound {
			t.Errorf("empty retired slot %02X: %v", ref, sw)
		}
	}
	// Printed Information needs the PIN; CHUID, CCC and Key History do not.
	if _, sw := send(t, c, 0xCB, 0x3F, 0xFF, mustHex(t, "5C035FC109")); sw != apdu.SWSecurityNotSatisfied {
		t.Fatalf("Printed Information before VERIFY: %v", sw)
	}
	for _, tag := range []string{"5FC102", "5FC107", "5FC10C"} {
		if _, sw := send(t, c, 0xCB, 0x3F, 0xFF, mustHex(t, "5C03"+tag)); sw != apdu.SWOK {
			t.Errorf("%s: %v", tag, sw)
		}
	}
	verifyPIN(t, c, "123456")
	if out, sw := send(t, c, 0xCB, 0x3F, 0xFF, mustHex(t, "5C035FC109")); sw != apdu.SWOK || out[0] != 0x53 {
		t.Fatalf("Printed Information after VERIFY: %X %v", out, sw)
	}
	for _, bad := range []string{"", "5C00", "5C045FC10900", "5D035FC109", "5C035FC1", "5C035FC10900"} {
		if _, sw := send(t, c, 0xCB, 0x3F, 0xFF, mustHex(t, bad)); sw != apdu.SWWrongData {
			t.Errorf("GET DATA %q: %v", bad, sw)
		}
	}
	if _, sw := send(t, c, 0xCB, 0x3F, 0x00, mustHex(t, "5C017E")); sw != apdu.SWIncorrectP1P2 {
		t.Errorf("GET DATA P2=00: %v", sw)
	}

	// A 3000-byte object written in chained parts, read back.
	if sw := authenticate(t, c, AlgAES128, bytes.Repeat([]byte{0x42}, 16)); sw != apdu.SWOK {
		t.Fatal(sw)
	}
	big3k := bytes.Repeat([]byte("vscard"), 500)
	put := append(mustHex(t, "5C035FC122"), tlv.AppendBER(nil, 0x53, big3k)...)
	if _, sw := send(t, c, 0xDB, 0x3F, 0xFF, put); sw != apdu.SWOK {
		t.Fatalf("PUT DATA chained: %v", sw)
	}
	out, sw := send(t, c, 0xCB, 0x3F, 0xFF, mustHex(t, "5C035FC122"))
	if v, _ := tlv.FindBER(out, 0x53); sw != apdu.SWOK || !bytes.Equal(v, big3k) {
		t.Fatalf("read back: %v, %d bytes", sw, len(out))
	}
	// A chain interrupted by another command is dropped.
	ctx := context.Background()
	part := append([]byte{0x10, 0xDB, 0x3F, 0xFF, 0x05}, mustHex(t, "5C035FC1")...)
	part = append(part, 0x23)
	if out, _ := c.Transmit(ctx, part); !bytes.Equal(out, []byte{0x90, 0x00}) {
		t.Fatalf("chained part: %X", out)
	}
	tx(t, c, mustHex(t, "00FD000000"))
	if _, sw := tx(t, c, mustHex(t, "00DB3FFF0453025678")); sw != apdu.SWWrongData {
		t.Fatalf("tail of an abandoned chain: %v", sw)
	}
	// A chain past maxChain is refused.
	chunk := append([]byte{0x10, 0xDB, 0x3F, 0xFF, 0xFF}, make([]byte, 255)...)
	var last []byte
	for range maxChain/255 + 2 {
		last, _ = c.Transmit(ctx, chunk)
		if !bytes.Equal(last, []byte{0x90, 0x00}) {
			break
		}
	}
	if !bytes.Equal(last, []byte{0x6A, 0x84}) {
		t.Fatalf("oversized chain: %X", last)
	}
	// Chaining an instruction that takes no long data.
	if out, _ := c.Transmit(ctx, mustHex(t, "10CB3FFF035C017E")); !bytes.Equal(out, []byte{0x6A, 0x81}) {
		t.Fatalf("chained GET DATA: %X", out)
	}
}

// failStore fails every write.
type failStore struct{ *MemoryStore }

var errDisk = errors.New("disk full")

func (failStore) PutObject(uint32, []byte) error      { return errDisk }
func (failStore) SetKey(byte, crypto.Signer) error    { return errDisk }
func (failStore) SetManagementKey(byte, []byte) error { return errDisk }

// TestStoreFailures: a write the store cannot make is never answered
// 90 00.
func TestStoreFailures(t *testing.T) {
	st := NewMemoryStore("123456", "12345678", AlgTDES, defaultMgmKey)
	c, err := New(failStore{st}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if sw := authenticate(t, c, AlgTDES, defaultMgmKey); sw != apdu.SWOK {
		t.Fatal(sw)
	}
	for _, tc := range []struct {
		name string
		ins  byte
		p1   byte
		p2   byte
		data string
	}{
		{"PUT DATA", 0xDB, 0x3F, 0xFF, "5C035FC1025300"},
		{"GENERATE", 0x47, 0x00, 0x9A, "AC03800111"},
		{"SET MANAGEMENT KEY", 0xFF, 0xFF, 0xFF, "089B1000112233445566778899AABBCCDDEEFF"},
	} {
		if _, sw := send(t, c, tc.ins, tc.p1, tc.p2, mustHex(t, tc.data)); sw != apdu.SWMemoryFailure {
			t.Errorf("%s with a failing store: %v, want 65 81", tc.name, sw)
		}
	}
	if _, err := st.Key(0x9A); err == nil {
		t.Error("a key was stored")
	}
}

// TestYubicoExtensions: GET VERSION and GET SERIAL.
func TestYubicoExtensions(t *testing.T) {
	st := NewMemoryStore("123456", "12345678", AlgTDES, defaultMgmKey)
	c, _ := New(st, Options{Version: [3]byte{4, 3, 1}, Serial: 0x01020304})
	if out, sw := tx(t, c, mustHex(t, "00FD000000")); sw != apdu.SWOK || !bytes.Equal(out, []byte{4, 3, 1}) {
		t.Errorf("GET VERSION: %X %v", out, sw)
	}
	if out, sw := tx(t, c, mustHex(t, "00F8000000")); sw != apdu.SWOK || !bytes.Equal(out, []byte{1, 2, 3, 4}) {
		t.Errorf("GET SERIAL: %X %v", out, sw)
	}
	// Derived serials differ per card and fit in 31 bits.
	a, _ := newTestCard(t)
	st2 := NewMemoryStore("123456", "12345678", AlgTDES, defaultMgmKey)
	Personalize(st2, Personalization{})
	b, _ := New(st2, Options{})
	sa, _ := tx(t, a, mustHex(t, "00F8000000"))
	sb, _ := tx(t, b, mustHex(t, "00F8000000"))
	if bytes.Equal(sa, sb) || sa[0]&0x80 != 0 || sb[0]&0x80 != 0 {
		t.Errorf("serials %X and %X", sa, sb)
	}
}

// TestImportKey: Yubico's IMPORT KEY stores RSA (CRT parts) and EC keys
// the card then uses, and refuses inconsistent ones.
func TestImportKey(t *testing.T) {
	c, st := newTestCard(t)
	rk := testKeys()["rsa2048"].(*rsa.PrivateKey)
	ek := testKeys()["p384"].(*ecdsa.PrivateKey)
	pad := func(b []byte, n int) []byte { return append(make([]byte, n-len(b)), b...) }
	rsaData := func(dp *big.Int) []byte {
		var out []byte
		for i, v := range []*big.Int{rk.Primes[0], rk.Primes[1], dp, rk.Precomputed.Dq, rk.Precomputed.Qinv} {
			out = tlv.AppendBER(out, uint32(i+1), pad(v.Bytes(), 128))
		}
		return append(out, 0xAA, 0x01, 0x01, 0xAB, 0x01, 0x01)
	}
	good := rsaData(rk.Precomputed.Dp)
	if _, sw := send(t, c, 0xFE, AlgRSA2048, KeyAuthentication, good); sw != apdu.SWSecurityNotSatisfied {
		t.Fatalf("without management key: %v", sw)
	}
	if sw := authenticate(t, c, AlgTDES, defaultMgmKey); sw != apdu.SWOK {
		t.Fatal(sw)
	}
	if _, sw := send(t, c, 0xFE, AlgRSA2048, KeyAuthentication, rsaData(new(big.Int).Add(rk.Precomputed.Dp, big.NewInt(2)))); sw != apdu.SWWrongData {
		t.Errorf("inconsistent dp: %v", sw)
	}
	if _, sw := send(t, c, 0xFE, AlgRSA3072, KeyAuthentication, good); sw != apdu.SWWrongData {
		t.Errorf("RSA-2048 parts as RSA-3072: %v", sw)
	}
	if _, sw := send(t, c, 0xFE, AlgRSA2048, KeyAuthentication, good); sw != apdu.SWOK {
		t.Fatalf("import RSA: %v", sw)
	}
	scalar := pad(ek.D.Bytes(), 48)
	if _, sw := send(t, c, 0xFE, AlgECCP256, KeyManagement, tlv.AppendBER(nil, 0x06, scalar)); sw != apdu.SWWrongData {
		t.Errorf("P-384 scalar as P-256: %v", sw)
	}
	if _, sw := send(t, c, 0xFE, AlgECCP384, KeyManagement, tlv.AppendBER(nil, 0x06, scalar)); sw != apdu.SWOK {
		t.Fatalf("import EC: %v", sw)
	}
	if _, sw := send(t, c, 0xFE, AlgECCP384, 0x9B, tlv.AppendBER(nil, 0x06, scalar)); sw != apdu.SWIncorrectP1P2 {
		t.Errorf("import into 9B: %v", sw)
	}
	for ref, want := range map[byte]crypto.PublicKey{KeyAuthentication: &rk.PublicKey, KeyManagement: &ek.PublicKey} {
		k, err := st.Key(ref)
		if err != nil || !k.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(want) {
			t.Fatalf("key %02X: %v", ref, err)
		}
	}
	// The imported keys work.
	verifyPIN(t, c, "123456")
	block, h := pkcs1Block(t, &rk.PublicKey, []byte("imported"))
	sig, sw := ga(t, c, AlgRSA2048, KeyAuthentication, 0x81, block)
	if sw != apdu.SWOK || rsa.VerifyPKCS1v15(&rk.PublicKey, crypto.SHA256, h, sig) != nil {
		t.Fatalf("signature with the imported RSA key: %v", sw)
	}
	d := sha256.Sum256([]byte("imported"))
	sig, sw = ga(t, c, AlgECCP384, KeyManagement, 0x81, d[:])
	if sw != apdu.SWOK || !ecdsa.VerifyASN1(&ek.PublicKey, d[:], sig) {
		t.Fatalf("signature with the imported EC key: %v", sw)
	}
}

// TestCountersSurviveRestart: the retry counters live in the Store, so a
// new Card on the same store (a restarted vscard) sees them.
func TestCountersSurviveRestart(t *testing.T) {
	_, st := newTestCard(t)
	restart := func() *Card {
		c, err := New(st, Options{})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := restart()
	for _, want := range []apdu.SW{0x63C2, 0x63C1, 0x63C0} {
		if _, sw := send(t, c, 0x20, 0x00, 0x80, pinBlock("999999")); sw != want {
			t.Fatalf("wrong PIN: %v, want %v", sw, want)
		}
	}
	c = restart()
	if _, sw := tx(t, c, mustHex(t, "0020008000")); sw != apdu.SWAuthBlocked {
		t.Fatalf("after restart: %v, want 69 83", sw)
	}
	if _, sw := send(t, c, 0x2C, 0x00, 0x80, append([]byte("12345670"), pinBlock("999999")...)); sw != 0x63C2 {
		t.Fatalf("wrong PUK: %v", sw)
	}
	c = restart()
	if _, sw := tx(t, c, mustHex(t, "0020008100")); sw != 0x63C2 {
		t.Fatalf("PUK counter after restart: %v, want 63 C2", sw)
	}
	if _, sw := send(t, c, 0x2C, 0x00, 0x80, append([]byte("12345678"), pinBlock("246810")...)); sw != apdu.SWOK {
		t.Fatalf("unblock: %v", sw)
	}
	c = restart()
	if _, sw := tx(t, c, mustHex(t, "0020008000")); sw != 0x63C3 {
		t.Fatalf("after unblock and restart: %v, want 63 C3", sw)
	}
	verifyPIN(t, c, "246810")
}
