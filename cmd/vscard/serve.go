package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/token/store"
	"github.com/vscard/vscard/vpcd"
)

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

const serveUsage = `usage: vscard serve --card DIR [--vpcd HOST:PORT] [--card DIR [--vpcd HOST:PORT]]... [flags]

Serves each card to pcscd through vsmartcard's vpcd driver (Debian package
vsmartcard-vpcd). The n-th --card goes to the n-th --vpcd; without --vpcd,
card n goes to 127.0.0.1:35963+n, which pcscd shows as "Virtual PCD 00 0n".
vscard keeps reconnecting while pcscd is down or restarting. SIGINT or
SIGTERM removes the cards and exits 0.

flags:
`

// runServe implements "vscard serve".
func runServe(ctx context.Context, env *environ, args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	var cards, addrs listFlag
	fs.Var(&cards, "card", "card directory made by 'vscard card new' (repeatable)")
	fs.Var(&addrs, "vpcd", "vpcd address HOST:PORT for the card given at the same position (repeatable; default 127.0.0.1:35963+n)")
	strict := fs.Bool("strict", false, "reproduce libcacard 2.8 byte for byte, quirks included (no PIN counter, no GET CHALLENGE, shared serial)")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn or error")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	tracePath := fs.String("trace", "", "append every APDU with timestamps to `FILE` as JSON lines (PINs redacted)")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), serveUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q; give cards with --card DIR", errUsage, fs.Arg(0))
	}
	if len(cards) == 0 {
		return fmt.Errorf("%w: no --card given; make one with 'vscard card new DIR'", errUsage)
	}
	if len(addrs) > len(cards) {
		return fmt.Errorf("%w: %d --vpcd addresses for %d cards; give one --card per --vpcd", errUsage, len(addrs), len(cards))
	}
	for i := len(addrs); i < len(cards); i++ {
		addrs = append(addrs, net.JoinHostPort("127.0.0.1", strconv.Itoa(vpcd.DefaultPort+i)))
	}
	log, err := newLogger(env.stderr, *logLevel, *logFormat)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}

	var trace func(vpcd.TraceEvent)
	if *tracePath != "" {
		f, err := os.OpenFile(*tracePath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("open trace file: %w", err)
		}
		defer f.Close()
		trace = vpcd.JSONTrace(f)
	}

	// Open every card before serving any, so a typo in the second
	// directory does not leave the first card half-served.
	type slot struct {
		dir, addr string
		card      card.Card
	}
	slots := make([]slot, len(cards))
	for i, dir := range cards {
		oc, err := openCardDir(dir, *strict, log.With("card", dir))
		if err != nil {
			return err
		}
		slots[i] = slot{dir: dir, addr: addrs[i], card: oc.card}
		mode := "default"
		if *strict && oc.typ == store.TypeCAC {
			mode = "strict"
		}
		if oc.typ == store.TypePIV {
			log.Info("serving card", "card", dir, "vpcd", addrs[i], "type", "piv", "keys", oc.n)
		} else {
			log.Info("serving card", "card", dir, "vpcd", addrs[i], "certificates", oc.n, "mode", mode)
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(slots))
	for i, s := range slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			opts := &vpcd.Options{Logger: log.With("card", s.dir), Trace: trace}
			if err := vpcd.Serve(ctx, s.addr, s.card, opts); err != nil {
				errs[i] = fmt.Errorf("card %s on %s: %w", s.dir, s.addr, err)
				cancel() // one failed card stops the others: the user must look
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("all cards removed; exiting")
	return nil
}

// newLogger builds the slog logger the long-running commands use.
func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}
