package usbip

import (
	"testing"
)

// BenchmarkBulkRoundTrip is one CCID-shaped exchange over loopback TCP:
// a 20-byte bulk OUT and the bulk IN that collects the answer, as libccid
// issues them through vhci-hcd.
func BenchmarkBulkRoundTrip(b *testing.B) {
	s := NewServer(nil)
	d := newFakeDev()
	d.echo = true
	if err := s.Add("1-1", d); err != nil {
		b.Fatal(err)
	}
	cl := dial(b, startServer(b, s))
	if st, _ := cl.importDev("1-1"); st != stOK {
		b.Fatal(st)
	}
	cmd := make([]byte, 20)
	seq := uint32(0)
	b.ReportAllocs()
	for b.Loop() {
		seq += 2
		cl.submit(seq, dirOut, 3, uint32(len(cmd)), nil, cmd)
		cl.submit(seq+1, dirIn, 2, 65546, nil, nil)
		for range 2 {
			if h, _ := cl.reply(); h.Status != 0 {
				b.Fatalf("status %d", h.Status)
			}
		}
	}
}
