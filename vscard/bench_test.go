package vscard

import (
	"context"
	"net"
	"slices"
	"testing"
	"time"
)

// benchCard answers every command with 61 0D (libcacard's SELECT answer,
// peers.md §1.4) and does nothing else, so that the benchmark measures the
// link.
type benchCard struct{}

func (benchCard) ATR() []byte { return cacATR }
func (benchCard) PowerOn()    {}
func (benchCard) PowerOff()   {}
func (benchCard) Reset()      {}
func (benchCard) Transmit(context.Context, []byte) ([]byte, error) {
	return []byte{0x61, 0x0D}, nil
}

// BenchmarkClientRoundTrip measures one APDU round trip through the
// client: a fake host in Go sends SELECT ACA over loopback TCP and waits
// for the response. It reports the median in µs (issue 3 target: ≤ 100 µs;
// libcacard's vscclient: 60 µs against a single-write host, 44 ms against
// QEMU's split writes, peers.md §4).
//
//   - single-write: the host sends each message in one write;
//   - split-write: the host writes header and payload separately without
//     TCP_NODELAY, as QEMU's chardev does without nodelay=on;
//   - split-write-no-quickack: the same without re-arming TCP_QUICKACK,
//     which shows the delayed-ACK stall the re-arm prevents.
func BenchmarkClientRoundTrip(b *testing.B) {
	for _, bc := range []struct {
		name       string
		split      bool
		noQuickAck bool
	}{
		{"single-write", false, false},
		{"split-write", true, false},
		{"split-write-no-quickack", true, true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ln, dial := listen(b)
			cl := NewClient(dial, benchCard{}, &ClientOptions{MinBackoff: time.Hour, noQuickAck: bc.noQuickAck})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- cl.Run(ctx) }()
			defer func() {
				cancel()
				<-done
			}()
			conn := accept(b, ln)
			handshake(b, conn, true, cacATR)
			conn.(*net.TCPConn).SetNoDelay(!bc.split)
			conn.SetDeadline(time.Time{})

			cmd := msg(MsgAPDU, 0, mustHex("00a4040007a0000000790300"))
			want := msg(MsgAPDU, 0, []byte{0x61, 0x0D})
			resp := make([]byte, len(want))
			one := func() {
				if bc.split {
					conn.Write(cmd[:HeaderSize])
					conn.Write(cmd[HeaderSize:])
				} else {
					conn.Write(cmd)
				}
				if _, err := readFull(conn, resp); err != nil {
					b.Fatal(err)
				}
			}
			// TCP starts in quick-ACK mode; get past it, as a long-lived
			// link to QEMU is.
			for range 20 {
				one()
			}
			if string(resp) != string(want) {
				b.Fatalf("response %X", resp)
			}
			times := make([]time.Duration, 0, b.N)
			for b.Loop() {
				t0 := time.Now()
				one()
				times = append(times, time.Since(t0))
			}
			b.StopTimer()
			slices.Sort(times)
			b.ReportMetric(float64(times[len(times)/2].Nanoseconds())/1e3, "median-µs")
		})
	}
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := c.Read(b[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}
