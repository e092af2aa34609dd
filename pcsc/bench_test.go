package pcsc

import (
	"os"
	"slices"
	"testing"
	"time"
)

// BenchmarkE2ETransmit times the APDU round trip host-to-card through this
// client: SELECT PKI 0 (the APDU scripts/bench times with pyscard) on one
// shared connection. It reports the median, p90 and p99 per APDU, which
// scripts/bench sets beside pyscard's on the same card (issue 5: median
// within 10% of pyscard/libpcsclite).
//
// With VSCARD_BENCH_READER set it uses the card already in that reader
// (scripts/bench's vscard serve); otherwise it serves a CAC card in vpcd's
// slot 0 itself.
func BenchmarkE2ETransmit(b *testing.B) {
	port := needE2E(b)
	pc := establish(b)
	reader := os.Getenv("VSCARD_BENCH_READER")
	if reader == "" {
		reader = e2eReader
		waitState(b, pc, StateEmpty)
		insert(b, pc, port, testCAC(b))
	}
	k, err := pc.Connect(reader, ShareShared, ProtocolAny)
	if err != nil {
		b.Fatalf("Connect(%q): %v", reader, err)
	}
	defer k.Disconnect(LeaveCard)
	for range 20 { // warm-up, as scripts/lib/bench_apdu.py
		if _, err := k.Transmit(selectPKI); err != nil {
			b.Fatal(err)
		}
	}
	samples := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		resp, err := k.Transmit(selectPKI)
		samples = append(samples, time.Since(t0))
		if err != nil || !ok(resp) {
			b.Fatalf("SELECT PKI 0: %X, %v", resp, err)
		}
	}
	b.StopTimer()
	slices.Sort(samples)
	pct := func(p float64) float64 {
		i := int(p * float64(len(samples)-1))
		return float64(samples[i].Nanoseconds()) / 1e6
	}
	b.ReportMetric(pct(0.5), "median-ms")
	b.ReportMetric(pct(0.9), "p90-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
}
