package cac

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"testing"
	"time"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/token"
)

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := apdu.ParseHex(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func tx(t testing.TB, c *Card, cmd string) []byte {
	t.Helper()
	out, err := c.Transmit(context.Background(), mustHex(t, cmd))
	if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	return out
}

func sw(r []byte) apdu.SW { return apdu.SW(r[len(r)-2])<<8 | apdu.SW(r[len(r)-1]) }

func newCard(t testing.TB, strict bool, pin *token.MemoryPIN) *Card {
	t.Helper()
	c, err := New(token.NewMemory(loadTestCreds(t), pin), Options{Strict: strict})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

const (
	selPKI0   = "00A4040007A000000079010000"
	selGP     = "00A4040007A000000003000000"
	selCCC    = "00A4040007A000000116DB0000"
	pinRight  = "00200000083132333435363738"
	pinWrong  = "002000000831323334FFFFFFFF"
	pinStatus = "0020000000"
)

// TestDefaultVerifyCounter: wrong PINs count down 63 C2, C1, C0, then the
// PIN is blocked (69 83), and the status query reports the same.
func TestDefaultVerifyCounter(t *testing.T) {
	c := newCard(t, false, token.NewMemoryPIN("12345678", 3))
	steps := []struct {
		cmd  string
		want apdu.SW
	}{
		{pinStatus, 0x63C3},
		{pinWrong, 0x63C2},
		{pinStatus, 0x63C2},
		{pinRight, 0x9000}, // resets the counter
		{pinStatus, 0x9000},
		{pinWrong, 0x63C2}, // a failed VERIFY logs out
		{pinStatus, 0x63C2},
		{pinWrong, 0x63C1},
		{pinWrong, 0x63C0},
		{pinStatus, 0x6983},
		{pinWrong, 0x6983},
		{pinRight, 0x6983}, // blocked: even the right PIN fails
		{"0020008000", 0x6A00},
	}
	for i, s := range steps {
		if got := sw(tx(t, c, s.cmd)); got != s.want {
			t.Fatalf("step %d %s: SW %v, want %v", i, s.cmd, got, s.want)
		}
	}
}

// TestDefaultVerifySession: login is card-wide and a power event drops it;
// trailing FF padding is stripped; a token without PIN accepts anything.
func TestDefaultVerifySession(t *testing.T) {
	c := newCard(t, false, token.NewMemoryPIN("1234", 3))
	if got := sw(tx(t, c, "002000000831323334FFFFFFFF")); got != 0x9000 {
		t.Fatalf("padded PIN: %v", got)
	}
	tx(t, c, selPKI0)
	if got := sw(tx(t, c, pinStatus)); got != 0x9000 {
		t.Fatalf("status after select: %v", got)
	}
	c.Reset()
	if got := sw(tx(t, c, pinStatus)); got != 0x63C3 {
		t.Fatalf("status after reset: %v", got)
	}
	// Default mode does not cut the PIN at a 00 byte as libcacard's C
	// string does: "1234\0" is a different PIN.
	if got := sw(tx(t, c, "00200000053132333400")); got != 0x63C2 {
		t.Fatalf("PIN with NUL: %v", got)
	}

	free := newCard(t, false, nil)
	for _, cmd := range []string{pinStatus, "0020000002FFFF", "00200000083939393939393939"} {
		if got := sw(tx(t, free, cmd)); got != 0x9000 {
			t.Fatalf("no-PIN token %s: %v", cmd, got)
		}
	}
}

// TestDefaultSignNeedsLogin: SIGN before VERIFY is refused, after it works.
func TestDefaultSignNeedsLogin(t *testing.T) {
	c := newCard(t, false, token.NewMemoryPIN("12345678", 3))
	block := make([]byte, 256)
	block[1] = 1
	sign := append(mustHex(t, "00420000000100"), block...)
	sign = append(sign, 0x01, 0x00) // extended Le 256
	tx(t, c, selPKI0)
	out, _ := c.Transmit(context.Background(), sign)
	if sw(out) != 0x6985 {
		t.Fatalf("sign before login: %X", out)
	}
	tx(t, c, pinRight)
	out, _ = c.Transmit(context.Background(), sign)
	if sw(out) != 0x9000 || len(out) != 258 {
		t.Fatalf("sign after login: %d bytes, SW %v", len(out), sw(out))
	}
	pub := loadTestCreds(t)[0].Cert.PublicKey.(*rsa.PublicKey)
	m := new(big.Int).Exp(new(big.Int).SetBytes(out[:256]), big.NewInt(int64(pub.E)), pub.N)
	if !bytes.Equal(m.FillBytes(make([]byte, 256)), block) {
		t.Fatal("signature does not verify to the input block")
	}
}

// TestGetChallenge: default mode answers Le random bytes on every applet
// and with none selected; strict mode keeps libcacard's 6D 00 / 69 00.
func TestGetChallenge(t *testing.T) {
	c := newCard(t, false, nil)
	for _, sel := range []string{"", selPKI0, selCCC, selGP, "00A4040007A000000079030000"} {
		if sel != "" {
			tx(t, c, sel)
		}
		a := tx(t, c, "0084000008")
		b := tx(t, c, "0084000008")
		if len(a) != 10 || sw(a) != 0x9000 || sw(b) != 0x9000 {
			t.Fatalf("after %q: %X", sel, a)
		}
		if bytes.Equal(a, b) {
			t.Fatalf("after %q: two challenges equal: %X", sel, a)
		}
	}
	if out := tx(t, c, "0084000000"); len(out) != 258 || sw(out) != 0x9000 {
		t.Fatalf("Le=00: %d bytes SW %v", len(out), sw(out))
	}
	// Case 1 (no Le): 8 bytes through 61 08 and GET RESPONSE.
	if out := tx(t, c, "00840000"); !bytes.Equal(out, []byte{0x61, 0x08}) {
		t.Fatalf("no Le: %X", out)
	}
	if out := tx(t, c, "00C0000008"); len(out) != 10 || sw(out) != 0x9000 {
		t.Fatalf("GET RESPONSE: %X", out)
	}
	if out := tx(t, c, "0084010008"); sw(out) != 0x6A86 {
		t.Fatalf("P1=01: %X", out)
	}

	s := newCard(t, true, nil)
	if got := sw(tx(t, s, "0084000008")); got != 0x6900 {
		t.Fatalf("strict, no applet: %v", got)
	}
	tx(t, s, selPKI0)
	if got := sw(tx(t, s, "0084000008")); got != 0x6D00 {
		t.Fatalf("strict, PKI: %v", got)
	}
}

// selfSigned makes an RSA credential with a fresh key.
func selfSigned(t testing.TB, cn string) token.Credential {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return token.Credential{Label: cn, Cert: cert, Key: token.NewRSAKey(k)}
}

// cardID reads the CCC V-buffer and returns the 14-byte card ID of F0.
func cardID(t *testing.T, c *Card) []byte {
	t.Helper()
	tx(t, c, selCCC)
	out := tx(t, c, "00520002020215FF") // F0 is the first 21 value bytes
	if sw(out) != 0x9000 || len(out) != 23 {
		t.Fatalf("CCC read: %X", out)
	}
	return out[7:21]
}

// TestDistinctSerials: default mode derives the CCC card ID from the first
// certificate, so two cards never share OpenSC's serial; strict mode keeps
// libcacard's constant.
func TestDistinctSerials(t *testing.T) {
	creds := loadTestCreds(t)
	mk := func(strict bool, cs ...token.Credential) *Card {
		c, err := New(token.NewMemory(cs, nil), Options{Strict: strict})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := cardID(t, mk(false, creds[0], creds[1])), cardID(t, mk(false, creds[1], creds[0]))
	other := selfSigned(t, "other")
	c := cardID(t, mk(false, other))
	if bytes.Equal(a, b) || bytes.Equal(a, c) || bytes.Equal(b, c) {
		t.Fatalf("card IDs not distinct: %X %X %X", a, b, c)
	}
	// OpenSC builds the token serial from the last 8 bytes.
	if bytes.Equal(a[6:], b[6:]) {
		t.Fatalf("last 8 bytes equal: %X %X", a, b)
	}
	sum := sha256.Sum256(creds[0].Cert.Raw)
	if !bytes.Equal(a, sum[:14]) {
		t.Fatalf("card ID %X, want SHA-256 prefix %X", a, sum[:14])
	}
	s1, s2 := cardID(t, mk(true, creds[0])), cardID(t, mk(true, other))
	if !bytes.Equal(s1, s2) || !bytes.Equal(s1, strictCardID) {
		t.Fatalf("strict card IDs %X %X, want libcacard's constant", s1, s2)
	}
}

// TestMalformedKeepsBuffer: a malformed APDU answers 67 00 and leaves the
// buffered response and the selected applet alone.
func TestMalformedKeepsBuffer(t *testing.T) {
	for _, strict := range []bool{false, true} {
		c := newCard(t, strict, nil)
		if out := tx(t, c, "00A4040007A000000116DB00"); !bytes.Equal(out, []byte{0x61, 0x0D}) {
			t.Fatalf("select: %X", out)
		}
		for _, bad := range []string{"00A4", "00A40400070102", "00C000000D0102", "00B000000001"} {
			if out := tx(t, c, bad); !bytes.Equal(out, []byte{0x67, 0x00}) {
				t.Fatalf("%s: %X", bad, out)
			}
		}
		want := mustHex(t, "6F0B8407A000000116DB00A5009000")
		if out := tx(t, c, "00C000000D"); !bytes.Equal(out, want) {
			t.Fatalf("GET RESPONSE after malformed: %X", out)
		}
		// The CCC T-buffer holds 0x34 bytes, 0x36 in default mode
		// (TestQEMU54Lengths).
		wantLen := "36009000"
		if strict {
			wantLen = "34009000"
		}
		if out := tx(t, c, "0052000002010202"); !bytes.Equal(out, mustHex(t, wantLen)) {
			t.Fatalf("CCC still selected: %X", out)
		}
	}
}

// TestAbsentLe: OpenSC sends READ BUFFER and SIGN/DECRYPT without Le, as
// case 3, because the CAC ATR offers only T=0. Strict mode answers them
// 61 xx and waits for GET RESPONSE, as libcacard does; default mode
// answers up to 256 bytes at once, one pcscd round trip less per
// signature and per buffer piece. Both give the same bytes. SELECT keeps
// its 61 0D in both modes.
func TestAbsentLe(t *testing.T) {
	block := make([]byte, 256)
	block[1] = 1
	for i := 2; i < 256-33; i++ {
		block[i] = 0xFF
	}
	first := fmt.Sprintf("00428000F0%X", block[:240])
	last := fmt.Sprintf("0042000010%X", block[240:])
	var sigs [2][]byte
	for i, strict := range []bool{true, false} {
		c := newCard(t, strict, nil)
		if out := tx(t, c, "00A4040007A0000000790100"); !bytes.Equal(out, []byte{0x61, 0x0D}) {
			t.Fatalf("strict=%v: SELECT without Le: %X", strict, out)
		}
		if out := tx(t, c, first); !bytes.Equal(out, []byte{0x90, 0x00}) {
			t.Fatalf("strict=%v: first chunk: %X", strict, out)
		}
		out := tx(t, c, last)
		if strict {
			if !bytes.Equal(out, []byte{0x61, 0x00}) {
				t.Fatalf("strict: last chunk: %X", out)
			}
			out = tx(t, c, "00C0000000")
		}
		if sw(out) != 0x9000 || len(out) != 258 {
			t.Fatalf("strict=%v: signature: %d bytes, SW %v", strict, len(out), sw(out))
		}
		sigs[i] = out
		// A certificate piece as OpenSC reads it: READ BUFFER of 240
		// bytes of the V-buffer, no Le.
		out = tx(t, c, "005200000202F0")
		if strict && !bytes.Equal(out, []byte{0x61, 0xF0}) || !strict && (len(out) != 242 || sw(out) != 0x9000) {
			t.Fatalf("strict=%v: READ BUFFER without Le: %d bytes, SW %v", strict, len(out), sw(out))
		}
	}
	if !bytes.Equal(sigs[0], sigs[1]) {
		t.Fatal("strict and default signatures differ")
	}
}
