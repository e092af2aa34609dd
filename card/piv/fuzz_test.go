package piv

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/internal/cardfuzz"
	"github.com/vscard/vscard/tlv"
)

// maxResponse bounds any answer: the largest datum is a stored object
// (at most maxChain bytes of PUT DATA plus its header) sent through
// GET RESPONSE, at most 65536 bytes per answer.
const maxResponse = 65536 + 2

// fuzzKeys are small and fast: fuzzing exercises parsing, not bignum.
var fuzzKeys = sync.OnceValues(func() (*rsa.PrivateKey, *ecdsa.PrivateKey) {
	r, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		panic(err)
	}
	e, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	return r, e
})

// FuzzTransmit drives a card with an RSA-1024 key in 9A and a P-256 key
// in 9C, 9D and 9E through a sequence of APDUs. Input: records of
// <len hi><len lo><apdu>; a length of FFFF is a power cycle. Seeds: every
// command of the golden transcripts.
func FuzzTransmit(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.txt"))
	for _, path := range files {
		var seed []byte
		for _, s := range readTranscript(f, path) {
			if s.Power {
				seed = append(seed, cardfuzz.PowerCycle...)
				continue
			}
			seed = cardfuzz.Append(seed, s.Cmd)
		}
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		rk, ek := fuzzKeys()
		st := NewMemoryStore("123456", "12345678", AlgTDES, defaultMgmKey)
		st.SetKey(KeyAuthentication, rk)
		for _, ref := range []byte{KeySignature, KeyManagement, KeyCardAuthentication} {
			st.SetKey(ref, ek)
		}
		if err := Personalize(st, Personalization{Rand: &seqReader{n: 7}}); err != nil {
			t.Fatal(err)
		}
		c, err := New(st, Options{Rand: &seqReader{}})
		if err != nil {
			t.Fatal(err)
		}
		cardfuzz.Replay(t, c, in, maxResponse)
	})
}

// FuzzParseAuth checks the dynamic authentication template parser: no
// panic, and whatever it accepts survives re-encoding (parse, encode,
// parse gives the same template).
func FuzzParseAuth(f *testing.F) {
	for _, s := range []string{"7C028000", "7C028100", "7C148008000102030405060781081122334455667788",
		"7C0482008100", "7C0482008500", "7C00", "7C80", "7C820100", "7C0A82089F2F3FE41091FEC9"} {
		b, err := apdu.ParseHex(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		a, ok := parseAuth(in)
		if !ok {
			return
		}
		var inner []byte
		for i, tag := range []uint32{0x80, 0x81, 0x82, 0x85} {
			if a.has[i] {
				inner = tlv.AppendBER(inner, tag, [][]byte{a.witness, a.challenge, a.response, a.exponent}[i])
			}
		}
		b, ok := parseAuth(tlv.AppendBER(nil, 0x7C, inner))
		if !ok || b.has != a.has || !bytes.Equal(b.witness, a.witness) || !bytes.Equal(b.challenge, a.challenge) ||
			!bytes.Equal(b.response, a.response) || !bytes.Equal(b.exponent, a.exponent) {
			t.Fatalf("%X: re-encoded template parses differently", in)
		}
	})
}
