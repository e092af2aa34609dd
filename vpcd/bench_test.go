package vpcd

import (
	"bytes"
	"context"
	"io"
	"runtime"
	"testing"
	"time"
)

// BenchmarkRoundTrip measures one APDU round trip over loopback TCP,
// from the fake vpcd's send to its receipt of the response, against a card
// that answers 90 00 at once: the transport's own cost.
//
//   - split: vpcd's real behaviour, length and APDU in two writes with Nagle
//     on (peers.md §4.1). Only the TCP_QUICKACK re-arm keeps this off the
//     ~40 ms delayed-ACK stall.
//   - single: a peer that sends each message in one write.
//   - split-no-quickack: split with the re-arm turned off, to show the stall
//     the re-arm prevents (expect ~40 ms/op on Linux).
func BenchmarkRoundTrip(b *testing.B) {
	cases := []struct {
		name       string
		split      bool
		noQuickAck bool
	}{
		{"split", true, false},
		{"single", false, false},
		{"split-no-quickack", true, true},
	}
	// SELECT of the CAC PKI applet, the most common APDU on the wire
	// (peers.md §4.2 row 3b).
	sel := []byte{0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x79, 0x01, 0x00}
	ok := []byte{0x90, 0x00}
	for _, bc := range cases {
		b.Run(bc.name, func(b *testing.B) {
			if bc.noQuickAck && runtime.GOOS != "linux" {
				b.Skip("the re-arm only exists on Linux")
			}
			v := newFakeVPCD(b)
			// Recording every call, as fakeCard does, would dominate.
			card := &benchCard{ok: ok}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- Serve(ctx, v.addr(), card, &Options{noQuickAck: bc.noQuickAck}) }()
			p := v.accept(bc.split)
			// Warm up: let the connection leave TCP's initial quick-ACK
			// phase, which would hide the stall in the first round trips.
			for range 20 {
				p.transmit(sel)
			}
			// The peer's loop below is allocation-free (no per-message
			// deadlines), so allocs/op is the card side's.
			p.c.SetDeadline(time.Now().Add(time.Hour))
			frame, _ := appendFrame(nil, sel)
			reply := make([]byte, 2+len(ok))
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if bc.split {
					// vpcd: sendall of the length, then of the APDU.
					if _, err := p.c.Write(frame[:2]); err != nil {
						b.Fatal(err)
					}
					if _, err := p.c.Write(frame[2:]); err != nil {
						b.Fatal(err)
					}
				} else if _, err := p.c.Write(frame); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(p.c, reply); err != nil {
					b.Fatal(err)
				}
				if !bytes.Equal(reply[2:], ok) {
					b.Fatalf("response %X", reply)
				}
			}
			b.StopTimer()
			cancel()
			<-done
		})
	}
}

// benchCard answers every APDU with ok and records nothing.
type benchCard struct{ ok []byte }

func (c *benchCard) ATR() []byte { return testATR }
func (c *benchCard) PowerOn()    {}
func (c *benchCard) PowerOff()   {}
func (c *benchCard) Reset()      {}
func (c *benchCard) Transmit(context.Context, []byte) ([]byte, error) {
	return c.ok, nil
}
