package token

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"
)

func TestECKey(t *testing.T) {
	for _, curve := range []elliptic.Curve{elliptic.P256(), elliptic.P384()} {
		t.Run(curve.Params().Name, func(t *testing.T) {
			priv, err := ecdsa.GenerateKey(curve, rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			k := NewECKey(priv)
			digest := sha256.Sum256([]byte("vscard"))
			sig, err := k.Sign(rand.Reader, digest[:], nil)
			if err != nil {
				t.Fatal(err)
			}
			if !ecdsa.VerifyASN1(&priv.PublicKey, digest[:], sig) {
				t.Fatal("signature does not verify")
			}

			peer, err := ecdsa.GenerateKey(curve, rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			peerECDH, _ := peer.ECDH()
			got, err := k.ECDH(context.Background(), peerECDH.PublicKey().Bytes())
			if err != nil {
				t.Fatal(err)
			}
			mine, _ := priv.PublicKey.ECDH()
			want, err := peerECDH.ECDH(mine)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("ECDH mismatch:\n got %x\nwant %x", got, want)
			}

			bad := peerECDH.PublicKey().Bytes()
			bad[len(bad)-1] ^= 1
			if _, err := k.ECDH(context.Background(), bad); !errors.Is(err, ErrBadPoint) {
				t.Fatalf("off-curve point: err = %v, want ErrBadPoint", err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if _, err := k.ECDH(ctx, peerECDH.PublicKey().Bytes()); err == nil {
				t.Fatal("cancelled ctx: no error")
			}
		})
	}
}

func TestMemoryPINSet(t *testing.T) {
	p := NewMemoryPIN("123456", 3)
	if _, err := p.Verify([]byte("000000")); !errors.Is(err, ErrPINIncorrect) {
		t.Fatal(err)
	}
	if err := p.Set([]byte("87654321")); err != nil {
		t.Fatal(err)
	}
	if left, max := p.TriesLeft(); left != 3 || max != 3 {
		t.Fatalf("after Set: %d/%d tries", left, max)
	}
	if _, err := p.Verify([]byte("123456")); !errors.Is(err, ErrPINIncorrect) {
		t.Fatal("old PIN still accepted")
	}
	if _, err := p.Verify([]byte("87654321")); err != nil {
		t.Fatal(err)
	}
}
