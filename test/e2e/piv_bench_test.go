package e2e

import (
	"context"
	"crypto"
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
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vscard/vscard/card/piv"
	"github.com/vscard/vscard/pcsc"
	"github.com/vscard/vscard/vpcd"
)

// Issue 7's speed acceptance: the round trip of a PIV signature through
// vpcd, timed the way a host application sees it, through vscard's
// pure-Go PC/SC client and the private pcscd of scripts/with-pcscd.
//
//   - BenchmarkPIV: piv.New over a MemoryStore, served in process by
//     vpcd.Serve: the transport plus the card's own work.
//   - BenchmarkPIVServe: cards made by `vscard card new --type piv` and
//     served by `vscard serve`: what users run, with the card directory
//     behind the card (key cache checked per use, VERIFY's deliberately
//     slow PIN hash and durable counter).
//
// One signature is the APDU exchange OpenSC's PIV driver makes (cac.md
// §11): GENERAL AUTHENTICATE (INS 87) with 7C { 82 00, 81 <data> },
// chained with CLA 10 when the data passes 255 bytes (RSA-2048's
// 256-byte block), then GET RESPONSE for as long as the card answers
// 61 xx. Two key slots, two PIN policies:
//
//   - 9A (PIV Authentication): the PIN is verified once before timing,
//     as a session does; each op is GENERAL AUTHENTICATE alone.
//   - 9C (Digital Signature): the PIN is consumed by every signature, so
//     each op is VERIFY then GENERAL AUTHENTICATE, as a signing client
//     must do.
//
// Each sub-benchmark reports the mean (us/op) and the median and p90 of
// the individual round trips (median-us, p90-us), which scripts/bench
// prints. Before anything is timed, each key's first signature is
// verified with the certificate the card itself returns for that slot
// (GET DATA), and every timed answer must be 90 00 with a 7C/82 response.

const pivBenchPIN = "12345678"

// pivBenchCard is one card of a benchmark and the vpcd slot it is in.
type pivBenchCard struct {
	name string // sub-benchmark name: ECDSA-P256, RSA2048
	slot int
}

var pivBenchCards = []pivBenchCard{{"ECDSA-P256", 0}, {"RSA2048", 1}}

// BenchmarkPIV serves an in-memory P-256 card on vpcd slot 0 and an
// RSA-2048 card on slot 1 (once, for every sub-benchmark) and times
// signatures on both.
func BenchmarkPIV(b *testing.B) {
	base := pivBenchRequire(b)
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	pc := pivBenchContext(b)
	keys := []crypto.Signer{ecKey, rsaKey}
	for i, c := range pivBenchCards {
		pivBenchServe(b, pc, fmt.Sprintf("127.0.0.1:%d", base+c.slot), pivBenchReader(c.slot), keys[i])
	}
	pivBenchRun(b, pc)
}

// BenchmarkPIVServe is BenchmarkPIV with cards made by `vscard card new
// --type piv --key p256|rsa2048` and served by `vscard serve`.
func BenchmarkPIVServe(b *testing.B) {
	base := pivBenchRequire(b)
	if vscardBin == "" {
		b.Fatal("vscard binary was not built")
	}
	dir := b.TempDir()
	args := []string{"serve", "--log-level", "warn"}
	for _, c := range pivBenchCards {
		key := map[string]string{"ECDSA-P256": "p256", "RSA2048": "rsa2048"}[c.name]
		cardDir := filepath.Join(dir, key)
		out, err := exec.Command(vscardBin, "card", "new", "--type", "piv", "--key", key, "--pin", pivBenchPIN, cardDir).CombinedOutput()
		if err != nil {
			b.Fatalf("vscard card new --type piv --key %s: %v\n%s", key, err, out)
		}
		args = append(args, "--card", cardDir, "--vpcd", fmt.Sprintf("127.0.0.1:%d", base+c.slot))
	}
	logPath := filepath.Join(dir, "serve.log")
	f, err := os.Create(logPath)
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(vscardBin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		b.Fatalf("vscard serve: %v", err)
	}
	f.Close()
	srv := &pivBenchServer{done: make(chan struct{})}
	go func() {
		srv.err = cmd.Wait()
		close(srv.done)
	}()
	b.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		if <-srv.done; srv.err != nil {
			log, _ := os.ReadFile(logPath)
			b.Errorf("vscard serve after SIGTERM: %v\n%s", srv.err, log)
		}
	})
	pc := pivBenchContext(b)
	for _, c := range pivBenchCards {
		if err := pivBenchWait(pc, pivBenchReader(c.slot), srv); err != nil {
			log, _ := os.ReadFile(logPath)
			b.Fatalf("%v\nvscard serve log:\n%s", err, log)
		}
	}
	pivBenchRun(b, pc)
}

// pivBenchRequire skips outside a with-pcscd run and returns vpcd slot
// 0's port.
func pivBenchRequire(b *testing.B) int {
	b.Helper()
	if !e2eOn {
		b.Skip("end-to-end benchmark: needs a private pcscd with vpcd; run " +
			"scripts/with-pcscd go test -run '^$' -bench PIV ./test/e2e/ (sets VSCARD_E2E=1)")
	}
	return pivBenchBasePort(b)
}

func pivBenchReader(slot int) string { return fmt.Sprintf("Virtual PCD 00 %02d", slot) }

func pivBenchContext(b *testing.B) *pcsc.Context {
	b.Helper()
	pc, err := pcsc.EstablishContext(context.Background(), nil)
	if err != nil {
		b.Fatalf("EstablishContext: %v", err)
	}
	b.Cleanup(func() { pc.Release() })
	return pc
}

// pivBenchRun connects to both cards, checks one signature per key with
// the card's own certificates, and runs the sub-benchmarks.
func pivBenchRun(b *testing.B, pc *pcsc.Context) {
	for _, c := range pivBenchCards {
		reader := pivBenchReader(c.slot)
		k, err := pc.Connect(reader, pcsc.ShareShared, pcsc.ProtocolAny)
		if err != nil {
			b.Fatalf("Connect(%q): %v", reader, err)
		}
		b.Cleanup(func() { k.Disconnect(pcsc.LeaveCard) })
		s := &pivBenchSession{k: k, pubs: map[byte]crypto.PublicKey{}}
		s.mustOK(b, "SELECT PIV", pivBenchSelect)
		for _, ref := range []byte{piv.KeyAuthentication, piv.KeySignature} {
			if err := s.readPublic(ref); err != nil {
				b.Fatalf("%s key %02X: %v", c.name, ref, err)
			}
			s.mustOK(b, "VERIFY", pivBenchVerify)
			if err := s.checkSignature(ref); err != nil {
				b.Fatalf("%s key %02X: %v", c.name, ref, err)
			}
		}
		b.Run(c.name+"/9A", func(b *testing.B) {
			s.mustOK(b, "VERIFY", pivBenchVerify) // once per session for 9A
			s.run(b, func() error {
				_, err := s.sign(piv.KeyAuthentication)
				return err
			})
		})
		b.Run(c.name+"/9C-verify", func(b *testing.B) {
			s.run(b, func() error {
				if _, err := s.exchange(pivBenchVerify); err != nil {
					return fmt.Errorf("VERIFY: %w", err)
				}
				_, err := s.sign(piv.KeySignature)
				return err
			})
		})
	}
}

// pivBenchBasePort is vpcd slot 0's port of this with-pcscd run.
func pivBenchBasePort(b *testing.B) int {
	b.Helper()
	s := os.Getenv("VSCARD_VPCD_PORT")
	if s == "" {
		return 35963
	}
	p, err := strconv.Atoi(s)
	if err != nil {
		b.Fatalf("VSCARD_VPCD_PORT=%q: %v", s, err)
	}
	return p
}

// pivBenchServe makes a PIV card with key in 9A and 9C (and their
// certificates, as `vscard card new --type piv` would), serves it to vpcd
// at addr until the benchmark ends, and waits until pcscd sees it.
func pivBenchServe(b *testing.B, pc *pcsc.Context, addr, reader string, key crypto.Signer) {
	b.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "vscard PIV bench"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		b.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	mgm := make([]byte, 24)
	rand.Read(mgm)
	st := piv.NewMemoryStore(pivBenchPIN, "87654321", piv.AlgAES192, mgm)
	for _, ref := range []byte{piv.KeyAuthentication, piv.KeySignature} {
		if err := st.SetKey(ref, key); err != nil {
			b.Fatalf("SetKey(%02X): %v", ref, err)
		}
	}
	err = piv.Personalize(st, piv.Personalization{Certs: map[byte]*x509.Certificate{
		piv.KeyAuthentication: cert, piv.KeySignature: cert}})
	if err != nil {
		b.Fatalf("Personalize: %v", err)
	}
	c, err := piv.New(st, piv.Options{})
	if err != nil {
		b.Fatalf("piv.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := &pivBenchServer{done: make(chan struct{})}
	go func() {
		srv.err = vpcd.Serve(ctx, addr, c, nil)
		close(srv.done)
	}()
	b.Cleanup(func() {
		cancel()
		if <-srv.done; srv.err != nil {
			b.Errorf("vpcd.Serve(%s): %v", addr, srv.err)
		}
	})
	if err := pivBenchWait(pc, reader, srv); err != nil {
		b.Fatal(err)
	}
}

// pivBenchServer is a card's server (vpcd.Serve or vscard serve): done is
// closed when it has returned, with err.
type pivBenchServer struct {
	done chan struct{}
	err  error
}

// pivBenchWait waits (bounded) until pcscd shows a card in reader, or
// the card's server stops.
func pivBenchWait(pc *pcsc.Context, reader string, srv *pivBenchServer) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		rs, err := pc.Readers()
		if err != nil {
			return fmt.Errorf("Readers: %w", err)
		}
		for _, r := range rs {
			if r.Name == reader && r.State&pcsc.StatePresent != 0 {
				return nil
			}
		}
		select {
		case <-srv.done:
			return fmt.Errorf("the card's server for %s stopped before the card appeared: %v", reader, srv.err)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s never showed the PIV card; readers: %+v", reader, rs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var (
	// SELECT of the PIV application by the 9-byte truncated AID OpenSC
	// sends (cac.md §11).
	pivBenchSelect = []byte{0x00, 0xA4, 0x04, 0x00, 0x09, 0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x00}
	// VERIFY of the PIV PIN (reference 80), 8 ASCII digits.
	pivBenchVerify = append([]byte{0x00, 0x20, 0x00, 0x80, 0x08}, pivBenchPIN...)
)

// pivBenchSession is one connection to one card.
type pivBenchSession struct {
	k    *pcsc.Card
	pubs map[byte]crypto.PublicKey // by key reference, from the card's certificates
	// APDUs sent since run reset the count; run reports them per op.
	apdus int
}

// exchange sends one command and follows 61 xx with GET RESPONSE; it
// returns the data of a 90 00 answer.
func (s *pivBenchSession) exchange(cmd []byte) ([]byte, error) {
	var data []byte
	for range 64 { // 64 x 256 bytes: more than any PIV answer
		resp, err := s.k.Transmit(cmd)
		s.apdus++
		if err != nil {
			return nil, err
		}
		if len(resp) < 2 {
			return nil, fmt.Errorf("answer %X: no status word", resp)
		}
		sw1, sw2 := resp[len(resp)-2], resp[len(resp)-1]
		data = append(data, resp[:len(resp)-2]...)
		switch {
		case sw1 == 0x90 && sw2 == 0x00:
			return data, nil
		case sw1 == 0x61:
			cmd = []byte{0x00, 0xC0, 0x00, 0x00, sw2} // GET RESPONSE, Le = what is left
		default:
			return nil, fmt.Errorf("status %02X %02X", sw1, sw2)
		}
	}
	return nil, errors.New("endless 61 xx chain")
}

func (s *pivBenchSession) mustOK(b *testing.B, what string, cmd []byte) {
	b.Helper()
	if _, err := s.exchange(cmd); err != nil {
		b.Fatalf("%s: %v", what, err)
	}
}

// readPublic reads the certificate of key reference ref from the card
// (GET DATA of its object: 53 { 70 DER, 71 00, FE 00 }) and keeps its
// public key, which the signatures are checked with.
func (s *pivBenchSession) readPublic(ref byte) error {
	tag, ok := piv.CertTag(ref)
	if !ok {
		return fmt.Errorf("no certificate object for key %02X", ref)
	}
	resp, err := s.exchange([]byte{0x00, 0xCB, 0x3F, 0xFF, 0x05, 0x5C, 0x03, byte(tag >> 16), byte(tag >> 8), byte(tag), 0x00})
	if err != nil {
		return fmt.Errorf("GET DATA %06X: %w", tag, err)
	}
	t, v, _, err := pivBenchBERNext(resp)
	if err != nil || t != 0x53 {
		return fmt.Errorf("GET DATA %06X: answer is not a 53 object (%v)", tag, err)
	}
	for len(v) > 0 {
		var val []byte
		if t, val, v, err = pivBenchBERNext(v); err != nil {
			return fmt.Errorf("certificate object %06X: %w", tag, err)
		}
		if t == 0x70 {
			cert, err := x509.ParseCertificate(val)
			if err != nil {
				return fmt.Errorf("certificate object %06X: %w", tag, err)
			}
			s.pubs[ref] = cert.PublicKey
			return nil
		}
	}
	return fmt.Errorf("certificate object %06X has no 70 certificate", tag)
}

// input is what key ref signs: the SHA-256 digest for ECDSA P-256 (the
// card signs the digest as given), the PKCS#1 v1.5 block for RSA-2048
// (the card does the raw private operation).
func (s *pivBenchSession) input(ref byte, msg []byte) (alg byte, in []byte, err error) {
	h := sha256.Sum256(msg)
	switch pub := s.pubs[ref].(type) {
	case *ecdsa.PublicKey:
		if pub.Curve != elliptic.P256() {
			return 0, nil, fmt.Errorf("key %02X: curve %s, want P-256", ref, pub.Curve.Params().Name)
		}
		return piv.AlgECCP256, h[:], nil
	case *rsa.PublicKey:
		if pub.Size() != 256 {
			return 0, nil, fmt.Errorf("key %02X: RSA-%d, want RSA-2048", ref, pub.N.BitLen())
		}
		prefix := []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}
		k := pub.Size()
		block := make([]byte, k)
		block[1] = 0x01
		for i := 2; i < k-len(prefix)-len(h)-1; i++ {
			block[i] = 0xFF
		}
		copy(block[k-len(prefix)-len(h):], prefix)
		copy(block[k-len(h):], h[:])
		return piv.AlgRSA2048, block, nil
	default:
		return 0, nil, fmt.Errorf("key type %T", pub)
	}
}

var pivBenchMsg = []byte("vscard PIV signature round trip through vpcd")

// sign makes one signature of pivBenchMsg with key reference ref and
// returns it (DER for ECDSA, the raw block for RSA).
func (s *pivBenchSession) sign(ref byte) ([]byte, error) {
	alg, in, err := s.input(ref, pivBenchMsg)
	if err != nil {
		return nil, err
	}
	// 7C { 82 00 (response requested), 81 <in> (challenge) }.
	inner := append([]byte{0x82, 0x00, 0x81}, pivBenchBERLen(len(in))...)
	inner = append(inner, in...)
	body := append([]byte{0x7C}, pivBenchBERLen(len(inner))...)
	body = append(body, inner...)
	// Command chaining (CLA 10) in 255-byte pieces, as OpenSC's PIV
	// driver sends data over a short APDU's limit.
	for len(body) > 255 {
		cmd := append([]byte{0x10, 0x87, alg, ref, 0xFF}, body[:255]...)
		if _, err := s.exchange(cmd); err != nil {
			return nil, fmt.Errorf("GENERAL AUTHENTICATE (chained part): %w", err)
		}
		body = body[255:]
	}
	cmd := append([]byte{0x00, 0x87, alg, ref, byte(len(body))}, body...)
	cmd = append(cmd, 0x00)
	resp, err := s.exchange(cmd)
	if err != nil {
		return nil, fmt.Errorf("GENERAL AUTHENTICATE: %w", err)
	}
	return pivBenchResponse82(resp)
}

// checkSignature makes one signature with ref and verifies it with the
// public key of the card's certificate for ref.
func (s *pivBenchSession) checkSignature(ref byte) error {
	sig, err := s.sign(ref)
	if err != nil {
		return err
	}
	h := sha256.Sum256(pivBenchMsg)
	switch pub := s.pubs[ref].(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, h[:], sig) {
			return fmt.Errorf("ECDSA signature %X does not verify", sig)
		}
	case *rsa.PublicKey:
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, h[:], sig); err != nil {
			return fmt.Errorf("RSA signature (%d bytes) does not verify: %w", len(sig), err)
		}
	}
	return nil
}

// run times op b.N times after a short warm-up and reports the mean,
// median and p90 in microseconds.
func (s *pivBenchSession) run(b *testing.B, op func() error) {
	b.Helper()
	for range 5 {
		if err := op(); err != nil {
			b.Fatal(err)
		}
	}
	samples := make([]time.Duration, 0, b.N)
	s.apdus = 0
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		err := op()
		samples = append(samples, time.Since(t0))
		if err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	slices.Sort(samples)
	var sum time.Duration
	for _, d := range samples {
		sum += d
	}
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
	b.ReportMetric(us(sum)/float64(len(samples)), "us/op")
	b.ReportMetric(us(samples[len(samples)/2]), "median-us")
	b.ReportMetric(us(samples[int(0.9*float64(len(samples)-1))]), "p90-us")
	b.ReportMetric(float64(s.apdus)/float64(b.N), "apdus/op")
}

// pivBenchResponse82 returns the value of 82 inside the 7C template of a
// GENERAL AUTHENTICATE answer.
func pivBenchResponse82(resp []byte) ([]byte, error) {
	tag, v, rest, err := pivBenchBERNext(resp)
	if err != nil || tag != 0x7C || len(rest) != 0 {
		return nil, fmt.Errorf("answer %X is not one 7C template (%v)", resp, err)
	}
	for len(v) > 0 {
		var val []byte
		tag, val, v, err = pivBenchBERNext(v)
		if err != nil {
			return nil, fmt.Errorf("7C content: %w", err)
		}
		if tag == 0x82 {
			return val, nil
		}
	}
	return nil, fmt.Errorf("answer %X has no 82 response", resp)
}

// pivBenchBERNext splits one single-byte-tag BER-TLV off b.
func pivBenchBERNext(b []byte) (tag byte, val, rest []byte, err error) {
	if len(b) < 2 {
		return 0, nil, nil, errors.New("short TLV")
	}
	tag, n, i := b[0], int(b[1]), 2
	switch {
	case n == 0x81 && len(b) >= 3:
		n, i = int(b[2]), 3
	case n == 0x82 && len(b) >= 4:
		n, i = int(b[2])<<8|int(b[3]), 4
	case n >= 0x80:
		return 0, nil, nil, fmt.Errorf("length byte %02X", n)
	}
	if len(b)-i < n {
		return 0, nil, nil, fmt.Errorf("TLV %02X: %d bytes of %d", tag, len(b)-i, n)
	}
	return tag, b[i : i+n], b[i+n:], nil
}

// pivBenchBERLen is the BER encoding of a length.
func pivBenchBERLen(n int) []byte {
	switch {
	case n < 0x80:
		return []byte{byte(n)}
	case n < 0x100:
		return []byte{0x81, byte(n)}
	default:
		return []byte{0x82, byte(n >> 8), byte(n)}
	}
}
