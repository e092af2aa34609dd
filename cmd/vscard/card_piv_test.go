package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card/piv"
	"github.com/vscard/vscard/token"
	"github.com/vscard/vscard/token/store"
)

// TestCardNewPIV: card new --type piv prints the generated secrets once,
// and they are the card's; show prints slots and counters and no secret.
func TestCardNewPIV(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "piv")
	code, out, errs := runCLI(t, "", "card", "new", dir, "--type", "piv", "--key", "p256", "--cn", "Pat Piv", "--pin-tries", "4")
	if code != exitOK {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	for _, want := range []string{
		"Created PIV card in " + dir,
		"9A PIV Authentication   CN=Pat Piv  serial",
		"9C Digital Signature    CN=Pat Piv (signature)",
		"9D Key Management       CN=Pat Piv (key management)",
		"9E Card Authentication  CN=Pat Piv (card authentication)",
		"ECDSA P-256",
		"CA: CN=Fake PIV CA",
		"PIN tries: 4 of 4, PUK tries: 3 of 3",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	find := func(re string) string {
		m := regexp.MustCompile(re).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no %s in:\n%s", re, out)
		}
		return m[1]
	}
	pin := find(`(?m)^PIN: ([0-9]{8}) \(shown once`)
	puk := find(`(?m)^PUK: ([0-9]{8}) \(shown once`)
	mgm := find(`(?m)^Management key \(3DES\): ([0-9A-F]{48}) \(shown once`)

	c, err := store.OpenPIV(dir, store.PIVOpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.PIN().Verify([]byte(pin)); err != nil {
		t.Errorf("printed PIN: %v", err)
	}
	if _, err := c.PUK().Verify([]byte(puk)); err != nil {
		t.Errorf("printed PUK: %v", err)
	}
	if _, err := c.PIN().Verify([]byte("00000000")); !errors.Is(err, token.ErrPINIncorrect) {
		t.Errorf("wrong PIN: %v", err)
	}
	if alg, key, _ := c.ManagementKey(); alg != piv.AlgTDES || strings.ToUpper(hex.EncodeToString(key)) != mgm {
		t.Errorf("management key %02X %x, printed %s", alg, key, mgm)
	}

	code, out, errs = runCLI(t, "", "card", "show", dir)
	if code != exitOK {
		t.Fatalf("show: exit %d, %q", code, errs)
	}
	for _, want := range []string{
		"Type: PIV",
		"Name: Pat Piv",
		"PIN: set, 3 of 4 tries left",
		"PUK: set, 3 of 3 tries left",
		"Management key: 3DES (value not shown",
		"9C Digital Signature\n     private key: ECDSA P-256\n     subject:  CN=Pat Piv (signature)",
		"Data objects: 7E 5FC101 5FC102",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("show lacks %q:\n%s", want, out)
		}
	}
	for _, secret := range []string{pin, puk, mgm, strings.ToLower(mgm)} {
		if strings.Contains(out, secret) {
			t.Errorf("show prints a secret %q", secret)
		}
	}

	// export-ca works for a PIV card too.
	code, out, _ = runCLI(t, "", "card", "export-ca", dir)
	if code != exitOK || !strings.HasPrefix(out, "-----BEGIN CERTIFICATE-----") {
		t.Errorf("export-ca: exit %d, %q", code, out)
	}
}

func TestCardNewPIVGiven(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "piv")
	code, out, errs := runCLI(t, "", "card", "new", dir, "--type", "piv", "--key", "p384", "--pin", "123456", "--puk", "87654321",
		"--mgm-key", "01:02:03:04:05:06:07:08:01:02:03:04:05:06:07:08:01:02:03:04:05:06:07:08", "--mgm-alg", "3des", "--puk-tries", "5")
	if code != exitOK {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	for _, want := range []string{"PIN: as given", "PUK: as given", "Management key (3DES): as given", "PUK tries: 5 of 5", "ECDSA P-384"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	for _, secret := range []string{"123456", "87654321", "0102030405"} {
		if strings.Contains(out, secret) || strings.Contains(errs, secret) {
			t.Errorf("given secret %q echoed", secret)
		}
	}
	c, err := store.OpenPIV(dir, store.PIVOpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.PUK().Verify([]byte("87654321")); err != nil {
		t.Error(err)
	}
	if alg, key, _ := c.ManagementKey(); alg != piv.AlgTDES || hex.EncodeToString(key) != "010203040506070801020304050607080102030405060708" {
		t.Errorf("management key %02X %x", alg, key)
	}
}

func TestCardPIVErrors(t *testing.T) {
	tmp := t.TempDir()
	td := func(n string) string { return filepath.Join(storeTestdata, n) }
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"puk on cac", []string{"card", "new", filepath.Join(tmp, "a"), "--puk", "12345678"}, "--puk: only for PIV cards"},
		{"slot on cac", []string{"card", "import", filepath.Join(tmp, "a"), "--slot", "9a=x.p12"}, "--slot: only for PIV cards"},
		{"bad type", []string{"card", "new", filepath.Join(tmp, "a"), "--type", "coolkey"}, `--type "coolkey"`},
		{"rsa1024 piv", []string{"card", "new", filepath.Join(tmp, "a"), "--type", "piv", "--key", "rsa1024"}, "a PIV card takes rsa2048"},
		{"p256 cac", []string{"card", "new", filepath.Join(tmp, "a"), "--key", "p256"}, `--key "p256"`},
		{"mgm not hex", []string{"card", "new", filepath.Join(tmp, "a"), "--type", "piv", "--mgm-key", "xyz"}, "not hex"},
		{"mgm length", []string{"card", "new", filepath.Join(tmp, "a"), "--type", "piv", "--mgm-key", "0011", "--mgm-alg", "aes128"}, "AES-128 takes 16 (32 hex digits)"},
		{"mgm alg", []string{"card", "new", filepath.Join(tmp, "a"), "--type", "piv", "--mgm-key", "0011", "--mgm-alg", "des"}, "--mgm-alg"},
		{"short puk", []string{"card", "new", filepath.Join(tmp, "a"), "--type", "piv", "--puk", "12"}, "--puk: PUK must be"},
		{"puk tries", []string{"card", "new", filepath.Join(tmp, "a"), "--type", "piv", "--puk-tries", "0"}, "--puk-tries"},
		{"bad slot", []string{"card", "import", filepath.Join(tmp, "a"), "--type", "piv", "--slot", "9b=x.pem"}, "want 9a, 9c, 9d, 9e or 82-95"},
		{"slot form", []string{"card", "import", filepath.Join(tmp, "a"), "--type", "piv", "--slot", "9a"}, "REF=FILE"},
		{"no slot", []string{"card", "import", filepath.Join(tmp, "a"), "--type", "piv", "--pin", "1234"}, "--slot REF=FILE"},
		{"cert on piv", []string{"card", "import", filepath.Join(tmp, "a"), "--type", "piv", "--pem", td("combined.pem")}, "not --cert"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := runCLI(t, "", tc.args...)
			if code != exitUsage || !strings.Contains(errs, tc.want) {
				t.Errorf("exit %d, stderr %q; want usage error with %q", code, errs, tc.want)
			}
			noDir(t, filepath.Join(tmp, "a"))
		})
	}
}

// TestCardImportPIV: PEM pairs, a combined PEM and a PKCS#12 file into
// named slots.
func TestCardImportPIV(t *testing.T) {
	needTools(t, "openssl")
	td := absTestdata(t)
	tmp := t.TempDir()
	runTool(t, tmp, "openssl", "pkcs12", "-export", "-in", td("rsa-pkcs8.crt"), "-inkey", td("rsa-pkcs8.key"), "-certfile", td("ca.crt"), "-passout", "pass:s3cret", "-out", "k.p12")
	dir := filepath.Join(tmp, "card")
	code, out, errs := runCLI(t, "", "card", "import", dir, "--type", "piv",
		"--slot", "9a="+td("rsa-pkcs1.crt")+","+td("rsa-pkcs1.key"),
		"--slot", "9C="+td("ec-sec1.crt")+","+td("ec-sec1.key"),
		"--slot", "0x82="+filepath.Join(tmp, "k.p12"),
		"--password-file", writeFile(t, filepath.Join(tmp, "pw"), "s3cret\n"),
		"--pin", "654321", "--puk", "11223344")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errs)
	}
	for _, want := range []string{"Imported PIV card in " + dir, "9A PIV Authentication", "9C Digital Signature", "82 Retired Key Management 1", "ECDSA P-256", "RSA-1024"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "s3cret") || strings.Contains(errs, "s3cret") {
		t.Error("password printed")
	}
	c, err := store.OpenPIV(dir, store.PIVOpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Slots(); !bytes.Equal(got, []byte{0x9A, 0x9C, 0x82}) {
		t.Errorf("slots %X", got)
	}
	if _, err := c.PIN().Verify([]byte("654321")); err != nil {
		t.Error(err)
	}
	// The certificate objects are readable as the card serves them.
	for _, ref := range []byte{0x9A, 0x9C, 0x82} {
		cert, err := pivCert(c, ref)
		if err != nil || cert == nil {
			t.Errorf("certificate %02X: %v", ref, err)
		}
	}
}

// TestOpenCardDir: the one helper serve, connect and reader use opens
// either type and the card answers as its type does.
func TestOpenCardDir(t *testing.T) {
	tmp := t.TempDir()
	pivDir, cacDir := filepath.Join(tmp, "piv"), filepath.Join(tmp, "cac")
	if code, _, errs := runCLI(t, "", "card", "new", pivDir, "--type", "piv", "--key", "p256"); code != exitOK {
		t.Fatal(errs)
	}
	if code, _, errs := runCLI(t, "", "card", "new", cacDir, "--key", "rsa1024"); code != exitOK {
		t.Fatal(errs)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	// SELECT of the PIV application, by its right-truncated AID as
	// OpenSC sends it.
	selectPIV := []byte{0x00, 0xA4, 0x04, 0x00, 0x09, 0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x00}
	for _, tc := range []struct {
		dir, typ, desc string
		wantSW         apdu.SW
	}{
		{pivDir, store.TypePIV, "(PIV, 4 keys: 9a, 9c, 9d, 9e)", apdu.SWOK},
		{cacDir, store.TypeCAC, "(3 certificates: id, signing, encryption)", 0},
	} {
		oc, err := openCardDir(tc.dir, false, log)
		if err != nil {
			t.Fatal(err)
		}
		if oc.typ != tc.typ || !strings.HasSuffix(oc.desc, tc.desc) {
			t.Errorf("%s: type %q desc %q", tc.dir, oc.typ, oc.desc)
		}
		oc.card.PowerOn()
		r, err := oc.card.Transmit(context.Background(), selectPIV)
		if err != nil {
			t.Fatal(err)
		}
		sw := apdu.SW(uint16(r[len(r)-2])<<8 | uint16(r[len(r)-1]))
		if tc.typ == store.TypePIV && sw != tc.wantSW {
			t.Errorf("PIV card answers SELECT PIV with %04X", uint16(sw))
		}
		if tc.typ == store.TypeCAC && sw == apdu.SWOK {
			t.Errorf("CAC card accepts the PIV AID")
		}
	}
	if _, err := openCardDir(filepath.Join(tmp, "none"), false, log); err == nil || !strings.Contains(err.Error(), "vscard card new") {
		t.Errorf("missing dir: %v", err)
	}
}

// TestReaderAppPIVCard: vscard reader --card takes a PIV card directory
// through the same helper and lists it as one.
func TestReaderAppPIVCard(t *testing.T) {
	pivDir := filepath.Join(t.TempDir(), "piv")
	if code, _, errs := runCLI(t, "", "card", "new", pivDir, "--type", "piv", "--key", "p256"); code != exitOK {
		t.Fatal(errs)
	}
	d := shortDir(t)
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433,
		usbredir: &target{Network: "unix", Addr: filepath.Join(d, "no-qemu.sock")},
		sources:  []sourceSpec{{kind: srcCard, arg: pivDir}, {kind: srcCard, arg: testCard(t)}}}
	app, err := newReaderApp(context.Background(), cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer app.close()
	list := app.handle(context.Background(), "list")
	if !strings.Contains(list, pivDir+" (PIV, 4 keys: 9a, 9c, 9d, 9e)") || !strings.Contains(list, "3 certificates") {
		t.Errorf("list:\n%s", list)
	}
}

// TestCardNewPIVMgmAlg: --mgm-alg without --mgm-key generates a random key
// of that algorithm and prints it once.
func TestCardNewPIVMgmAlg(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "piv")
	code, out, errs := runCLI(t, "", "card", "new", dir, "--type", "piv", "--key", "p256", "--mgm-alg", "aes256")
	if code != exitOK {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	m := regexp.MustCompile(`(?m)^Management key \(AES-256\): ([0-9A-F]{64}) \(shown once`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no generated AES-256 key in:\n%s", out)
	}
	c, err := store.OpenPIV(dir, store.PIVOpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if alg, key, _ := c.ManagementKey(); alg != piv.AlgAES256 || strings.ToUpper(hex.EncodeToString(key)) != m[1] {
		t.Errorf("management key %02X %x, printed %s", alg, key, m[1])
	}
}
