package ccid

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/card/cac"
	"github.com/vscard/vscard/token"
)

// TestCACRSA3072: a CAC card with an RSA-3072 key behind the reader. The
// host powers it on, selects the PKI applet, verifies the PIN and signs
// with one extended APDU; the 384-byte signature (past QEMU's 374-byte
// cap, protocols.md §3.4) comes back whole and verifies. The trace keeps
// the PIN out.
func TestCACRSA3072(t *testing.T) {
	if testing.Short() {
		t.Skip("RSA-3072 key generation")
	}
	k, err := rsa.GenerateKey(rand.Reader, 3072)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ccid test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	tok := token.NewMemory([]token.Credential{{Label: "sign", Cert: cert, Key: token.NewRSAKey(k)}}, token.NewMemoryPIN("12345678", 3))
	c, err := cac.New(tok, cac.Options{})
	if err != nil {
		t.Fatal(err)
	}

	var (
		mu     sync.Mutex
		events []TraceEvent
		jsonl  bytes.Buffer
	)
	js := JSONTrace(&jsonl)
	h := newHost(t, &Options{Trace: func(e TraceEvent) {
		mu.Lock()
		defer mu.Unlock()
		events = append(events, e)
		js(e)
	}})
	if err := h.r.Insert(0, c); err != nil {
		t.Fatal(err)
	}
	atr := h.powerOn(0).data
	if !bytes.Equal(atr, c.ATR()) {
		t.Fatalf("ATR % X, card's % X", atr, c.ATR())
	}
	xfr := func(apduHex string, extra ...byte) []byte {
		t.Helper()
		b, err := hex.DecodeString(apduHex)
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, extra...)
		r := h.cmd(cmdXfrBlock, 0, 0, b)
		if r.status != 0 || len(r.data) < 2 {
			t.Fatalf("%s: %+v", apduHex, r)
		}
		return r.data
	}
	if r := xfr("00A4040007A000000079010000"); r[len(r)-2] != 0x90 && r[len(r)-2] != 0x61 {
		t.Fatalf("SELECT PKI: % X", r)
	}
	if r := xfr("00200000083132333435363738"); !bytes.Equal(r, []byte{0x90, 0}) {
		t.Fatalf("VERIFY: % X", r)
	}
	digest := sha256.Sum256([]byte("signed through the ccid reader"))
	prefix, _ := hex.DecodeString("3031300d060960864801650304020105000420")
	em := make([]byte, 384)
	em[1] = 1
	tail := append(prefix, digest[:]...)
	for i := 2; i < len(em)-len(tail)-1; i++ {
		em[i] = 0xFF
	}
	copy(em[len(em)-len(tail):], tail)
	// Extended case 4: Lc 00 01 80, Le 00 00.
	resp := xfr("80420000000180", append(em, 0, 0)...)
	if len(resp) != 384+2 || resp[384] != 0x90 {
		t.Fatalf("SIGN answered %d bytes ending % X", len(resp), resp[len(resp)-2:])
	}
	if err := rsa.VerifyPKCS1v15(&k.PublicKey, crypto.SHA256, digest[:], resp[:384]); err != nil {
		t.Errorf("signature does not verify: %v", err)
	}

	mu.Lock()
	defer mu.Unlock()
	var verify *TraceEvent
	for i, e := range events {
		if e.Event == EventAPDU && len(e.Command) >= 2 && e.Command[1] == 0x20 {
			verify = &events[i]
		}
	}
	if verify == nil || len(verify.Command) != 4 || verify.Redacted != 9 {
		t.Errorf("VERIFY trace %+v: want header only, Lc and 8 PIN bytes redacted", verify)
	}
	if events[0].Event != EventPowerOn || !bytes.Equal(events[0].Response, atr) {
		t.Errorf("first event %+v, want power-on with the ATR", events[0])
	}
	if s := jsonl.String(); strings.Contains(s, "3132333435363738") || !strings.Contains(s, `"event":"apdu"`) {
		t.Errorf("JSON trace leaks the PIN or lacks APDUs:\n%s", s)
	}
}
