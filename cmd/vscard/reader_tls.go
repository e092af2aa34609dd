package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
)

// usbredirTLSConfig reads --usbredir-tls-dir, a directory laid out like
// QEMU's tls-creds-x509 dir (peers.md §7.3), so that one set of files
// made for QEMU serves both ends:
//
//   - Connecting to QEMU's server chardev (tls-creds-x509 endpoint=server),
//     vscard is the TLS client. ca-cert.pem verifies QEMU's certificate
//     against the target's host name; client-cert.pem and client-key.pem,
//     when there, answer QEMU's verify-peer=on (its default).
//   - With --listen (QEMU's chardev is the client, endpoint=client),
//     vscard is the server: server-cert.pem and server-key.pem, and when
//     ca-cert.pem is there every QEMU must present a certificate from it.
//
// QEMU 7.2 has no TLS on unix sockets, so neither has this (the flag
// parser refuses it).
func usbredirTLSConfig(dir string, listen bool, t target) (*tls.Config, error) {
	path := func(name string) string { return filepath.Join(dir, name) }
	has := func(name string) (bool, error) {
		_, err := os.Stat(path(name))
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		return err == nil, err
	}
	fail := func(err error) (*tls.Config, error) {
		return nil, fmt.Errorf("--usbredir-tls-dir %s: %w", dir, err)
	}
	hasCA, err := has("ca-cert.pem")
	if err != nil {
		return fail(err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if listen {
		kp, err := tls.LoadX509KeyPair(path("server-cert.pem"), path("server-key.pem"))
		if err != nil {
			return fail(fmt.Errorf("--listen needs server-cert.pem and server-key.pem, the certificate QEMU's client chardev verifies: %w", err))
		}
		cfg.Certificates = []tls.Certificate{kp}
		if hasCA {
			if cfg.ClientCAs, err = readCertPool(path("ca-cert.pem")); err != nil {
				return fail(err)
			}
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
		}
		return cfg, nil
	}
	if !hasCA {
		return fail(errors.New("no ca-cert.pem: the CA certificate that signed QEMU's server certificate"))
	}
	if cfg.RootCAs, err = readCertPool(path("ca-cert.pem")); err != nil {
		return fail(err)
	}
	cfg.ServerName = t.Host
	hasCert, err := has("client-cert.pem")
	if err != nil {
		return fail(err)
	}
	hasKey, err := has("client-key.pem")
	if err != nil {
		return fail(err)
	}
	if hasCert != hasKey {
		return fail(errors.New("client-cert.pem and client-key.pem go together"))
	}
	if hasCert {
		kp, err := tls.LoadX509KeyPair(path("client-cert.pem"), path("client-key.pem"))
		if err != nil {
			return fail(err)
		}
		cfg.Certificates = []tls.Certificate{kp}
	}
	return cfg, nil
}

// readCertPool reads a PEM file of CA certificates.
func readCertPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate in it", file)
	}
	return pool, nil
}

// serverHandshake runs the server side of a TLS handshake on nc, bounded
// by handshakeTimeout so a silent peer cannot hold what it connected to.
// On failure nc is closed.
func serverHandshake(ctx context.Context, nc net.Conn, cfg *tls.Config) (net.Conn, error) {
	tc := tls.Server(nc, cfg)
	hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}
