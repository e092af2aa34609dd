package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/vscard/vscard/token"
	"github.com/vscard/vscard/token/store"
)

// runCLI runs vscard with args and returns exit code, stdout and stderr.
func runCLI(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	env := &environ{stdin: strings.NewReader(stdin), stdout: &out, stderr: &errb}
	code := run(context.Background(), env, args)
	return code, out.String(), errb.String()
}

const storeTestdata = "../../token/store/testdata"

func TestCardNewShow(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cards", "john")
	// DIR first, flags after: how users type it.
	code, out, errs := runCLI(t, "", "card", "new", dir, "--cn", "John Doe", "--key", "rsa1024", "--pin-tries", "2")
	if code != exitOK {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	for _, want := range []string{
		"Created CAC card in " + dir,
		"1. id         CN=John Doe  serial ",
		"2. signing    CN=John Doe (signing)  serial ",
		"3. encryption CN=John Doe (encryption)  serial ",
		"RSA-1024",
		"CA: CN=Fake Smart Card CA",
		filepath.Join(dir, "ca.pem"),
		filepath.Join(dir, "ca.der"),
		"PIN tries: 2",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	m := regexp.MustCompile(`(?m)^PIN: ([0-9]{8}) \(shown once; it is stored only as a hash\)$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no generated PIN line in:\n%s", out)
	}
	pin := m[1]

	// The printed PIN is the card's PIN, and another is refused.
	c, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.PIN().Verify([]byte(pin)); err != nil {
		t.Fatalf("printed PIN does not verify: %v", err)
	}
	if _, err := c.PIN().Verify([]byte("00000000")); !errors.Is(err, token.ErrPINIncorrect) {
		t.Fatalf("wrong PIN: %v", err)
	}

	code, out, errs = runCLI(t, "", "card", "show", dir)
	if code != exitOK {
		t.Fatalf("show: exit %d, stderr %q", code, errs)
	}
	for _, want := range []string{
		"Type: CAC",
		"Name: John Doe",
		"PIN: set, 1 of 2 tries left",
		"subject:  CN=John Doe (signing)",
		"issuer:   CN=Fake Smart Card CA",
		"usage:    digitalSignature, keyEncipherment; clientAuth, msSmartcardLogon",
		"usage:    digitalSignature, nonRepudiation; emailProtection",
		"usage:    keyEncipherment, dataEncipherment; clientAuth, emailProtection",
		"usage:    keyCertSign, cRLSign",
		"key:      RSA-1024",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("show output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, pin) {
		t.Error("show prints the PIN")
	}
	// OpenSC's serial: bytes 6..13 of SHA-256 over the identity
	// certificate (see openSCSerial; observed with pkcs11-tool -L).
	sum := sha256.Sum256(c.Credentials()[0].Cert.Raw)
	if want := fmt.Sprintf("Serial: %x (as OpenSC", sum[6:14]); !strings.Contains(out, want) {
		t.Errorf("show output lacks %q:\n%s", want, out)
	}

	// Block it and show again.
	if _, err := c.PIN().Verify([]byte("00000000")); !errors.Is(err, token.ErrPINIncorrect) {
		t.Fatalf("wrong PIN: %v", err)
	}
	if _, out, _ = runCLI(t, "", "card", "show", dir); !strings.Contains(out, "PIN: set, blocked (0 of 2 tries left)") {
		t.Errorf("blocked card shows:\n%s", out)
	}

	// Making it again is refused, with advice.
	code, _, errs = runCLI(t, "", "card", "new", "--key", "rsa1024", dir)
	if code != exitError || !strings.Contains(errs, "already exists; choose another DIR or remove it") {
		t.Errorf("second new: exit %d, %q", code, errs)
	}
}

func TestCardNewGivenPIN(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
		pin   string
	}{
		{"flag", "", []string{"--pin", "7777"}, "7777"},
		{"stdin", "77777777\n", []string{"--pin", "-"}, "77777777"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "c")
			args := append([]string{"card", "new", "--key", "rsa1024"}, tc.args...)
			code, out, errs := runCLI(t, tc.stdin, append(args, dir)...)
			if code != exitOK {
				t.Fatalf("exit %d: %s", code, errs)
			}
			if strings.Contains(out, tc.pin) || strings.Contains(out, "shown once") {
				t.Errorf("a given PIN was printed:\n%s", out)
			}
			c, err := store.Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.PIN().Verify([]byte(tc.pin)); err != nil {
				t.Errorf("Verify(%q): %v", tc.pin, err)
			}
		})
	}
}

func TestCardImport(t *testing.T) {
	td := func(f string) string { return filepath.Join(storeTestdata, f) }
	dir := filepath.Join(t.TempDir(), "imp")
	code, out, errs := runCLI(t, "", "card", "import", dir,
		"--pem", td("combined.pem"),
		"--cert", td("ec-sec1.crt"), "--key", td("ec-sec1.key"),
		"--cert", td("rsa-pkcs8.crt"), "--key", td("rsa-pkcs8.key"),
		"--ca", td("ca.der"), "--pin", "2468")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errs)
	}
	for _, want := range []string{
		"Imported card in " + dir,
		"1. cert1      CN=Alice Import  serial",
		"2. cert2      CN=Alice EC  serial",
		"3. cert3      CN=Alice Import (signing)  serial",
		"CA: CN=Import Test CA",
		`warning: credential "cert2" has a ECDSA P-256 key; the CAC card serves only RSA keys`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	c, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.PIN().Verify([]byte("2468")); err != nil {
		t.Error(err)
	}
}

func TestCardErrors(t *testing.T) {
	tmp := t.TempDir()
	td := func(f string) string { return filepath.Join(storeTestdata, f) }
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string // in stderr
	}{
		{"no subcommand", []string{"card"}, exitUsage, "missing subcommand"},
		{"unknown subcommand", []string{"card", "burn"}, exitUsage, `unknown subcommand "burn"`},
		{"new without DIR", []string{"card", "new", "--cn", "X"}, exitUsage, "missing card directory DIR"},
		{"new two DIRs", []string{"card", "new", "a", "b"}, exitUsage, "one card directory expected"},
		{"new bad key", []string{"card", "new", "x", "--key", "rsa512"}, exitUsage, `--key "rsa512"`},
		{"new short PIN", []string{"card", "new", "x", "--pin", "12"}, exitUsage, "--pin: PIN must be 4 to 8 characters"},
		{"new long PIN", []string{"card", "new", "x", "--pin", "123456789"}, exitUsage, "--pin: PIN must be 4 to 8 characters"},
		{"new tries", []string{"card", "new", "x", "--pin-tries", "0"}, exitUsage, "--pin-tries must be 1 to 15"},
		{"new unknown flag", []string{"card", "new", "x", "--force"}, exitUsage, "flag provided but not defined: -force"},
		{"new flag missing value", []string{"card", "new", "x", "--cn"}, exitUsage, "flag needs an argument"},
		{"import nothing", []string{"card", "import", filepath.Join(tmp, "i")}, exitUsage, "give the certificates"},
		{"import missing file", []string{"card", "import", filepath.Join(tmp, "i"), "--pem", filepath.Join(tmp, "nope.pem")}, exitError, "nope.pem"},
		{"import key without cert", []string{"card", "import", filepath.Join(tmp, "i"), "--cert", td("rsa-pkcs1.crt"), "--key", td("rsa-pkcs8.key")}, exitError, "no private key matches"},
		{"show missing", []string{"card", "show", filepath.Join(tmp, "none")}, exitError, "no card directory"},
		{"show not a card", []string{"card", "show", tmp}, exitError, "not a vscard card"},
		{"show without DIR", []string{"card", "show"}, exitUsage, "missing card directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := runCLI(t, "", tc.args...)
			if code != tc.code || !strings.Contains(errs, tc.want) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", code, errs, tc.code, tc.want)
			}
			if _, err := os.Stat(filepath.Join(tmp, "i")); err == nil {
				t.Error("a failed import left a card")
			}
		})
	}
}

func TestCardHelp(t *testing.T) {
	for _, args := range [][]string{{"card", "new", "-h"}, {"card", "import", "--help"}, {"card", "show", "-h"}, {"card", "help"}} {
		code, out, errs := runCLI(t, "", args...)
		if code != exitOK || !strings.Contains(out+errs, "usage: vscard card") {
			t.Errorf("%v: exit %d, output %q", args, code, out+errs)
		}
	}
}

func TestParseInterspersed(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		pos     []string
		cn      string
		certs   []string
		wantErr bool
	}{
		{[]string{"dir"}, []string{"dir"}, "", nil, false},
		{[]string{"dir", "--cn", "A B"}, []string{"dir"}, "A B", nil, false},
		{[]string{"--cn", "A", "dir"}, []string{"dir"}, "A", nil, false},
		{[]string{"--cert", "1", "dir", "--cert", "2", "-cn=X"}, []string{"dir"}, "X", []string{"1", "2"}, false},
		{[]string{"a", "b", "--cn", "x", "c"}, []string{"a", "b", "c"}, "x", nil, false},
		{[]string{"--cn", "x", "--", "-dir", "--cert", "z"}, []string{"-dir", "--cert", "z"}, "x", nil, false},
		{[]string{"dir", "--nope"}, nil, "", nil, true},
		{nil, nil, "", nil, false},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(&bytes.Buffer{})
		cn := fs.String("cn", "", "")
		var in []inputFile
		fs.Var(inputFlag{list: &in, asCert: true}, "cert", "")
		pos, err := parseInterspersed(fs, tc.args)
		if (err != nil) != tc.wantErr {
			t.Errorf("%q: err %v", tc.args, err)
			continue
		}
		var certs []string
		for _, f := range in {
			certs = append(certs, f.path)
		}
		if !tc.wantErr && (!slices.Equal(pos, tc.pos) || *cn != tc.cn || !slices.Equal(certs, tc.certs)) {
			t.Errorf("%q: pos %q cn %q certs %q; want %q %q %q", tc.args, pos, *cn, certs, tc.pos, tc.cn, tc.certs)
		}
	}
}
