package cac

import (
	"context"
	"testing"
)

func BenchmarkTransmitSelect(b *testing.B) {
	c := newCard(b, false, nil)
	cmd := mustHex(b, selPKI0)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		out, err := c.Transmit(ctx, cmd)
		if err != nil || len(out) != 15 {
			b.Fatalf("%X %v", out, err)
		}
	}
}

// BenchmarkSign2048 is one full RSA-2048 SIGN through Transmit: a 240-byte
// chained step and the 16-byte final with Le=00.
func BenchmarkSign2048(b *testing.B) {
	c := newCard(b, false, nil)
	ctx := context.Background()
	tx(b, c, selPKI0)
	block := make([]byte, 256)
	block[1] = 1
	for i := 2; i < 200; i++ {
		block[i] = 0xFF
	}
	step := append(mustHex(b, "00428000F0"), block[:240]...)
	final := append(append(mustHex(b, "0042000010"), block[240:]...), 0x00)
	b.ReportAllocs()
	for b.Loop() {
		if out, _ := c.Transmit(ctx, step); len(out) != 2 || out[0] != 0x90 {
			b.Fatalf("step: %X", out)
		}
		if out, _ := c.Transmit(ctx, final); len(out) != 258 {
			b.Fatalf("final: %X", out)
		}
	}
}
