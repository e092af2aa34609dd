package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/vscard/vscard/card/passthru"
	"github.com/vscard/vscard/internal/ctl"
	"github.com/vscard/vscard/pcsc"
	"github.com/vscard/vscard/vscard"
)

// pcscRun is what "vscard connect --pcsc" needs from runConnect.
type pcscRun struct {
	targets      []target
	tlsCfgs      []*tls.Config
	reader       string // --reader: "" (first), "all", or a name
	exclusive    bool
	allowLastPIN bool
	keepATR      bool
	readerName   string // --reader-name (ReaderAdd payload)
	noWorkaround bool
	noStdin      bool
	log          *slog.Logger
	level        *slog.LevelVar
	trace        func(vscard.TraceEvent)
	ctl          net.Listener
	ctlPath      string
	cancel       context.CancelFunc
}

// clientSlot is a vscard.Client as a passthru.Slot that can say whether it
// still holds its card (it drops one whose Transmit failed).
type clientSlot struct{ *vscard.Client }

func (s clientSlot) HoldsCard() bool { return s.Status().CardInserted }

// runConnectPCSC forwards PC/SC readers to the targets: one vscard.Client
// per target, started without a reader, driven by a passthru.Bridge.
func runConnectPCSC(ctx context.Context, env *environ, r *pcscRun) error {
	log := r.log
	if r.reader != "" && r.reader != "all" {
		if err := checkReaderName(ctx, r.reader, log); err != nil {
			r.ctl.Close()
			return err
		}
	}
	var clients []*vscard.Client
	var slots []passthru.Slot
	for i, tgt := range r.targets {
		l := log
		if len(r.targets) > 1 {
			l = log.With("target", tgt.String())
		}
		cl := vscard.NewClient(dialer(tgt, r.tlsCfgs[i]), nil, &vscard.ClientOptions{
			ReaderName: r.readerName,
			Logger:     l,
			Trace:      r.trace,
			// A physical card can answer with 54 bytes too (peers.md
			// appendix "QEMU 7.2 usb-ccid loses sync on a 54-byte
			// response").
			QEMU54Workaround: !r.noWorkaround,
			NoReader:         true,
		})
		clients = append(clients, cl)
		slots = append(slots, clientSlot{cl})
	}
	bridge := passthru.NewBridge(slots, &passthru.BridgeOptions{
		Reader: r.reader,
		Card:   passthru.Options{Exclusive: r.exclusive, AllowLastPINTry: r.allowLastPIN, KeepATR: r.keepATR},
		Logger: log,
	})
	if r.allowLastPIN {
		log.Warn("--allow-last-pin-try: the guest may use the card's last PIN try; a wrong PIN then blocks the card")
	}
	s := &pcscSession{clients: clients, bridge: bridge, targets: r.targets, level: r.level, quit: r.cancel,
		exclusive: r.exclusive, ctx: ctx}

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := ctl.Serve(ctx, r.ctl, s.handle, log); err != nil {
			log.Error("control socket failed", "err", err)
		}
	}()
	log.Info("control socket ready", "path", r.ctlPath, "try", "vscard ctl --control "+r.ctlPath+" status")
	if !r.noStdin {
		go commandLoop(ctx, env.stdin, env.stdout, s.handle, log)
	}
	names := make([]string, len(r.targets))
	for i, t := range r.targets {
		names[i] = t.String()
	}
	log.Info("forwarding PC/SC cards to QEMU's ccid-card-passthru", "targets", strings.Join(names, " "),
		"reader", r.reader, "pcscd", pcsc.SocketPath(), "exclusive", r.exclusive,
		"last_pin_try_guard", !r.allowLastPIN, "qemu54_workaround", !r.noWorkaround)

	for _, cl := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl.Run(ctx)
		}()
	}
	err := bridge.Run(ctx)
	r.cancel()
	wg.Wait()
	if err != nil {
		return err
	}
	log.Info("stopped; exiting")
	return nil
}

// checkReaderName refuses, at start, a --reader that matches several of
// pcscd's readers, and says so when it matches none yet (then it waits for
// one to be plugged in). Without pcscd there is nothing to check.
func checkReaderName(ctx context.Context, want string, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	pc, err := pcsc.EstablishContext(ctx, nil)
	if err != nil {
		return nil // the bridge says that pcscd is not there
	}
	defer pc.Release()
	readers, err := pc.ListReaders()
	if err != nil && !errors.Is(err, pcsc.ErrNoReadersAvailable) {
		return nil
	}
	_, ok, err := passthru.MatchReader(want, readers)
	switch {
	case err != nil:
		return fmt.Errorf("%w: --reader: %v; give more of the name", errUsage, err)
	case !ok:
		log.Info("no reader matches --reader yet; waiting for it to be plugged in", "reader", want, "readers", readers)
	}
	return nil
}

// pcscSession answers the interactive commands of "vscard connect --pcsc".
type pcscSession struct {
	ctx       context.Context
	clients   []*vscard.Client
	bridge    *passthru.Bridge
	targets   []target
	level     *slog.LevelVar
	quit      context.CancelFunc
	exclusive bool
}

const pcscCommands = `commands:
  insert        forward the card again after 'remove'
  remove        take the card out of the guest (the physical card is left alone)
  list          show the PC/SC readers, the card in each and where it goes
  status        show pcscd, the links and counters
  debug LEVEL   set the log level: debug, info, warn or error
  quit          remove cards and readers from the guest, then exit`

func (s *pcscSession) handle(_ context.Context, line string) string {
	f := strings.Fields(line)
	if len(f) == 0 {
		return ""
	}
	cmd, args := f[0], f[1:]
	if len(args) > 0 && cmd != "debug" {
		return fmt.Sprintf("error: %s takes no arguments", cmd)
	}
	switch cmd {
	case "insert":
		if err := s.bridge.Reinsert(s.ctx); err != nil {
			return "error: " + err.Error()
		}
		return "card inserted"
	case "remove":
		if err := s.bridge.Eject(); err != nil {
			return "error: " + err.Error()
		}
		return "card removed (the physical card stays in its reader; 'insert' forwards it again)"
	case "list":
		return s.list()
	case "status":
		return s.status()
	case "debug":
		if len(args) != 1 {
			return "error: debug takes 1 argument(s) (debug, info, warn or error)"
		}
		var l slog.Level
		if err := l.UnmarshalText([]byte(args[0])); err != nil {
			return fmt.Sprintf("error: unknown log level %q: want debug, info, warn or error", args[0])
		}
		s.level.Set(l)
		return "log level: " + strings.ToLower(l.String())
	case "quit", "exit":
		s.quit()
		return "removing cards and readers, then exiting"
	case "help", "?":
		return pcscCommands
	}
	return fmt.Sprintf("error: unknown command %q; try help", cmd)
}

// list shows each target's PC/SC reader and card, then readers not
// forwarded.
func (s *pcscSession) list() string {
	st := s.bridge.Status()
	var b strings.Builder
	if !st.PCSCUp {
		fmt.Fprintf(&b, "pcscd: not reachable (%s); waiting for it\n", orUnknown(st.PCSCErr))
	}
	for i, ss := range st.Slots {
		fmt.Fprintf(&b, "%s: ", s.targets[i])
		switch {
		case ss.Reader == "":
			fmt.Fprintf(&b, "no PC/SC reader (waiting for %s)\n", wantedReader(st.Wanted))
		case ss.Held:
			fmt.Fprintf(&b, "reader %q: card removed by 'remove' (ATR %X)\n", ss.Reader, ss.ATR)
		case ss.Card:
			fmt.Fprintf(&b, "reader %q: card present, ATR %X\n", ss.Reader, ss.ATR)
		default:
			fmt.Fprintf(&b, "reader %q: no card\n", ss.Reader)
		}
	}
	for _, r := range st.Unmapped {
		fmt.Fprintf(&b, "not forwarded: reader %q\n", r)
	}
	return strings.TrimRight(b.String(), "\n")
}

func wantedReader(w string) string {
	switch w {
	case "":
		return "a reader"
	case "all":
		return "another reader"
	}
	return fmt.Sprintf("a reader matching %q", w)
}

func orUnknown(s string) string {
	if s == "" {
		return "not connected yet"
	}
	return s
}

func (s *pcscSession) status() string {
	st := s.bridge.Status()
	var b strings.Builder
	if st.PCSCUp {
		fmt.Fprintf(&b, "pcscd: connected (%s), %d reader(s)\n", pcsc.SocketPath(), len(st.Readers))
	} else {
		fmt.Fprintf(&b, "pcscd: not reachable (%s): %s\n", pcsc.SocketPath(), orUnknown(st.PCSCErr))
	}
	mode := "shared (transactions)"
	if s.exclusive {
		mode = "exclusive"
	}
	fmt.Fprintf(&b, "mode: %s\n", mode)
	for i, cl := range s.clients {
		cs := cl.Status()
		ss := st.Slots[i]
		fmt.Fprintf(&b, "target: %s\n", s.targets[i])
		if cs.Connected {
			fmt.Fprintf(&b, "  link: connected to %s since %s\n", cs.Addr, cs.Since.Format(time.RFC3339))
		} else {
			fmt.Fprintf(&b, "  link: not connected (waiting for QEMU)\n")
		}
		reader := "none"
		if ss.Reader != "" {
			reader = fmt.Sprintf("%q", ss.Reader)
		}
		fmt.Fprintf(&b, "  pcsc reader: %s\n", reader)
		fmt.Fprintf(&b, "  card: %s\n", map[bool]string{true: "inserted", false: "not inserted"}[cs.CardInserted])
		fmt.Fprintf(&b, "  apdus: %d\n  connects: %d\n", cs.APDUs, cs.Connects)
		if cs.LastError != "" {
			fmt.Fprintf(&b, "  last error: %s\n", cs.LastError)
		}
		if ss.LastErr != "" {
			fmt.Fprintf(&b, "  last card error: %s\n", ss.LastErr)
		}
	}
	fmt.Fprintf(&b, "log level: %s", strings.ToLower(s.level.Level().String()))
	return b.String()
}
