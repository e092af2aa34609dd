package main

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// readHello reads the first usbredir header from c and reports whether it
// is a hello (type 0, protocols.md §6.1).
func readHello(t *testing.T, c net.Conn) bool {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		t.Logf("reading the hello: %v", err)
		return false
	}
	return binary.LittleEndian.Uint32(hdr[:]) == 0
}

// tlsReaderApp starts a reader exporting over usbredir to tgt with
// --usbredir-tls-dir dir.
func tlsReaderApp(t *testing.T, tgt target, listen bool, dir string) (*readerApp, *syncBuffer) {
	t.Helper()
	var logBuf syncBuffer
	log := slog.New(slog.NewTextHandler(&logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg := &readerConfig{vid: 0x08E6, pid: 0x4433, usbredir: &tgt, usbredirListen: listen, usbredirTLSDir: dir,
		sources: []sourceSpec{{kind: srcCard, arg: testCard(t)}}}
	app, err := newReaderApp(context.Background(), cfg, log, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(app.close)
	_, stop := startApp(t, app)
	t.Cleanup(stop) // before app.close (cleanups run last first)
	return app, &logBuf
}

// TestReaderUSBRedirTLSDial: connecting to a QEMU-like TLS chardev
// (verify-peer=on), the reader presents client-cert.pem, checks QEMU's
// certificate against ca-cert.pem and says hello over TLS. With the wrong
// CA it says the handshake failed, not that QEMU does not answer.
func TestReaderUSBRedirTLSDial(t *testing.T) {
	p := newPKI(t)
	ln := p.tlsHost(t)
	tgt, err := parseTarget("tcp:" + ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	app, _ := tlsReaderApp(t, tgt, false, p.dir)
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			accepted <- c
		}
	}()
	var c net.Conn
	select {
	case c = <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("the reader did not connect")
	}
	defer c.Close()
	tc := c.(*tls.Conn)
	if err := tc.Handshake(); err != nil {
		t.Fatalf("QEMU side of the handshake: %v", err)
	}
	if cn := tc.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != "laptop" {
		t.Errorf("client certificate CN %q, want laptop (client-cert.pem)", cn)
	}
	if !readHello(t, tc) {
		t.Fatal("no usbredir hello over TLS")
	}
	waitFor(t, func() bool { return app.att.holder() == "usbredir" })

	// A directory whose ca-cert.pem is another CA: QEMU's certificate
	// does not verify.
	bad := t.TempDir()
	for name, from := range map[string]string{"ca-cert.pem": p.otherCAFile, "client-cert.pem": p.certFile, "client-key.pem": p.keyFile} {
		b, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(bad, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ln2 := p.tlsHost(t)
	tgt2, _ := parseTarget("tcp:" + ln2.Addr().String())
	go func() {
		for {
			c, err := ln2.Accept()
			if err != nil {
				return
			}
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	_, logBuf := tlsReaderApp(t, tgt2, false, bad)
	waitFor(t, func() bool { return strings.Contains(logBuf.String(), "TLS handshake failed") })
	if l := logBuf.String(); !strings.Contains(l, "--usbredir-tls-dir") || !strings.Contains(l, "certificate") {
		t.Errorf("the log does not say what to check:\n%s", l)
	}
}

// TestReaderUSBRedirTLSListen: with --listen the reader is the TLS server
// with server-cert.pem; QEMU must present a certificate from ca-cert.pem.
// One without is turned away and the reader waits for the next.
func TestReaderUSBRedirTLSListen(t *testing.T) {
	p := newPKI(t)
	// A free port (the app's listener is made in run's goroutine).
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	tgt := target{Network: "tcp", Addr: addr, Host: "127.0.0.1"}
	app, logBuf := tlsReaderApp(t, tgt, true, p.dir)
	const refused = "TLS handshake on the usbredir socket failed"
	waitFor(t, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close() // a plain TCP peer: its handshake fails too
		}
		return err == nil
	})
	waitFor(t, func() bool { return strings.Count(logBuf.String(), refused) == 1 })
	roots := p.clientPool // the CA, as a pool
	kp, err := tls.LoadX509KeyPair(p.certFile, p.keyFile)
	if err != nil {
		t.Fatal(err)
	}
	// No client certificate: the handshake fails on the reader's side.
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"})
	if err == nil {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = c.Read(make([]byte, 1)) // TLS 1.3 reports the refusal on the first read
		c.Close()
	}
	if err == nil {
		t.Fatal("a QEMU without a client certificate got through")
	}
	waitFor(t, func() bool { return strings.Count(logBuf.String(), refused) == 2 })
	waitFor(t, func() bool { return app.att.holder() == "" })

	c, err = tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", Certificates: []tls.Certificate{kp}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !readHello(t, c) {
		t.Fatal("no usbredir hello over TLS")
	}
	waitFor(t, func() bool { return app.att.holder() == "usbredir" })
}

// TestUSBRedirTLSConfigErrors: a directory that lacks what the direction
// needs is refused at startup, naming the file.
func TestUSBRedirTLSConfigErrors(t *testing.T) {
	p := newPKI(t)
	tgt := target{Network: "tcp", Addr: "127.0.0.1:1", Host: "127.0.0.1"}
	only := func(files ...string) string {
		d := t.TempDir()
		for _, f := range files {
			b, err := os.ReadFile(filepath.Join(p.dir, f))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(d, f), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		return d
	}
	for _, tc := range []struct {
		dir    string
		listen bool
		want   string
	}{
		{only("client-cert.pem", "client-key.pem"), false, "no ca-cert.pem"},
		{only("ca-cert.pem", "client-cert.pem"), false, "go together"},
		{only("ca-cert.pem"), true, "--listen needs server-cert.pem and server-key.pem"},
		{only("server-key.pem", "ca-cert.pem"), true, "server-cert.pem"},
	} {
		if _, err := usbredirTLSConfig(tc.dir, tc.listen, tgt); err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "--usbredir-tls-dir") {
			t.Errorf("dir %s listen %v: %v, want %q", tc.dir, tc.listen, err, tc.want)
		}
	}
	// Without client files, connecting still works against verify-peer=off.
	cfg, err := usbredirTLSConfig(only("ca-cert.pem"), false, tgt)
	if err != nil || len(cfg.Certificates) != 0 || cfg.ServerName != "127.0.0.1" || cfg.RootCAs == nil {
		t.Errorf("CA only: %+v, %v", cfg, err)
	}
	// Listening without ca-cert.pem asks QEMU for no certificate.
	cfg, err = usbredirTLSConfig(only("server-cert.pem", "server-key.pem"), true, tgt)
	if err != nil || cfg.ClientAuth != tls.NoClientCert {
		t.Errorf("server only: %+v, %v", cfg, err)
	}
}
