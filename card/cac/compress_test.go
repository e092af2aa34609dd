package cac

import (
	"bytes"
	"compress/zlib"
	"fmt"
	"io"
	"testing"

	"github.com/vscard/vscard/tlv"
	"github.com/vscard/vscard/token"
)

// readBuffer reads a whole T (typ 1) or V (typ 2) buffer of the selected
// applet with READ BUFFER, as CoolKey and OpenSC do: the 2-byte length
// first, then chunks (cac.md §4.3).
func readBuffer(t *testing.T, c *Card, typ byte) []byte {
	t.Helper()
	out := tx(t, c, fmt.Sprintf("0052000002%02X0202", typ))
	if sw(out) != 0x9000 || len(out) != 4 {
		t.Fatalf("read length: %X", out)
	}
	n := int(out[0]) | int(out[1])<<8
	var buf []byte
	for off := 2; off < n+2; {
		k := min(0xF0, n+2-off)
		out = tx(t, c, fmt.Sprintf("0052%04X02%02X%02X%02X", off, typ, k, k))
		if sw(out) != 0x9000 || len(out) != k+2 {
			t.Fatalf("read at %d: %X", off, out)
		}
		buf = append(buf, out[:k]...)
		off += k
	}
	return buf
}

// TestCertificateCompression: default mode stores certificates
// zlib-compressed with CertInfo 01, which Debian 12's CoolKey requires;
// strict mode keeps libcacard's uncompressed DER.
func TestCertificateCompression(t *testing.T) {
	for _, strict := range []bool{true, false} {
		t.Run(fmt.Sprintf("strict=%v", strict), func(t *testing.T) {
			c := newCard(t, strict, nil)
			for i, cred := range c.tok.Credentials() {
				tx(t, c, fmt.Sprintf("00A4040007A00000007901%02X00", i))
				elems, err := tlv.JoinSimple(readBuffer(t, c, 1), readBuffer(t, c, 2))
				if err != nil {
					t.Fatal(err)
				}
				if len(elems) != 4 || elems[0].Tag != 0x71 || elems[1].Tag != 0x70 {
					t.Fatalf("PKI %d container tags: %+v", i, elems)
				}
				info, cert := elems[0].Value, elems[1].Value
				wantInfo := byte(0x01)
				if strict {
					wantInfo = 0x00
				}
				if len(info) != 1 || info[0] != wantInfo {
					t.Fatalf("PKI %d CertInfo = %X, want %02X", i, info, wantInfo)
				}
				if !strict {
					// CoolKey hands the tag-70 value straight to zlib.
					r, err := zlib.NewReader(bytes.NewReader(cert))
					if err != nil {
						t.Fatalf("PKI %d: not zlib data: %v", i, err)
					}
					if cert, err = io.ReadAll(r); err != nil {
						t.Fatal(err)
					}
				}
				if !bytes.Equal(cert, cred.Cert.Raw) {
					t.Errorf("PKI %d certificate differs from the token's", i)
				}
			}
		})
	}
}

// TestQEMU54Lengths: in default mode no buffer of the card, for any number
// of certificates, is read by OpenSC (240-byte chunks) or CoolKey (255)
// with a final 52-byte chunk, whose 54-byte answer QEMU 7.2 cannot carry;
// the padding changes nothing a parser sees.
func TestQEMU54Lengths(t *testing.T) {
	if !qemu54Risk(52) || !qemu54Risk(240+52) || !qemu54Risk(255+52) || qemu54Risk(54) {
		t.Fatal("qemu54Risk disagrees with the chunk arithmetic")
	}
	base := loadTestCreds(t)
	for n := 1; n <= MaxCredentials; n++ {
		creds := make([]token.Credential, n)
		for i := range creds {
			creds[i] = base[i%len(base)]
		}
		c, err := New(token.NewMemory(creds, nil), Options{})
		if err != nil {
			t.Fatal(err)
		}
		tx(t, c, "00A4040007A000000116DB0000")
		tb, vb := readBuffer(t, c, 1), readBuffer(t, c, 2)
		if qemu54Risk(len(tb)) || qemu54Risk(len(vb)) {
			t.Errorf("%d certificates: CCC T/V lengths %d/%d", n, len(tb), len(vb))
		}
		elems, err := tlv.JoinSimple(tb, vb)
		if err != nil {
			t.Fatalf("%d certificates: CCC does not parse: %v", n, err)
		}
		if urls := countTag(elems, 0xF3); urls != 11+n {
			t.Errorf("%d certificates: %d CardURLs", n, urls)
		}
	}

	// A certificate whose plain compressed container would be read with a
	// final 52-byte chunk gets padding, and still inflates to the DER.
	c := newCard(t, false, nil)
	found := false
	for size := 20; size < 600 && !found; size++ {
		der := make([]byte, size)
		for i := range der {
			der[i] = byte(i*7 + size) // compresses poorly, so sizes vary
		}
		plain, err := deflate(der, 0)
		if err != nil {
			t.Fatal(err)
		}
		if !qemu54Risk(1 + len(plain)) { // V = CertInfo + cert (72, FE empty)
			continue
		}
		found = true
		_, v, err := c.pkiFiles(der)
		if err != nil {
			t.Fatal(err)
		}
		if qemu54Risk(len(v) - 2) {
			t.Fatalf("size %d: V-buffer still %d bytes", size, len(v)-2)
		}
		r, err := zlib.NewReader(bytes.NewReader(v[3:]))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, der) {
			t.Fatalf("padded certificate does not inflate back: %v", err)
		}
	}
	if !found {
		t.Fatal("no certificate size hit the risky length; widen the search")
	}
}

func countTag(elems []tlv.Simple, tag byte) int {
	n := 0
	for _, e := range elems {
		if e.Tag == tag {
			n++
		}
	}
	return n
}
