package token

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"testing"
)

func loadRSA(t testing.TB) *RSAKey {
	t.Helper()
	b, err := os.ReadFile("testdata/rsa2048.pem")
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return NewRSAKey(k.(*rsa.PrivateKey))
}

// pkcs1Block builds the EMSA-PKCS1-v1_5 block a host sends for a SHA-256
// signature, as OpenSC does before a CAC SIGN.
func pkcs1Block(size int, digest []byte) []byte {
	prefix := []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}
	t := append(prefix, digest...)
	block := make([]byte, size)
	block[1] = 1
	for i := 2; i < size-len(t)-1; i++ {
		block[i] = 0xFF
	}
	copy(block[size-len(t):], t)
	return block
}

func TestRawRSAMatchesPKCS1v15(t *testing.T) {
	k := loadRSA(t)
	digest := sha256.Sum256([]byte("vscard"))
	want, err := rsa.SignPKCS1v15(nil, k.PrivateKey, crypto.SHA256, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	got, err := k.RawRSA(context.Background(), pkcs1Block(k.Size(), digest[:]))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("raw private operation differs from crypto/rsa's PKCS#1 v1.5 signature")
	}
}

func TestRawRSADecryptsOAEPBlock(t *testing.T) {
	k := loadRSA(t)
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, &k.PublicKey, []byte("secret"), nil)
	if err != nil {
		t.Fatal(err)
	}
	em, err := k.RawRSA(context.Background(), ct)
	if err != nil {
		t.Fatal(err)
	}
	// The host strips OAEP itself; the first byte of an OAEP block is 00.
	if em[0] != 0 || len(em) != k.Size() {
		t.Fatalf("unexpected OAEP block %X...", em[:4])
	}
}

func TestRawRSARange(t *testing.T) {
	k := loadRSA(t)
	ctx := context.Background()
	for name, in := range map[string][]byte{
		"short":       make([]byte, 16),
		"long":        make([]byte, k.Size()+1),
		"not below n": bytes.Repeat([]byte{0xFF}, k.Size()),
	} {
		if _, err := k.RawRSA(ctx, in); !errors.Is(err, ErrInputRange) {
			t.Errorf("%s: err = %v, want ErrInputRange", name, err)
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := k.RawRSA(cctx, make([]byte, k.Size())); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled ctx: err = %v", err)
	}
}

func TestMemoryPIN(t *testing.T) {
	p := NewMemoryPIN("1234", 3)
	steps := []struct {
		pin      string
		wantLeft int
		wantErr  error
	}{
		{"0000", 2, ErrPINIncorrect},
		{"1234", 3, nil},
		{"0000", 2, ErrPINIncorrect},
		{"0000", 1, ErrPINIncorrect},
		{"0000", 0, ErrPINIncorrect},
		{"1234", 0, ErrPINBlocked},
	}
	for i, s := range steps {
		left, err := p.Verify([]byte(s.pin))
		if left != s.wantLeft || !errors.Is(err, s.wantErr) || (s.wantErr == nil) != (err == nil) {
			t.Fatalf("step %d: Verify = %d, %v; want %d, %v", i, left, err, s.wantLeft, s.wantErr)
		}
	}
	if left, max := p.TriesLeft(); left != 0 || max != 3 {
		t.Errorf("TriesLeft = %d/%d", left, max)
	}
	if NewMemory(nil, nil).PIN() != nil {
		t.Error("a token without PIN must return a nil PIN interface")
	}
}

// BenchmarkRawRSA2048 is the raw RSA cost the end-to-end signature time is
// compared with (scripts/bench).
func BenchmarkRawRSA2048(b *testing.B) {
	k := loadRSA(b)
	digest := sha256.Sum256([]byte("vscard"))
	block := pkcs1Block(k.Size(), digest[:])
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := k.RawRSA(ctx, block); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkStdlibSignPKCS1v15 is crypto/rsa's own signing, for comparison.
func BenchmarkStdlibSignPKCS1v15(b *testing.B) {
	k := loadRSA(b)
	digest := sha256.Sum256([]byte("vscard"))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := rsa.SignPKCS1v15(nil, k.PrivateKey, crypto.SHA256, digest[:]); err != nil {
			b.Fatal(err)
		}
	}
}

// Both paths of RawRSA compute the same function: the crypto/rsa fast path
// for PKCS#1 v1.5 signature blocks and the math/big path for the rest.
func TestRawRSAPathsAgree(t *testing.T) {
	k := loadRSA(t)
	digest := sha256.Sum256([]byte("paths"))
	block := pkcs1Block(k.Size(), digest[:])
	if _, ok := pkcs1v15Payload(block); !ok {
		t.Fatal("a PKCS#1 v1.5 block was not recognised")
	}
	fast, err := k.RawRSA(context.Background(), block)
	if err != nil {
		t.Fatal(err)
	}
	slow, err := k.rawBig(block)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fast, slow) {
		t.Fatal("crypto/rsa and math/big paths differ")
	}
	for name, b := range map[string][]byte{
		"short PS":     append([]byte{0, 1, 0xFF, 0xFF, 0}, make([]byte, k.Size()-5)...),
		"type 2":       append([]byte{0, 2}, bytes.Repeat([]byte{0xFF}, k.Size()-2)...),
		"no separator": append([]byte{0, 1}, bytes.Repeat([]byte{0xFF}, k.Size()-2)...),
	} {
		if _, ok := pkcs1v15Payload(b); ok {
			t.Errorf("%s: accepted as a PKCS#1 v1.5 signature block", name)
		}
	}
}

// BenchmarkRawRSA2048NonPKCS1 is the math/big path (decryption, PSS).
func BenchmarkRawRSA2048NonPKCS1(b *testing.B) {
	k := loadRSA(b)
	block := make([]byte, k.Size())
	block[1] = 0x42
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := k.RawRSA(ctx, block); err != nil {
			b.Fatal(err)
		}
	}
}
