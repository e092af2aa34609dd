package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"github.com/vscard/vscard/internal/fakehost"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/ctl"
	"github.com/vscard/vscard/token/store"
)

var updateGolden = flag.Bool("update", false, "rewrite golden files in testdata/")

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct {
		in                string
		network, addr, ho string
		err               string
	}{
		{in: "tcp:127.0.0.1:2001", network: "tcp", addr: "127.0.0.1:2001", ho: "127.0.0.1"},
		{in: "tcp:[::1]:2001", network: "tcp", addr: "[::1]:2001", ho: "::1"},
		{in: "localhost:2001", network: "tcp", addr: "localhost:2001", ho: "localhost"},
		{in: "tcp::2001", network: "tcp", addr: "127.0.0.1:2001", ho: "127.0.0.1"},
		{in: "unix:/run/qemu/ccid.sock", network: "unix", addr: "/run/qemu/ccid.sock"},
		{in: "unix:", err: "empty socket path"},
		{in: "tcp:::1:2001", err: "want tcp:HOST:PORT"},
		{in: "tcp:host:0", err: "not a number from 1 to 65535"},
		{in: "tcp:host:70000", err: "not a number"},
		{in: "tcp:host:http", err: "not a number"},
		{in: "host", err: "want tcp:HOST:PORT"},
		{in: "", err: "want tcp:HOST:PORT"},
	} {
		got, err := parseTarget(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("parseTarget(%q) = %+v, %v; want error %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || got.Network != tc.network || got.Addr != tc.addr || got.Host != tc.ho {
			t.Errorf("parseTarget(%q) = %+v, %v; want %s %s host %s", tc.in, got, err, tc.network, tc.addr, tc.ho)
		}
	}
}

func TestQEMUArgsGolden(t *testing.T) {
	for _, tc := range []struct{ name, golden string }{
		{"", "default"},
		{"--socket tcp:[::1]:4000 --id card2", "ipv6"},
		{"--socket unix:/run/vm/ccid,1.sock", "unix"},
		{"--socket tcp:192.0.2.7:2001 --tls-dir /etc/pki/qemu", "tls"},
		{"--usbredir --socket unix:/run/vm/redir.sock", "usbredir"},
		{"--usbredir --socket tcp:192.0.2.7:7000 --tls-dir /etc/pki/qemu --id r1", "usbredir-tls"},
	} {
		t.Run(tc.golden, func(t *testing.T) {
			var out, errb bytes.Buffer
			env := &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &errb}
			if err := runQEMUArgs(context.Background(), env, strings.Fields(tc.name)); err != nil {
				t.Fatal(err)
			}
			got := out.String() + errb.String()
			path := filepath.Join("testdata", "qemu-args-"+tc.golden+".golden")
			if *updateGolden {
				os.MkdirAll("testdata", 0o755)
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (go test -update writes it)", err)
			}
			if got != string(want) {
				t.Errorf("got:\n%s\nwant:\n%s", got, want)
			}
		})
	}
	var out bytes.Buffer
	env := &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out}
	for _, args := range [][]string{{"--socket", "nowhere"}, {"--id", "a,b"}, {"extra"}} {
		if err := runQEMUArgs(context.Background(), env, args); !errors.Is(err, errUsage) {
			t.Errorf("qemu-args %q: %v, want a usage error", args, err)
		}
	}
}

// pki is a throwaway CA with a server and a client certificate, made the
// way QEMU's documentation asks for tls-creds-x509 (peers.md §7.3).
type pki struct {
	dir                       string
	ca                        *x509.Certificate
	caFile, certFile, keyFile string // client side
	serverCert                tls.Certificate
	otherCAFile               string // a CA that signed nothing here
	clientPool                *x509.CertPool
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	dir := t.TempDir()
	p := &pki{dir: dir}
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	serial := int64(1)
	issue := func(tmpl, parent *x509.Certificate, pub any, signer any) *x509.Certificate {
		serial++
		tmpl.SerialNumber = big.NewInt(serial)
		tmpl.NotBefore = time.Now().Add(-time.Hour)
		tmpl.NotAfter = time.Now().Add(time.Hour)
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	writePEM := func(name, typ string, der []byte) string {
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	caTmpl := func(cn string) *x509.Certificate {
		return &x509.Certificate{Subject: pkix.Name{CommonName: cn}, IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign}
	}
	caKey := newKey()
	ct := caTmpl("test CA")
	p.ca = issue(ct, ct, &caKey.PublicKey, caKey)
	p.caFile = writePEM("ca-cert.pem", "CERTIFICATE", p.ca.Raw)
	p.clientPool = x509.NewCertPool()
	p.clientPool.AddCert(p.ca)

	otherKey := newKey()
	ot := caTmpl("other CA")
	p.otherCAFile = writePEM("other-ca.pem", "CERTIFICATE", issue(ot, ot, &otherKey.PublicKey, otherKey).Raw)

	sk := newKey()
	sc := issue(&x509.Certificate{Subject: pkix.Name{CommonName: "qemu"}, DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: qemuKeyUsage},
		p.ca, &sk.PublicKey, caKey)
	p.serverCert = tls.Certificate{Certificate: [][]byte{sc.Raw}, PrivateKey: sk}
	// QEMU's tls-creds-x509 reads the server side from the same
	// directory (TestConnectRealQEMU).
	writePEM("server-cert.pem", "CERTIFICATE", sc.Raw)
	skDER, err := x509.MarshalPKCS8PrivateKey(sk)
	if err != nil {
		t.Fatal(err)
	}
	writePEM("server-key.pem", "PRIVATE KEY", skDER)

	ck := newKey()
	cc := issue(&x509.Certificate{Subject: pkix.Name{CommonName: "laptop"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: qemuKeyUsage},
		p.ca, &ck.PublicKey, caKey)
	p.certFile = writePEM("client-cert.pem", "CERTIFICATE", cc.Raw)
	kder, err := x509.MarshalPKCS8PrivateKey(ck)
	if err != nil {
		t.Fatal(err)
	}
	p.keyFile = writePEM("client-key.pem", "PRIVATE KEY", kder)
	return p
}

// qemuKeyUsage is the key usage QEMU's tls-creds-x509 wants on server and
// client certificates: Go marks the extension critical, and QEMU then
// refuses a certificate without key encipherment.
const qemuKeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment

// tlsHost listens like QEMU's chardev with tls-creds-x509,verify-peer=on.
func (p *pki) tlsHost(t *testing.T) net.Listener {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{p.serverCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    p.clientPool,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func TestTLSDial(t *testing.T) {
	p := newPKI(t)
	ln := p.tlsHost(t)
	tgt, err := parseTarget("tcp:" + ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	// The host checks the client certificate and reports the peer's CN.
	peer := make(chan string, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tc := c.(*tls.Conn)
			if err := tc.Handshake(); err != nil {
				peer <- "handshake: " + err.Error()
			} else {
				peer <- tc.ConnectionState().PeerCertificates[0].Subject.CommonName
			}
			c.Close()
		}
	}()

	cfg, err := clientTLSConfig(p.caFile, p.certFile, p.keyFile, "", tgt)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ServerName != "127.0.0.1" {
		t.Errorf("ServerName %q, want the target host", cfg.ServerName)
	}
	c, err := dialer(tgt, cfg)(context.Background())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	c.Close()
	if got := <-peer; got != "laptop" {
		t.Errorf("host saw client %q, want laptop", got)
	}

	// A server certificate from another CA is refused.
	bad, err := clientTLSConfig(p.otherCAFile, p.certFile, p.keyFile, "", tgt)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := dialer(tgt, bad)(context.Background()); err == nil {
		c.Close()
		t.Error("dial accepted a server certificate from an unknown CA")
	} else if !strings.Contains(err.Error(), "certificate") {
		t.Errorf("unknown CA: %v", err)
	}
	<-peer
	// A wrong server name is refused too.
	wrong, err := clientTLSConfig(p.caFile, p.certFile, p.keyFile, "qemu.example", tgt)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := dialer(tgt, wrong)(context.Background()); err == nil {
		c.Close()
		t.Error("dial accepted a certificate for another name")
	}
	<-peer
	// Without a client certificate, verify-peer=on refuses us.
	anon, err := clientTLSConfig(p.caFile, "", "", "", tgt)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := dialer(tgt, anon)(context.Background()); err == nil {
		// TLS 1.3: the client learns of the refusal on its first read.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("host accepted a client without certificate")
		}
		c.Close()
	}
	if got := <-peer; !strings.HasPrefix(got, "handshake:") {
		t.Errorf("host without client cert: %q", got)
	}
}

func TestTLSConfigErrors(t *testing.T) {
	p := newPKI(t)
	tcp, _ := parseTarget("tcp:127.0.0.1:1")
	unix, _ := parseTarget("unix:/x")
	for _, tc := range []struct {
		ca, cert, key, name string
		tgt                 target
		want                string
	}{
		{"", p.certFile, p.keyFile, "", tcp, "needs --tls-ca"},
		{p.caFile, p.certFile, "", "", tcp, "together"},
		{p.caFile, "", "", "", unix, "--tls-server-name"},
		{p.certFile + ".missing", "", "", "", tcp, "--tls-ca"},
		{p.keyFile, "", "", "", tcp, "no PEM certificate"},
		{p.caFile, p.certFile, p.caFile, "", tcp, "--tls-cert/--tls-key"},
	} {
		if _, err := clientTLSConfig(tc.ca, tc.cert, tc.key, tc.name, tc.tgt); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("clientTLSConfig(%q, %q, %q, %q): %v, want %q", tc.ca, tc.cert, tc.key, tc.name, err, tc.want)
		}
	}
	if cfg, err := clientTLSConfig("", "", "", "", tcp); cfg != nil || err != nil {
		t.Errorf("no TLS flags: %v, %v", cfg, err)
	}
	if cfg, err := clientTLSConfig(p.caFile, "", "", "qemu", unix); err != nil || cfg.ServerName != "qemu" {
		t.Errorf("unix with server name: %v", err)
	}
}

// countingReader returns (0, nil) forever, as a broken stdin might, and
// counts how often it was asked.
type countingReader struct{ n int }

func (r *countingReader) Read([]byte) (int, error) { r.n++; return 0, nil }

func TestCommandLoopEOF(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	var calls int
	h := func(_ context.Context, line string) string { calls++; return "ok " + line }
	var out bytes.Buffer
	// Closed stdin: the loop ends at once, without handling anything.
	done := make(chan int)
	go func() { done <- commandLoop(context.Background(), strings.NewReader(""), &out, h, log) }()
	select {
	case n := <-done:
		if n != 0 || calls != 0 {
			t.Errorf("closed stdin: %d lines, %d calls", n, calls)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("commandLoop did not return on EOF")
	}
	// A reader that never makes progress: the loop gives up after a
	// bounded number of reads instead of spinning (vscclient's bug,
	// peers.md §1.3).
	cr := &countingReader{}
	start := time.Now()
	commandLoop(context.Background(), cr, &out, h, log)
	if cr.n > 1000 || time.Since(start) > 5*time.Second {
		t.Errorf("no-progress stdin: %d reads in %v", cr.n, time.Since(start))
	}
	// Commands, blank lines and a last line without newline.
	out.Reset()
	n := commandLoop(context.Background(), strings.NewReader("status\n\n  list  \nquit"), &out, h, log)
	if n != 3 || out.String() != "ok status\nok list\nok quit\n" {
		t.Errorf("%d lines, output %q", n, out.String())
	}
}

// syncBuffer is a bytes.Buffer safe for the logger and the test at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var (
	testCardOnce sync.Once
	testCardDir  string
	testCardErr  error
)

// testCard makes one card store for all tests of the package (RSA-1024 to
// keep key generation short).
func testCard(t *testing.T) string {
	t.Helper()
	testCardOnce.Do(func() {
		d, err := os.MkdirTemp("", "vscard-connect-test")
		if err != nil {
			testCardErr = err
			return
		}
		testCardDir = filepath.Join(d, "card")
		_, testCardErr = store.Create(testCardDir, store.Options{PIN: "123456", KeyType: "rsa1024"})
	})
	if testCardErr != nil {
		t.Fatal(testCardErr)
	}
	return testCardDir
}

// shortSocket returns a socket path short enough for sun_path.
func shortSocket(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return filepath.Join(d, "ctl", "c.sock")
}

// TestConnectLifecycle runs "vscard connect" against the fake host: the
// handshake, an APDU, remove and insert through the control socket, and a
// shutdown that removes card and reader before closing.
func TestConnectLifecycle(t *testing.T) {
	dir := testCard(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sock := shortSocket(t)
	trace := filepath.Join(t.TempDir(), "trace.jsonl")

	stdinR, stdinW := io.Pipe()
	defer stdinW.Close()
	var stdout, stderr syncBuffer
	env := &environ{stdin: stdinR, stdout: &stdout, stderr: &stderr}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- runConnect(ctx, env, []string{"--card", dir, "--control", sock, "--reader-name", "Test Reader",
			"--trace", trace, "--log-level", "debug", "tcp:" + ln.Addr().String()})
	}()

	h := fakehost.Accept(t, ln)
	atr := h.Handshake("Test Reader")
	if len(atr) < 2 || atr[0] != 0x3B {
		t.Errorf("ATR % x", atr)
	}
	if got := h.APDU(fakehost.SelectACA); !bytes.Equal(got, []byte{0x61, 0x0D}) {
		t.Errorf("SELECT ACA: % x, want 61 0d", got)
	}

	send := func(cmd string) string {
		t.Helper()
		a, err := ctl.Send(ctx, sock, cmd)
		if err != nil {
			t.Fatalf("ctl %s: %v", cmd, err)
		}
		return a
	}
	if a := send("remove"); a != "card removed\n" {
		t.Errorf("remove: %q", a)
	}
	h.Expect(fakehost.TCardRemove)
	if a := send("remove"); !ctl.IsError(a) {
		t.Errorf("second remove: %q", a)
	}
	if a := send("insert"); a != "card inserted\n" {
		t.Errorf("insert: %q", a)
	}
	if got := h.Expect(fakehost.TATR).Payload; !bytes.Equal(got, atr) {
		t.Errorf("ATR after insert % x, want % x", got, atr)
	}
	if a := send("status"); !strings.Contains(a, "link: connected") || !strings.Contains(a, "card: inserted") || !strings.Contains(a, "apdus: 1") {
		t.Errorf("status:\n%s", a)
	}
	if a := send("list"); !strings.Contains(a, `reader "Test Reader": card inserted`) || !strings.Contains(a, "id, signing, encryption") {
		t.Errorf("list:\n%s", a)
	}
	if a := send("debug warn"); a != "log level: warn\n" {
		t.Errorf("debug: %q", a)
	}
	if a := send("debug loud"); !ctl.IsError(a) {
		t.Errorf("debug loud: %q", a)
	}
	if a := send("frobnicate"); !ctl.IsError(a) {
		t.Errorf("unknown command: %q", a)
	}

	// The same commands work on stdin.
	io.WriteString(stdinW, "debug info\nlist\n")
	waitFor(t, func() bool { return strings.Contains(stdout.String(), "log level: info") })

	// SIGTERM (the signal context of main) = ctx cancelled.
	cancel()
	h.Expect(fakehost.TCardRemove)
	h.Expect(fakehost.TReaderRemove)
	h.ExpectClose()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("runConnect: %v\nlog:\n%s", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("runConnect did not return after cancel")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
	tr, err := os.ReadFile(trace)
	if err != nil || !bytes.Contains(tr, []byte("00A4040007A0000000790300")) {
		t.Errorf("trace file lacks the SELECT APDU (%v):\n%s", err, tr)
	}
	if !strings.Contains(stderr.String(), sock) {
		t.Errorf("log does not name the control socket:\n%s", stderr.String())
	}
}

// TestConnectQuitCommand: "quit" on the control socket ends the process
// cleanly, like SIGTERM.
func TestConnectQuitCommand(t *testing.T) {
	dir := testCard(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sock := shortSocket(t)
	var stdout, stderr syncBuffer
	env := &environ{stdin: strings.NewReader(""), stdout: &stdout, stderr: &stderr}
	done := make(chan error, 1)
	go func() {
		done <- runConnect(context.Background(), env, []string{"--card", dir, "--control", sock, "tcp:" + ln.Addr().String()})
	}()
	h := fakehost.Accept(t, ln)
	h.Handshake("vscard")
	var code int
	var out bytes.Buffer
	code = run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out},
		[]string{"ctl", "--control", sock, "quit"})
	if code != exitOK {
		t.Errorf("ctl quit: exit %d: %s", code, out.String())
	}
	h.Expect(fakehost.TCardRemove)
	h.Expect(fakehost.TReaderRemove)
	h.ExpectClose()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no exit after quit")
	}
	// Nothing listens any more: ctl says so and exits 1.
	out.Reset()
	code = run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out},
		[]string{"ctl", "--control", sock, "status"})
	if code != exitError || !strings.Contains(out.String(), "is vscard connect or vscard reader running?") {
		t.Errorf("ctl with no process: exit %d: %s", code, out.String())
	}
}

func TestConnectUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"connect"}, exitUsage, "exactly one TARGET"},
		{[]string{"connect", "nowhere"}, exitUsage, "want tcp:HOST:PORT"},
		{[]string{"connect", "--log-level", "loud", "tcp:127.0.0.1:1"}, exitUsage, "--log-level"},
		{[]string{"connect", "--nss", "/etc/pki/nssdb", "tcp:127.0.0.1:1"}, exitUsage, "--nss needs --certs"},
		{[]string{"connect", "--pcsc", "Reader 0", "tcp:127.0.0.1:1"}, exitUsage, "need --reader all"},
		{[]string{"connect", "--tls-cert", "x", "tcp:127.0.0.1:1"}, exitUsage, "needs --tls-ca"},
		{[]string{"qemu-args", "--socket", "unix:/tmp/q.sock", "--tls-dir", "/tmp"}, exitUsage, "QEMU does not support TLS on a unix socket"},
		{[]string{"connect", "--card", "/nonexistent/card", "--control", "/nonexistent/x.sock", "tcp:127.0.0.1:1"}, exitError, "/nonexistent/card"},
		{[]string{"ctl"}, exitUsage, "no command"},
	} {
		var out bytes.Buffer
		code := run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out}, tc.args)
		if code != tc.code || !strings.Contains(out.String(), tc.want) {
			t.Errorf("%q: exit %d, output %q; want exit %d and %q", tc.args, code, out.String(), tc.code, tc.want)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCtlDefaultSocket: without --control, connect listens in the default
// directory and ctl finds the one live socket there.
func TestCtlDefaultSocket(t *testing.T) {
	rt, err := os.MkdirTemp("", "rt")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(rt)
	t.Setenv("XDG_RUNTIME_DIR", rt)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stderr syncBuffer
	done := make(chan error, 1)
	go func() {
		done <- runConnect(ctx, &environ{stdin: strings.NewReader(""), stdout: io.Discard, stderr: &stderr},
			[]string{"--no-stdin", "tcp:" + ln.Addr().String()})
	}()
	h := fakehost.Accept(t, ln)
	// No card: the reader is announced and no ATR follows.
	h.Expect(fakehost.TInit)
	h.Expect(fakehost.TReaderRemove)
	h.Expect(fakehost.TReaderAdd)
	var out bytes.Buffer
	code := run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out}, []string{"ctl", "list"})
	if code != exitOK || !strings.Contains(out.String(), `reader "vscard": empty`) {
		t.Errorf("ctl list: exit %d: %s", code, out.String())
	}
	out.Reset()
	code = run(context.Background(), &environ{stdin: strings.NewReader(""), stdout: &out, stderr: &out}, []string{"ctl", "insert"})
	if code != exitError || !strings.Contains(out.String(), "error: no card to insert") {
		t.Errorf("ctl insert without card: exit %d: %s", code, out.String())
	}
	if fi, err := os.Stat(filepath.Join(rt, "vscard")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("default dir: %v %v", fi.Mode(), err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
