package guest

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

const (
	// nssGuestPassword is the password of the second database and so its
	// PIN. Eight characters: OpenSC's CAC driver takes PINs up to 8.
	nssGuestPassword = "Nss-4711"
	// nssAnyPIN is what the guest types for the empty-password database,
	// which accepts any PIN as libcacard's does.
	nssAnyPIN = "24681357"
)

// TestGuestNSS is issue 4's acceptance: NSS databases made with the exact
// commands of QEMU's smart card documentation (once with an empty password,
// once with a password) are served with the exact vscclient line of the
// issue to the guest, where OpenSC lists the three certificates, signs with
// the database password as PIN (verified here with certutil's id-cert) and
// CoolKey through NSS lists the three certificates. One boot serves both
// databases, one after the other, and then the second one again through
// the other command line, vscard connect --nss ... --certs ...,
// for one more signature (testdata/nss.sh).
func TestGuestNSS(t *testing.T) {
	requireGuest(t)
	script, err := os.ReadFile("testdata/nss.sh")
	if err != nil {
		t.Fatal(err)
	}
	recipe, err := filepath.Abs("testdata/nss-recipe.sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	dbs := map[string]string{}
	for _, name := range []string{"empty", "password"} {
		dbs[name] = makeRecipeDB(t, recipe, filepath.Join(dir, name), map[string]string{"empty": "", "password": nssGuestPassword}[name])
	}

	target := fmt.Sprintf("tcp:127.0.0.1:%d", freePort(t))
	hostAddr, port, _ := strings.Cut(strings.TrimPrefix(target, "tcp:"), ":")
	hostLog := filepath.Join(dir, "vscclient.log")
	// serve runs the command line, as a shell would expand
	// vscclient -e "db=\"sql:$PWD\" use_hw=no soft=(,Test,CAC,,id-cert,signing-cert,encryption-cert)" HOST PORT
	serve := func(db string) *proc {
		return startProc(t, hostLog, true, vscclientBin,
			"-e", `db="sql:`+db+`" use_hw=no soft=(,Test,CAC,,id-cert,signing-cert,encryption-cert)`, hostAddr, port)
	}

	cfg := bootConfig(t, target, string(script))
	cfg.Files = map[string][]byte{"/vscard/db-password": []byte(nssGuestPassword), "/vscard/any-pin": []byte(nssAnyPIN)}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Timeout)
	defer cancel()
	vm, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("guest console (tail of %s):\n%s", cfg.ConsoleLog, vm.Tail(120))
			t.Logf("host log, vscclient and vscard connect (tail of %s):\n%s", hostLog, fileTail(hostLog, 40))
		}
	})
	g := &guestSession{t: t, vm: vm, ctx: ctx}
	step, host := g.step, g.host
	start := time.Now()
	since := func() string { return time.Since(start).Round(10 * time.Millisecond).String() }

	// round reads the guest's checks for one database.
	round := func(t *testing.T, r string) {
		step(t, r+"-present")
		t.Run("opensc-lists-3-certs", func(t *testing.T) {
			s := step(t, r+"-certs")
			t.Logf("guest pkcs11-tool -O --type cert (%s):\n%s", since(), s.Output)
			if n := strings.Count(s.Output, "Certificate Object"); n != 3 {
				t.Errorf("OpenSC lists %d certificates, want 3", n)
			}
			for _, cn := range []string{"John Doe", "John Doe (signing)", "John Doe (encryption)"} {
				if !regexp.MustCompile(`(?m)subject:\s+DN: CN=` + regexp.QuoteMeta(cn) + `\s*$`).MatchString(s.Output) {
					t.Errorf("OpenSC's listing lacks the certificate of CN=%s", cn)
				}
			}
		})
		t.Run("sign-verify-on-host", func(t *testing.T) {
			if r == "password" {
				t.Logf("a wrong PIN is refused:\n%s", step(t, r+"-wrong-pin").Output)
			}
			data := decodeB64(t, step(t, r+"-data"))
			sig := decodeB64(t, step(t, r+"-sig"))
			cert := recipeCert(t, dbs[r], "id-cert")
			if err := verifyPKCS1SHA256(cert, data, sig); err != nil {
				t.Fatalf("the guest's signature does not verify with certutil -L -n id-cert: %v", err)
			}
			t.Logf("guest signature verified with id-cert (%s)", since())
		})
		t.Run("coolkey-nss", func(t *testing.T) {
			step(t, r+"-modutil")
			s := step(t, r+"-coolkey")
			t.Logf("guest certutil -L -h all through CoolKey (%s):\n%s", since(), s.Output)
			for _, l := range cacLabels {
				if !regexp.MustCompile(`(?m)^\S.*:` + regexp.QuoteMeta(l) + `\s+u,u,u\s*$`).MatchString(s.Output) {
					t.Errorf("CoolKey through NSS does not list %q", l)
				}
			}
		})
	}

	var vc *proc
	host(t, "serve-empty", func() { vc = serve(dbs["empty"]) })
	t.Run("empty-password", func(t *testing.T) { round(t, "empty") })
	// stop ends vscclient with its own exit command.
	stop := func() {
		io.WriteString(vc.stdin, "exit\n")
		if err := vc.wait(10 * time.Second); err != nil {
			t.Errorf("vscclient after exit: %v", err)
		}
	}
	host(t, "stop-empty", func() {
		stop()
		if b, _ := os.ReadFile(hostLog); !strings.Contains(string(b), "effectively unprotected") {
			t.Errorf("vscclient did not warn that the empty-password database's keys are unprotected")
		}
	})
	step(t, "empty-gone")
	host(t, "serve-password", func() { vc = serve(dbs["password"]) })
	t.Run("password", func(t *testing.T) { round(t, "password") })
	host(t, "stop-password", stop)
	step(t, "password-gone")
	// The other command line for the same database.
	host(t, "serve-connect", func() {
		startProc(t, hostLog, false, vscardBin, "connect", "--nss", "sql:"+dbs["password"],
			"--certs", "id-cert,signing-cert,encryption-cert",
			"--no-stdin", "--control", filepath.Join(dir, "connect.sock"), target)
	})
	t.Run("vscard-connect-nss", func(t *testing.T) {
		step(t, "connect-present")
		data := decodeB64(t, step(t, "connect-data"))
		sig := decodeB64(t, step(t, "connect-sig"))
		if err := verifyPKCS1SHA256(recipeCert(t, dbs["password"], "id-cert"), data, sig); err != nil {
			t.Fatalf("the guest's signature does not verify with certutil -L -n id-cert: %v", err)
		}
		t.Logf("guest signature through vscard connect --nss verified with id-cert (%s)", since())
	})

	r, err := vm.Wait()
	logMarks(t, r)
	if err != nil || r.Status != 0 {
		t.Fatalf("guest: err=%v status=%d", err, r.Status)
	}
	if b, _ := os.ReadFile(hostLog); strings.Contains(string(b), nssGuestPassword) {
		t.Errorf("the database password appears in vscclient's log")
	}
}

// makeRecipeDB runs testdata/nss-recipe.sh (the commands) in a new
// directory dir; password "" gives --empty-password.
func makeRecipeDB(t *testing.T, recipe, dir, password string) string {
	t.Helper()
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	noise := dir + ".noise"
	if err := os.WriteFile(noise, []byte(strings.Repeat("guest test noise ", 150)), 0o600); err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), "NOISE="+noise, "NEWPW=--empty-password", "PW=")
	if password != "" {
		pwfile := dir + ".pw"
		if err := os.WriteFile(pwfile, []byte(password+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		env = append(env, "NEWPW=-f "+pwfile, "PW=-f "+pwfile)
	}
	cmd := exec.Command("sh", recipe)
	cmd.Dir = dir
	cmd.Env = append(env, "PWD="+dir)
	cmd.Stdin = strings.NewReader("")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("NSS recipe in %s: %v\n%s", dir, err, out)
	}
	return dir
}

// recipeCert is the certificate as `certutil -L -n NICK -a` shows it.
func recipeCert(t *testing.T, dir, nick string) *x509.Certificate {
	t.Helper()
	out, err := exec.Command("certutil", "-L", "-d", "sql:"+dir, "-n", nick, "-a").Output()
	if err != nil {
		t.Fatalf("certutil -L -n %s -a: %v", nick, err)
	}
	blk, _ := pem.Decode(out)
	if blk == nil {
		t.Fatalf("certutil -L -n %s -a: no PEM", nick)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
