package cac

import (
	"bytes"
	"compress/zlib"
	"fmt"
	"io"
	"testing"

	"github.com/vscard/vscard/tlv"
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
