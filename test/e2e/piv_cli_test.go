package e2e

import (
	"bytes"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// A PIV card made by "vscard card new --type piv" with known secrets. The
// management key is 3DES: Debian 12's yubico-piv-tool 2.2.0 authenticates
// with 3DES only (AES management keys came with 2.3), and this is
// Yubico's well-known default key.
const (
	cliPIN    = "123456"
	cliPUK    = "12345678"
	cliNewPIN = "246810"
	cliMgmKey = "010203040506070801020304050607080102030405060708"
	// cliReader is the vpcd reader of slot 0, as yubico-piv-tool -r and
	// vscard apdu --reader match it (a part of the name).
	cliReader = "Virtual PCD 00 00"
	// cliSelectPIV selects the PIV application by its truncated AID, as
	// OpenSC and yubico-piv-tool send it.
	cliSelectPIV = "00A4040009A00000030800001000"
)

func (e *env) newCLIPIVCard(name, key string) string {
	e.t.Helper()
	dir := filepath.Join(e.dir, name)
	r := e.vscard("card", "new", dir, "--type", "piv", "--key", key, "--pin", cliPIN, "--puk", cliPUK,
		"--mgm-key", cliMgmKey, "--mgm-alg", "3des")
	if r.code != 0 {
		e.t.Fatalf("making a PIV card failed:\n%s", r)
	}
	return dir
}

// cliAPDUs sends APDUs (after SELECT PIV) with vscard apdu and returns the
// status word of each, SELECT's first.
func (e *env) cliAPDUs(apdus ...string) []string {
	e.t.Helper()
	out, stderr, err := e.stdout(vscardBin, append([]string{"apdu", "--json", "--reader", cliReader, cliSelectPIV}, apdus...)...)
	if err != nil {
		e.t.Fatalf("vscard apdu: %v\n%s", err, stderr)
	}
	var rs []struct {
		SW    string `json:"sw"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(out, &rs); err != nil {
		e.t.Fatalf("vscard apdu --json: %v\n%s", err, out)
	}
	sws := make([]string, len(rs))
	for i, r := range rs {
		if r.Error != "" {
			e.t.Fatalf("vscard apdu: command %d: %s", i+1, r.Error)
		}
		sws[i] = r.SW
	}
	if sws[0] != "9000" {
		e.t.Fatalf("SELECT PIV answered %s", sws[0])
	}
	return sws[1:]
}

// cliVerifyAPDU is VERIFY of the PIV PIN (80) with pin padded to 8 bytes with
// FF (SP 800-73-4 Part 2 §3.2.1); pin "" is the status form (no data).
func cliVerifyAPDU(ref, pin string) string {
	if pin == "" {
		return "002000" + ref
	}
	b := []byte(pin)
	for len(b) < 8 {
		b = append(b, 0xFF)
	}
	return "002000" + ref + "08" + strings.ToUpper(cliHex(b))
}

func cliHex(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

// TestPIVCLISign: cards made by the CLI with RSA-2048 and P-256 keys,
// served over vpcd, are PIV cards to OpenSC; pkcs11-tool signs with the
// 9A key and openssl verifies against the certificate read from the card.
func TestPIVCLISign(t *testing.T) {
	e := newEnv(t)
	m := openscModule(t)
	for _, key := range []string{"rsa2048", "p256"} {
		t.Run(key, func(t *testing.T) {
			e := &env{t: t, home: e.home, dir: t.TempDir()}
			dir := e.newCLIPIVCard("card", key)
			e.serve([]card{{dir: dir, slot: 0}})

			if r := e.p11(m, "-L"); r.code != 0 || !strings.Contains(strings.ToUpper(r.out), "PIV") {
				t.Fatalf("OpenSC does not list a PIV token:\n%s", r)
			}
			// OpenSC's PIV driver names the 9A certificate and key ID 01.
			cert := e.path("cert.der")
			if r := e.p11(m, "--read-object", "--type", "cert", "--id", "01", "-o", cert); r.code != 0 {
				t.Fatalf("reading the 9A certificate:\n%s", r)
			}
			pub, stderr, err := e.stdout("openssl", "x509", "-inform", "DER", "-in", cert, "-pubkey", "-noout")
			if err != nil {
				t.Fatalf("openssl x509: %v\n%s", err, stderr)
			}
			pubPath := e.path("pub.pem")
			if err := os.WriteFile(pubPath, pub, 0o600); err != nil {
				t.Fatal(err)
			}
			data, _ := e.writeRandom("data", 100)
			sig := e.path("sig")
			var r result
			if key == "p256" {
				// CKM_ECDSA signs a hash; --signature-format openssl
				// returns the DER form openssl dgst reads.
				h, stderr, err := e.stdout("openssl", "dgst", "-sha256", "-binary", data)
				if err != nil {
					t.Fatalf("openssl dgst: %v\n%s", err, stderr)
				}
				if err := os.WriteFile(e.path("hash"), h, 0o600); err != nil {
					t.Fatal(err)
				}
				r = e.p11(m, "--login", "--pin", cliPIN, "--sign", "--id", "01", "-m", "ECDSA", "--signature-format", "openssl", "-i", e.path("hash"), "-o", sig)
			} else {
				r = e.p11(m, "--login", "--pin", cliPIN, "--sign", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", data, "-o", sig)
			}
			if r.code != 0 {
				t.Fatalf("signing with 9A:\n%s", r)
			}
			if v := e.run("openssl", "dgst", "-sha256", "-verify", pubPath, "-signature", sig, data); v.code != 0 || !strings.Contains(v.out, "Verified OK") {
				t.Errorf("openssl does not verify the card's signature:\n%s", v)
			}
		})
	}
}

// TestPIVCLICounters: wrong PINs count down (63 Cx), the PIN blocks
// (69 83), the PUK unblocks it with yubico-piv-tool -a unblock-pin, and
// every state survives a restart of vscard serve and shows in card show.
func TestPIVCLICounters(t *testing.T) {
	e := newEnv(t)
	needTools(t, "yubico-piv-tool")
	dir := e.newCLIPIVCard("card", "p256")
	cards := []card{{dir: dir, slot: 0}}
	srv := e.serve(cards)

	want := func(step string, got []string, sws ...string) {
		t.Helper()
		if strings.Join(got, " ") != strings.Join(sws, " ") {
			t.Fatalf("%s: status words %v, want %v\nvscard serve log:\n%s", step, got, sws, srv.log())
		}
	}
	show := func(step string, res ...string) {
		t.Helper()
		r := e.vscard("card", "show", dir)
		for _, re := range res {
			if !regexp.MustCompile(re).MatchString(r.out) {
				t.Errorf("%s: card show does not match %q:\n%s", step, re, r)
			}
		}
	}

	want("wrong PIN", e.cliAPDUs(cliVerifyAPDU("80", "000000")), "63C2")
	srv = srv.restart(cards)
	want("PIN status after restart", e.cliAPDUs(cliVerifyAPDU("80", "")), "63C2")
	show("after one wrong PIN", `PIN: set, 2 of 3 tries left`)

	want("two more wrong PINs", e.cliAPDUs(cliVerifyAPDU("80", "000000"), cliVerifyAPDU("80", "111111")), "63C1", "63C0")
	want("right PIN when blocked", e.cliAPDUs(cliVerifyAPDU("80", cliPIN)), "6983")
	srv = srv.restart(cards)
	want("blocked after restart", e.cliAPDUs(cliVerifyAPDU("80", cliPIN)), "6983")
	show("blocked", `PIN: set, blocked \(0 of 3 tries left\)`)

	// A wrong PUK counts too, and survives a restart.
	if r := e.run("yubico-piv-tool", "-r", cliReader, "-a", "unblock-pin", "-P", "87654321", "-N", cliNewPIN); r.code == 0 {
		t.Fatalf("unblock with a wrong PUK succeeded:\n%s", r)
	}
	srv = srv.restart(cards)
	show("after a wrong PUK", `PUK: set, 2 of 3 tries left`, `PIN: set, blocked`)

	if r := e.run("yubico-piv-tool", "-r", cliReader, "-a", "unblock-pin", "-P", cliPUK, "-N", cliNewPIN); r.code != 0 {
		t.Fatalf("yubico-piv-tool -a unblock-pin:\n%s\nvscard serve log:\n%s", r, srv.log())
	}
	srv = srv.restart(cards)
	show("unblocked", `PIN: set, 3 of 3 tries left`, `PUK: set, 3 of 3 tries left`)
	want("old PIN after unblock", e.cliAPDUs(cliVerifyAPDU("80", cliPIN)), "63C2")
	want("new PIN after unblock", e.cliAPDUs(cliVerifyAPDU("80", cliNewPIN)), "9000")
	srv = srv.restart(cards)
	want("new PIN after restart", e.cliAPDUs(cliVerifyAPDU("80", cliNewPIN)), "9000")
}

// TestPIVCLIGenerate: a key yubico-piv-tool generates on the card and the
// certificate it imports (issued by the card's CA for that key) survive a
// restart of vscard serve; the card then signs with that key.
func TestPIVCLIGenerate(t *testing.T) {
	e := newEnv(t)
	needTools(t, "yubico-piv-tool")
	m := openscModule(t)
	dir := e.newCLIPIVCard("card", "rsa2048")
	cards := []card{{dir: dir, slot: 0}}
	srv := e.serve(cards)

	ypt := func(args ...string) string {
		t.Helper()
		r := e.run("yubico-piv-tool", append([]string{"-r", cliReader}, args...)...)
		if r.code != 0 {
			t.Fatalf("yubico-piv-tool failed:\n%s\nvscard serve log:\n%s", r, srv.log())
		}
		return r.out
	}
	pub := e.path("gen-pub.pem")
	ypt("--key="+cliMgmKey, "-a", "generate", "-s", "9a", "-A", "ECCP256", "-o", pub)
	// The certificate for the generated key comes from the card's CA
	// (its key is in the card directory) rather than from
	// yubico-piv-tool -a selfsign-certificate: 2.2.0 fails that under
	// OpenSSL 3 before it sends any APDU.
	csr, cert := e.path("gen.csr"), e.path("gen-cert.pem")
	e.must("openssl", "req", "-new", "-key", filepath.Join(dir, "ca-key.pem"), "-subj", "/CN=Generated On Card", "-out", csr)
	e.must("openssl", "x509", "-req", "-in", csr, "-CA", filepath.Join(dir, "ca.pem"), "-CAkey", filepath.Join(dir, "ca-key.pem"),
		"-CAserial", e.path("ca.srl"), "-CAcreateserial", "-force_pubkey", pub, "-days", "30", "-out", cert)
	ypt("--key="+cliMgmKey, "-a", "import-certificate", "-s", "9a", "-i", cert)

	srv = srv.restart(cards)

	got := e.path("read-cert.pem")
	ypt("-a", "read-certificate", "-s", "9a", "-o", got)
	if !cliSameCertPEM(t, cert, got) {
		t.Fatalf("the certificate read after the restart is not the imported one")
	}
	if r := e.vscard("card", "show", dir); !strings.Contains(r.out, "9A PIV Authentication\n     private key: ECDSA P-256\n     subject:  CN=Generated On Card") {
		t.Errorf("card show does not show the generated key and its certificate:\n%s", r)
	}

	// The card signs with the generated key: verify against the public
	// key yubico-piv-tool printed at generation.
	data, _ := e.writeRandom("data", 64)
	h, stderr, err := e.stdout("openssl", "dgst", "-sha256", "-binary", data)
	if err != nil {
		t.Fatalf("openssl dgst: %v\n%s", err, stderr)
	}
	if err := os.WriteFile(e.path("hash"), h, 0o600); err != nil {
		t.Fatal(err)
	}
	sig := e.path("sig")
	if r := e.p11(m, "--login", "--pin", cliPIN, "--sign", "--id", "01", "-m", "ECDSA", "--signature-format", "openssl", "-i", e.path("hash"), "-o", sig); r.code != 0 {
		t.Fatalf("signing with the generated key:\n%s\nvscard serve log:\n%s", r, srv.log())
	}
	if v := e.run("openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data); v.code != 0 || !strings.Contains(v.out, "Verified OK") {
		t.Errorf("openssl does not verify the generated key's signature:\n%s", v)
	}
}

// cliSameCertPEM reports whether two PEM files hold the same certificate.
func cliSameCertPEM(t *testing.T, a, b string) bool {
	t.Helper()
	der := func(p string) []byte {
		raw, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		blk, _ := pem.Decode(raw)
		if blk == nil {
			t.Fatalf("%s: no PEM block:\n%s", p, raw)
		}
		return blk.Bytes
	}
	return bytes.Equal(der(a), der(b))
}

// TestPIVCLIImport: a card imported from a PKCS#12 file (EC P-256, 9A)
// and a PEM pair (RSA-2048, 9C) serves those certificates after a
// restart, and signs with both keys (9C through the PIN-always policy).
func TestPIVCLIImport(t *testing.T) {
	e := newEnv(t)
	m := openscModule(t)
	ecKey, ecCert := e.path("ec-key.pem"), e.path("ec-cert.pem")
	e.must("openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", ecKey)
	e.must("openssl", "req", "-new", "-x509", "-key", ecKey, "-subj", "/CN=Imported EC", "-days", "30", "-out", ecCert)
	p12 := e.path("ec.p12")
	e.must("openssl", "pkcs12", "-export", "-in", ecCert, "-inkey", ecKey, "-passout", "pass:", "-out", p12)
	rsaKey, rsaCert := e.path("rsa-key.pem"), e.path("rsa-cert.pem")
	e.must("openssl", "genrsa", "-out", rsaKey, "2048")
	e.must("openssl", "req", "-new", "-x509", "-key", rsaKey, "-subj", "/CN=Imported RSA", "-days", "30", "-out", rsaCert)

	dir := filepath.Join(e.dir, "card")
	if r := e.vscard("card", "import", dir, "--type", "piv", "--slot", "9a="+p12, "--slot", "9c="+rsaCert+","+rsaKey,
		"--pin", cliPIN, "--puk", cliPUK, "--mgm-key", cliMgmKey, "--mgm-alg", "3des"); r.code != 0 {
		t.Fatalf("card import --type piv:\n%s", r)
	}
	cards := []card{{dir: dir, slot: 0}}
	srv := e.serve(cards)
	srv = srv.restart(cards)

	for _, s := range []struct {
		id, cert, mech string
	}{
		{"01", ecCert, "ECDSA"},
		{"02", rsaCert, "SHA256-RSA-PKCS"},
	} {
		got := e.path("read-" + s.id + ".der")
		if r := e.p11(m, "--read-object", "--type", "cert", "--id", s.id, "-o", got); r.code != 0 {
			t.Fatalf("reading certificate %s:\n%s", s.id, r)
		}
		gotDER, _ := os.ReadFile(got)
		wantPEM, _ := os.ReadFile(s.cert)
		blk, _ := pem.Decode(wantPEM)
		if blk == nil || !bytes.Equal(gotDER, blk.Bytes) {
			t.Errorf("certificate %s on the card is not the imported one", s.id)
		}
		pub, stderr, err := e.stdout("openssl", "x509", "-in", s.cert, "-pubkey", "-noout")
		if err != nil {
			t.Fatalf("openssl x509: %v\n%s", err, stderr)
		}
		pubPath := e.path("pub-" + s.id + ".pem")
		if err := os.WriteFile(pubPath, pub, 0o600); err != nil {
			t.Fatal(err)
		}
		data, _ := e.writeRandom("data-"+s.id, 80)
		in := data
		args := []string{"--login", "--pin", cliPIN, "--sign", "--id", s.id, "-m", s.mech}
		if s.mech == "ECDSA" {
			h, stderr, err := e.stdout("openssl", "dgst", "-sha256", "-binary", data)
			if err != nil {
				t.Fatalf("openssl dgst: %v\n%s", err, stderr)
			}
			in = e.path("hash-" + s.id)
			if err := os.WriteFile(in, h, 0o600); err != nil {
				t.Fatal(err)
			}
			args = append(args, "--signature-format", "openssl")
		}
		sig := e.path("sig-" + s.id)
		if r := e.p11(m, append(args, "-i", in, "-o", sig)...); r.code != 0 {
			t.Fatalf("signing with key %s:\n%s\nvscard serve log:\n%s", s.id, r, srv.log())
		}
		if v := e.run("openssl", "dgst", "-sha256", "-verify", pubPath, "-signature", sig, data); v.code != 0 || !strings.Contains(v.out, "Verified OK") {
			t.Errorf("openssl does not verify key %s's signature:\n%s", s.id, v)
		}
	}
}
