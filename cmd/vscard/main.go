// Command vscard is the vscard command-line tool: it makes virtual smart
// cards and serves them to PC/SC (through vsmartcard's vpcd) and to QEMU
// guests (through ccid-card-passthru).
//
// Usage:
//
//	vscard card new DIR [flags]        make a CAC card with a CA and three certificates
//	vscard card import DIR [flags]     make a card from PEM, PKCS#12 or an NSS database
//	vscard card show DIR               print a card's certificates, serial and PIN state
//	vscard card export-ca DIR          write the card's CA certificate
//	vscard serve --card DIR --vpcd HOST:PORT [...]
//	vscard connect [--card DIR | --nss DB --certs A,B,C] TARGET
//	vscard reader --usbredir TARGET|--usbip ADDR SOURCE...  a USB CCID reader with cards
//	vscard ctl COMMAND                 control a running vscard connect or reader
//	vscard qemu-args [--socket TARGET] print the matching QEMU options
//	vscard readers [--watch] [--json]  list PC/SC readers, cards and ATRs
//	vscard apdu [--reader R] HEX...    send APDUs to a card through pcscd
//	vscard atr [--json] HEX...         decode an ATR
//
// Run "vscard help COMMAND" for the flags of each command.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// Exit codes. 2 follows the flag package's convention for usage errors.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// errUsage marks an error whose fix is on the command line; main prints the
// command's usage after it and exits 2.
var errUsage = errors.New("usage")

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, env *environ, args []string) error
}

// environ carries the process's streams so commands are testable.
type environ struct {
	stdin          io.Reader
	stdout, stderr io.Writer
}

func commands() []command {
	return []command{
		{"card", "make, import, inspect and export virtual cards (card new|import|show|export-ca)", runCard},
		{"serve", "serve cards to pcscd through vsmartcard's vpcd", runServe},
		{"connect", "connect a card to a QEMU guest's ccid-card-passthru socket", runConnect},
		{"reader", "run vscard's own USB CCID reader, exported over usbredir and/or USB/IP", runReader},
		{"ctl", "send a command (insert, remove, status, ...) to a running connect or reader", runCtl},
		{"qemu-args", "print the QEMU options for 'vscard connect' (or, with --usbredir, 'vscard reader')", runQEMUArgs},
		{"readers", "list PC/SC readers with card state and ATR (--watch for changes)", runReaders},
		{"apdu", "send APDUs to a card in a PC/SC reader and print the responses", runAPDU},
		{"atr", "decode an ATR: interface bytes, protocols, historical bytes", runATR},
		{"version", "print the version", runVersion},
	}
}

var version = "0.1.0-dev"

func runVersion(_ context.Context, env *environ, _ []string) error {
	fmt.Fprintln(env.stdout, "vscard", version)
	return nil
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: vscard COMMAND [flags] [args]")
	fmt.Fprintln(w, "\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'vscard COMMAND -h' for a command's flags.")
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	env := &environ{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr}
	os.Exit(run(ctx, env, os.Args[1:]))
}

func run(ctx context.Context, env *environ, args []string) int {
	if len(args) == 0 {
		usage(env.stderr)
		return exitUsage
	}
	name := args[0]
	if name == "help" || name == "-h" || name == "--help" {
		if len(args) > 1 {
			return run(ctx, env, []string{args[1], "-h"})
		}
		usage(env.stdout)
		return exitOK
	}
	for _, c := range commands() {
		if c.name != name {
			continue
		}
		err := c.run(ctx, env, args[1:])
		switch {
		case err == nil:
			return exitOK
		case errors.Is(err, flag.ErrHelp):
			return exitOK
		case errors.Is(err, errUsage):
			fmt.Fprintf(env.stderr, "vscard %s: %v\n", name, err)
			return exitUsage
		default:
			fmt.Fprintf(env.stderr, "vscard %s: %v\n", name, err)
			return exitError
		}
	}
	fmt.Fprintf(env.stderr, "vscard: unknown command %q\n", name)
	usage(env.stderr)
	return exitUsage
}
