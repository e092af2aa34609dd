package vscard

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vscard/vscard/card/cac"
	"github.com/vscard/vscard/token"
)

// libcacardCAC returns a strict-mode CAC card holding libcacard's test
// database credentials (card/cac/testdata/testdb, no PIN): the card
// vscclient served in the captures.
func libcacardCAC(t *testing.T) *cac.Card {
	t.Helper()
	c, err := cac.New(token.NewMemory(cacCreds(t), nil), cac.Options{Strict: true})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// cacCreds loads libcacard's test credentials, in card order.
func cacCreds(t *testing.T) []token.Credential {
	t.Helper()
	dir := filepath.Join("..", "card", "cac", "testdata", "testdb")
	var creds []token.Credential
	for _, name := range []string{"cert1", "cert2", "cert3"} {
		certPEM, err := os.ReadFile(filepath.Join(dir, name+".pem"))
		if err != nil {
			t.Fatal(err)
		}
		keyPEM, err := os.ReadFile(filepath.Join(dir, name+".key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		cb, _ := pem.Decode(certPEM)
		kb, _ := pem.Decode(keyPEM)
		if cb == nil || kb == nil {
			t.Fatalf("%s: no PEM block", name)
		}
		cert, err := x509.ParseCertificate(cb.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		creds = append(creds, token.Credential{Label: name, Cert: cert, Key: token.NewRSAKey(k.(*rsa.PrivateKey))})
	}
	return creds
}

// TestRealCACThroughHost serves a real CAC card through Client and Host and
// reads the CCC as CoolKey does (card/cac/testdata/vectors/coolkey-*):
// libcacard answers its GET RESPONSE with 52 bytes and 90 00, the 54-byte
// response that desynchronises QEMU 7.2 (peers.md appendix). With the
// workaround, no 54-byte response crosses the link, and a host that
// follows 61 xx chains, as CoolKey and OpenSC do, reads the same bytes.
func TestRealCACThroughHost(t *testing.T) {
	cd := libcacardCAC(t)
	if !bytes.Equal(cd.ATR(), cacATR) {
		t.Fatalf("CAC ATR %X, want vscclient's %X", cd.ATR(), cacATR)
	}
	var mu sync.Mutex
	var wire [][]byte
	ln, dial := listen(t)
	cl := NewClient(dial, cd, &ClientOptions{QEMU54Workaround: true, Trace: func(e TraceEvent) {
		if e.Type == MsgAPDU {
			mu.Lock()
			wire = append(wire, e.Response)
			mu.Unlock()
		}
	}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- cl.Run(ctx) }()
	h := NewHost(accept(t, ln), nil)
	go h.Serve(ctx)
	for ev := range h.Events() {
		if _, ok := ev.(CardInserted); ok {
			break
		}
	}
	go func() {
		for range h.Events() {
		}
	}()

	// transmit follows 61 xx with GET RESPONSE, appending data, as
	// OpenSC's sc_get_response does.
	transmit := func(cmd string) []byte {
		t.Helper()
		var data []byte
		resp, err := h.Transmit(ctx, 0, mustHex(cmd))
		for err == nil && len(resp) >= 2 && resp[len(resp)-2] == 0x61 {
			data = append(data, resp[:len(resp)-2]...)
			resp, err = h.Transmit(ctx, 0, []byte{0x00, 0xC0, 0x00, 0x00, resp[len(resp)-1]})
		}
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		return append(data, resp...)
	}
	// peers.md §1.4: vscclient's first answer.
	if resp, err := h.Transmit(ctx, 0, mustHex("00a4040007a0000000790300")); err != nil || !bytes.Equal(resp, []byte{0x61, 0x0d}) {
		t.Fatalf("SELECT ACA: %X %v", resp, err)
	}
	transmit("00A4040007A000000116DB00") // select CCC
	if got := transmit("80520000020102"); !bytes.Equal(got, mustHex("34009000")) {
		t.Fatalf("CCC T-buffer length: %X", got)
	}
	want := mustHex("F015F101F201F310F310F310F310F310F310F310F310F310F310F310F310F310F310F401F501F611F700FA00FB00FC00FD00FE009000")
	if got := transmit("80520002020134"); !bytes.Equal(got, want) {
		t.Fatalf("CCC T-buffer: %X, want %X", got, want)
	}
	// The client traces an APDU after sending its answer: look once Run
	// has returned.
	cancel()
	waitRun(t, done)
	mu.Lock()
	defer mu.Unlock()
	split := false
	for _, r := range wire {
		if len(r) == qemuBadLen {
			t.Fatalf("a 54-byte response crossed the link: %X", r)
		}
		split = split || (len(r) == 3 && r[1] == 0x61 && r[2] == 51)
	}
	if !split {
		t.Errorf("the CCC read was not split; responses: %X", wire)
	}
}
