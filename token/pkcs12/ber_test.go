package pkcs12

import (
	"bytes"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"os"
	"strings"
	"testing"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestBERToDER(t *testing.T) {
	long := strings.Repeat("ab", 200)
	tests := []struct {
		name, in, want string
	}{
		{"DER unchanged", "30 03 02 01 05", "30 03 02 01 05"},
		{"indefinite sequence", "30 80 02 01 05 00 00", "30 03 02 01 05"},
		{"nested indefinite", "30 80 30 80 04 01 aa 00 00 00 00", "30 05 30 03 04 01 aa"},
		{"indefinite inside definite", "30 07 30 80 04 01 aa 00 00", "30 05 30 03 04 01 aa"},
		{"constructed octet string", "24 80 04 02 aa bb 04 01 cc 00 00", "04 03 aa bb cc"},
		{"definite constructed octet string", "24 06 04 01 aa 04 01 bb", "04 02 aa bb"},
		{"nested constructed octet string", "24 80 24 80 04 01 aa 00 00 04 01 bb 00 00", "04 02 aa bb"},
		{"empty constructed octet string", "24 80 00 00", "04 00"},
		{"constructed bit string", "23 80 03 02 00 aa 03 02 04 b0 00 00", "03 03 04 aa b0"},
		{"constructed UTF8String", "2c 80 0c 01 61 0c 01 62 00 00", "0c 02 61 62"},
		{"non-minimal long length", "04 81 01 aa", "04 01 aa"},
		{"non-minimal two-byte length", "30 82 00 03 02 01 05", "30 03 02 01 05"},
		{"long content gets long form", "24 80 04 81 c8 " + long + " 00 00", "04 81 c8 " + long},
		{"context constructed kept constructed", "a0 80 04 01 aa 00 00", "a0 03 04 01 aa"},
		{"implicit constructed stays segmented", "a0 80 04 01 aa 04 01 bb 00 00", "a0 06 04 01 aa 04 01 bb"},
		{"high tag number", "bf 81 00 80 02 01 01 00 00", "bf 81 00 03 02 01 01"},
		{"set kept in order", "31 80 02 01 02 02 01 01 00 00", "31 06 02 01 02 02 01 01"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := BERToDER(unhex(t, tt.in))
			if err != nil {
				t.Fatalf("BERToDER: %v", err)
			}
			if want := unhex(t, tt.want); !bytes.Equal(got, want) {
				t.Fatalf("got  % x\nwant % x", got, want)
			}
			again, err := BERToDER(got)
			if err != nil || !bytes.Equal(again, got) {
				t.Fatalf("not idempotent: % x, %v", again, err)
			}
		})
	}
}

func TestBERToDERErrors(t *testing.T) {
	deep := strings.Repeat("30 80 ", maxDepth+2) + "05 00" + strings.Repeat(" 00 00", maxDepth+2)
	tests := []struct{ name, in string }{
		{"empty", ""},
		{"truncated header", "30"},
		{"truncated content", "04 05 aa"},
		{"indefinite primitive", "04 80 aa 00 00"},
		{"missing end-of-contents", "30 80 02 01 05"},
		{"trailing data", "02 01 05 00"},
		{"bare end-of-contents", "00 00"},
		{"too deep", deep},
		{"five-byte length", "04 85 00 00 00 00 01 aa"},
		{"reserved length", "04 ff"},
		{"truncated long length", "04 82 01"},
		{"segment of wrong type", "24 80 02 01 05 00 00"},
		{"constructed segment kept", "24 80 a0 03 04 01 aa 00 00"},
		{"unused bits mid bit string", "23 80 03 02 04 aa 03 02 00 b0 00 00"},
		{"empty bit string", "03 00"},
		{"truncated high tag", "1f 81"},
		{"non-minimal high tag", "1f 80 01 00"},
		{"low tag in high form", "1f 05 00"},
		{"child overruns parent", "30 03 04 05 aa bb cc dd ee"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := BERToDER(unhex(t, tt.in))
			if !errors.Is(err, ErrBER) {
				t.Fatalf("got % x, %v; want ErrBER", got, err)
			}
		})
	}
}

// TestBERToDERPK12Util normalizes a real NSS 3.87 `pk12util -o` file
// (indefinite lengths and chunked OCTET STRINGs, peers.md §7.1): the
// result is DER that encoding/asn1 accepts, and its inner
// AuthenticatedSafe, normalized again, parses as a list of ContentInfos.
func TestBERToDERPK12Util(t *testing.T) {
	ber, err := os.ReadFile("testdata/pk12util-nss387.p12")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(ber, []byte{0x30, 0x80}) {
		t.Fatalf("fixture starts % x, want indefinite-length 30 80", ber[:2])
	}
	der, err := BERToDER(ber)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(der, ber) {
		t.Fatal("normalizing changed nothing")
	}
	var pfx pfxPDU
	if err := unmarshalDER(der, &pfx); err != nil {
		t.Fatalf("normalized PFX does not parse as DER: %v", err)
	}
	inner, err := explicit0(pfx.AuthSafe.Content)
	if err != nil {
		t.Fatal(err)
	}
	authSafe, err := octets(inner)
	if err != nil {
		t.Fatal(err)
	}
	// The chunks were joined: the AuthenticatedSafe is whole BER again.
	if !bytes.HasPrefix(authSafe, []byte{0x30, 0x80}) {
		t.Fatalf("AuthenticatedSafe starts % x", authSafe[:2])
	}
	as, err := BERToDER(authSafe)
	if err != nil {
		t.Fatal(err)
	}
	var cis []contentInfo
	if err := unmarshalDER(as, &cis); err != nil {
		t.Fatal(err)
	}
	if len(cis) != 2 || !cis[0].ContentType.Equal(oidData) || !cis[1].ContentType.Equal(oidEncryptedData) {
		t.Fatalf("content types %v", cis)
	}
	again, err := BERToDER(der)
	if err != nil || !bytes.Equal(again, der) {
		t.Fatalf("not idempotent: %v", err)
	}
	if _, err := asn1.Unmarshal(der, new(asn1.RawValue)); err != nil {
		t.Fatal(err)
	}
}

func FuzzBER2DER(f *testing.F) {
	for _, s := range []string{
		"30 80 02 01 05 00 00",
		"24 80 24 80 04 01 aa 00 00 04 01 bb 00 00",
		"23 80 03 02 00 aa 03 02 04 b0 00 00",
		"bf 81 00 80 02 01 01 00 00",
		"30 82 00 03 02 01 05",
	} {
		f.Add(unhex(f, s))
	}
	for _, name := range []string{"testdata/pk12util-nss387.p12", "testdata/openssl-seed-aes.p12"} {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		out, err := BERToDER(in)
		if err != nil {
			if !errors.Is(err, ErrBER) {
				t.Fatalf("error %v does not wrap ErrBER", err)
			}
			return
		}
		// Re-encoding only removes EOCs and shortens headers, except
		// that an indefinite length (2 bytes + 2 EOC) can become at most
		// a 5-byte header per level.
		if len(out) > 2*len(in)+8 {
			t.Fatalf("output %d bytes from %d", len(out), len(in))
		}
		again, err := BERToDER(out)
		if err != nil {
			t.Fatalf("DER output does not re-read: %v\nin  % x\nout % x", err, in, out)
		}
		if !bytes.Equal(again, out) {
			t.Fatalf("not idempotent:\nin  % x\nout % x\nagain % x", in, out, again)
		}
	})
}
