package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"path/filepath"
	"strings"
)

const qemuArgsUsage = `usage: vscard qemu-args [--socket tcp:HOST:PORT|unix:PATH] [--tls-dir DIR] [--id ID] [--usbredir]

Prints the QEMU options that give a guest a USB CCID reader fed by
'vscard connect' through ccid-card-passthru, for the same socket, e.g.

  qemu-system-x86_64 ... $(vscard qemu-args)
  vscard connect --card DIR tcp:127.0.0.1:2001

With --usbredir it prints a usb-redir device instead, for vscard's own
reader ('vscard reader --usbredir'); QEMU then needs no smart card
support of its own:

  qemu-system-x86_64 ... $(vscard qemu-args --usbredir --socket tcp:127.0.0.1:7000)
  vscard reader --usbredir tcp:127.0.0.1:7000 --card DIR

The machine needs a USB controller (most have one; add -device qemu-xhci if
not). With --tls-dir, QEMU's chardev requires TLS with a client certificate
(tls-creds-x509, verify-peer=on); DIR holds ca-cert.pem, server-cert.pem and
server-key.pem as QEMU expects them, and the matching 'vscard connect' (or
'vscard reader') flags are printed on stderr.

flags:
`

// runQEMUArgs implements "vscard qemu-args".
func runQEMUArgs(_ context.Context, env *environ, args []string) error {
	fs := flag.NewFlagSet("qemu-args", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	socket := fs.String("socket", "tcp:127.0.0.1:2001", "chardev socket `TARGET` QEMU listens on: tcp:HOST:PORT or unix:PATH")
	tlsDir := fs.String("tls-dir", "", "QEMU tls-creds-x509 `DIR` (ca-cert.pem, server-cert.pem, server-key.pem)")
	id := fs.String("id", "", "QEMU chardev `ID` (use distinct ones for several cards; default ccid, or redir with --usbredir)")
	redir := fs.Bool("usbredir", false, "print a usb-redir device for 'vscard reader --usbredir' instead of usb-ccid + ccid-card-passthru")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), qemuArgsUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	tgt, err := parseTarget(*socket)
	if err != nil {
		return fmt.Errorf("%w: --socket: %v", errUsage, err)
	}
	if *id == "" {
		*id = map[bool]string{false: "ccid", true: "redir"}[*redir]
	}
	if strings.ContainsAny(*id, ",= ") {
		return fmt.Errorf("%w: --id %q: want a plain QEMU id", errUsage, *id)
	}
	if *tlsDir != "" && tgt.Network == "unix" {
		// QEMU 7.2 refuses it: "'tls_creds' option is incompatible with
		// 'unix' address type" (seen in TestConnectRealQEMU).
		return fmt.Errorf("%w: QEMU does not support TLS on a unix socket; use --socket tcp:HOST:PORT with --tls-dir, or protect the socket file with its permissions", errUsage)
	}
	line, hint := qemuArgs(tgt, *tlsDir, *id, *redir)
	fmt.Fprintln(env.stdout, line)
	if hint != "" {
		fmt.Fprintln(env.stderr, hint)
	}
	return nil
}

// qemuArgs returns the QEMU options for tgt and the matching vscard
// command line as a hint: usb-ccid + ccid-card-passthru for vscard
// connect, or with redir a usb-redir device for vscard reader.
func qemuArgs(tgt target, tlsDir, id string, redir bool) (args, hint string) {
	var parts []string
	chardev := "socket,id=" + id
	if tgt.Network == "unix" {
		chardev += ",path=" + qemuEscape(tgt.Addr)
	} else {
		host, port, _ := net.SplitHostPort(tgt.Addr)
		chardev += ",host=" + qemuEscape(host) + ",port=" + port
	}
	// wait=off: QEMU boots without waiting for vscard, which connects (and
	// reconnects) whenever it runs (peers.md §1.3).
	chardev += ",server=on,wait=off"
	if tgt.Network == "tcp" {
		// QEMU writes each VSCard header and payload separately; nodelay=on
		// saves the ~40 ms Nagle/delayed-ACK stall per APDU on its side
		// (peers.md §4.1). usbredir's packets are no different.
		chardev += ",nodelay=on"
	}
	cmd := "vscard connect --card DIR"
	if redir {
		cmd = "vscard reader --card DIR --usbredir"
	}
	hint = "# then run: " + cmd + " " + tgt.String()
	if tlsDir != "" {
		abs, err := filepath.Abs(tlsDir)
		if err == nil {
			tlsDir = abs
		}
		tlsID := id + "-tls"
		parts = append(parts, "-object", "tls-creds-x509,id="+tlsID+",dir="+qemuEscape(tlsDir)+",endpoint=server,verify-peer=on")
		chardev += ",tls-creds=" + tlsID
		if redir {
			// vscard reader reads QEMU's own layout: ca-cert.pem and
			// client-cert.pem/client-key.pem.
			hint = fmt.Sprintf("# then run: %s %s --usbredir-tls-dir CLIENT-DIR   # CLIENT-DIR: %s, client-cert.pem, client-key.pem",
				cmd, tgt.String(), filepath.Join(tlsDir, "ca-cert.pem"))
		} else {
			extra := ""
			if tgt.Network == "unix" {
				extra = " --tls-server-name NAME"
			}
			hint = fmt.Sprintf("# then run: %s --tls-ca %s --tls-cert CLIENT-CERT.pem --tls-key CLIENT-KEY.pem%s %s",
				cmd, filepath.Join(tlsDir, "ca-cert.pem"), extra, tgt.String())
		}
	}
	if redir {
		parts = append(parts, "-chardev", chardev, "-device", "usb-redir,chardev="+id)
	} else {
		parts = append(parts, "-device", "usb-ccid", "-chardev", chardev, "-device", "ccid-card-passthru,chardev="+id)
	}
	return strings.Join(parts, " "), hint
}

// qemuEscape doubles commas, QEMU's escape inside an option value.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }
