package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/card/cac"
	"github.com/vscard/vscard/card/passthru"
	"github.com/vscard/vscard/ccid"
	"github.com/vscard/vscard/token/nss"
)

// readerApp is a running "vscard reader": one ccid.Reader, its slots'
// card sources and its exports. newReaderApp builds it without touching
// the network, so tests can drive rd directly.
type readerApp struct {
	cfg   *readerConfig
	log   *slog.Logger
	level *slog.LevelVar
	quit  context.CancelFunc

	rd       *ccid.Reader
	slots    []*readerSlot
	prepared bool
	lns      []net.Listener                    // opened by prepare; closed by close
	tasks    []func(ctx context.Context) error // started by run
	att      attachment                        // which export has the reader
	dbs      []*nss.DB                         // closed by close

	traceMu  sync.Mutex
	traceEnc *json.Encoder

	mu        sync.Mutex // guards the export states below
	exps      []*exportState
	apdus     int
	usbipAddr net.Addr // where --usbip listens, once it does
}

// exportState is what status shows about one export.
type exportState struct {
	name  string // "usbredir" or "usbip"
	addr  string
	state string // what it is doing or waiting for
	peer  string
	since time.Time
	count int // peers served
}

// readerSlot is one slot and its card source.
type readerSlot struct {
	idx  int
	spec sourceSpec
	desc string

	// --card and --nss: a fixed card.
	card card.Card

	// --pcsc: the bridge driving this slot.
	bridge *passthru.Bridge

	// --vscard-listen: the client feeding this slot.
	vs *vscardSlot

	// mu serialises insert and remove. inserted is apart from it: ccid's
	// trace hook clears it from inside a command that rd.Remove, called
	// with mu held, waits for.
	mu       sync.Mutex
	inserted atomic.Bool // the reader has a card in this slot (as far as we put it there)
}

// newReaderApp opens every source and makes the reader.
func newReaderApp(ctx context.Context, cfg *readerConfig, log *slog.Logger, traceOut io.Writer) (*readerApp, error) {
	a := &readerApp{cfg: cfg, log: log}
	if a.level == nil {
		a.level = new(slog.LevelVar)
	}
	a.quit = func() {}
	ok := false
	defer func() {
		if !ok {
			a.close()
		}
	}()
	tlsCfg, err := serverTLSConfig(cfg.tlsCA, cfg.tlsCert, cfg.tlsKey)
	if err != nil {
		return nil, err
	}
	for i, spec := range cfg.sources {
		s := &readerSlot{idx: i, spec: spec}
		switch spec.kind {
		case srcCard:
			oc, err := openCardDir(spec.arg, false, log.With("slot", i))
			if err != nil {
				return nil, fmt.Errorf("slot %d: %w", i, err)
			}
			s.card, s.desc = oc.card, oc.desc
		case srcNSS:
			db, tok, err := openNSS(spec.arg, spec.certs, log)
			if err != nil {
				return nil, fmt.Errorf("slot %d: %w", i, err)
			}
			a.dbs = append(a.dbs, db)
			c, err := cac.New(tok, cac.Options{Logger: log.With("slot", i)})
			if err != nil {
				return nil, fmt.Errorf("slot %d: --nss %s: %w", i, spec.arg, err)
			}
			s.card, s.desc = c, describeCard(spec.arg, tok.Credentials())
		case srcPCSC:
			s.bridge = passthru.NewBridge([]passthru.Slot{ccidSlot{a, s}}, &passthru.BridgeOptions{
				Reader: spec.arg,
				// vscard's CCID reader does T=1, so a T=1-only card's ATR
				// goes through unchanged (unlike QEMU 7.2's usb-ccid, which
				// 'vscard connect --pcsc' has to rewrite it for).
				Card:   passthru.Options{Exclusive: cfg.exclusive, AllowLastPINTry: cfg.allowLastPIN, KeepATR: true},
				Logger: log.With("slot", i),
			})
			s.desc = "physical card in PC/SC reader " + pcscWanted(spec.arg)
		case srcVSCard:
			s.vs = &vscardSlot{app: a, slot: s, addr: spec.addr, tls: tlsCfg, log: log.With("slot", i)}
			s.desc = "VSCard client on " + spec.addr.String()
		}
		a.slots = append(a.slots, s)
	}
	opts := &ccid.Options{
		Slots:        len(a.slots),
		VendorID:     cfg.vid,
		ProductID:    cfg.pid,
		Manufacturer: "vscard",
		Product:      "vscard CCID reader",
		Logger:       log,
		Trace:        a.countAPDU,
	}
	if traceOut != nil {
		a.traceEnc = json.NewEncoder(traceOut)
	}
	a.rd = ccid.New(opts)
	for _, s := range a.slots {
		if s.card != nil {
			if err := a.insert(s, s.card); err != nil {
				return nil, fmt.Errorf("slot %d: insert %s: %w", s.idx, s.desc, err)
			}
		}
	}
	ok = true
	return a, nil
}

func pcscWanted(r string) string {
	if r == "" {
		return "(the first reader)"
	}
	return strconv.Quote(r)
}

// close releases what newReaderApp opened.
func (a *readerApp) close() {
	for _, ln := range a.lns {
		ln.Close()
	}
	for _, db := range a.dbs {
		db.Close()
	}
	a.dbs = nil
}

// traceRecord is one line of --trace.
type traceRecord struct {
	Time       time.Time `json:"time"`
	Slot       int       `json:"slot"`
	Event      string    `json:"event"`
	Command    string    `json:"command,omitempty"`
	Redacted   int       `json:"redacted,omitempty"`
	Response   string    `json:"response,omitempty"`
	DurationUS int64     `json:"duration_us"`
	Err        string    `json:"err,omitempty"`
}

// countAPDU is ccid's trace hook: it counts APDUs for status and writes
// --trace lines. ccid has already redacted PINs from ev.Command.
func (a *readerApp) countAPDU(ev ccid.TraceEvent) {
	if ev.Event == ccid.EventAPDU {
		a.mu.Lock()
		a.apdus++
		a.mu.Unlock()
		cancelled := errors.Is(ev.Err, context.Canceled) || errors.Is(ev.Err, context.DeadlineExceeded)
		if ev.Err != nil && !cancelled && ev.Slot >= 0 && ev.Slot < len(a.slots) {
			// ccid takes a card whose Transmit failed out of the slot
			// (it is gone); keep our view in step, so that "insert" and
			// the PC/SC bridge's retry put it back. A command cancelled
			// by an abort or a host reset leaves the card where it is.
			a.slots[ev.Slot].inserted.Store(false)
			a.log.Warn("the slot's card failed; the reader took it out", "slot", ev.Slot, "err", ev.Err)
		}
	}
	if a.traceEnc == nil {
		return
	}
	rec := traceRecord{Time: ev.Time, Slot: ev.Slot, Command: hex.EncodeToString(ev.Command),
		Redacted: ev.Redacted, Response: hex.EncodeToString(ev.Response), DurationUS: ev.Duration.Microseconds()}
	switch ev.Event {
	case ccid.EventAPDU:
		rec.Event = "apdu"
	case ccid.EventPowerOn:
		rec.Event = "power-on"
	case ccid.EventPowerOff:
		rec.Event = "power-off"
	default:
		rec.Event = fmt.Sprint(ev.Event)
	}
	if ev.Err != nil {
		rec.Err = ev.Err.Error()
	}
	a.traceMu.Lock()
	defer a.traceMu.Unlock()
	if err := a.traceEnc.Encode(rec); err != nil {
		a.log.Warn("cannot write the trace; tracing stops", "err", err)
		a.traceEnc = nil
	}
}

// insert puts c into slot s, replacing what was there.
func (a *readerApp) insert(s *readerSlot, c card.Card) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	// A card that is there already is a new card now (a reset ATR from a
	// VSCard client): the host sees it leave and come back. Also when our
	// view says empty: a card whose Transmit failed during a host reset
	// may still sit in the reader.
	_ = a.rd.Remove(s.idx)
	s.inserted.Store(false)
	if err := a.rd.Insert(s.idx, c); err != nil {
		return err
	}
	s.inserted.Store(true)
	return nil
}

// remove takes the card out of slot s; it reports whether one was there.
func (a *readerApp) remove(s *readerSlot) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.inserted.Swap(false) {
		return false, nil
	}
	return true, a.rd.Remove(s.idx)
}

func (s *readerSlot) isInserted() bool { return s.inserted.Load() }

// ccidSlot is a reader slot as a passthru.Slot, for the PC/SC bridge. The
// CCID slot always exists, so a PC/SC reader plugged in or out only
// changes whether a card is in it.
type ccidSlot struct {
	a *readerApp
	s *readerSlot
}

func (c ccidSlot) AddReader() error          { return nil }
func (c ccidSlot) RemoveReader() error       { _, err := c.a.remove(c.s); return err }
func (c ccidSlot) Insert(cd card.Card) error { return c.a.insert(c.s, cd) }
func (c ccidSlot) Remove() error             { _, err := c.a.remove(c.s); return err }

// HoldsCard tells the bridge whether the reader still has the card: ccid
// drops a card whose Transmit failed, and the bridge then opens it again
// if it is still in its PC/SC reader.
func (c ccidSlot) HoldsCard() bool { return c.s.isInserted() }

// prepare opens every listener (VSCard slots, usbredir --listen, USB/IP)
// and registers the exports, so that a listen failure is a startup error
// and "status" shows every export as soon as the control socket answers.
// run calls it if the caller has not.
func (a *readerApp) prepare() error {
	if a.prepared {
		return nil
	}
	a.prepared = true
	for _, s := range a.slots {
		if s.vs != nil {
			ln, err := s.vs.listen()
			if err != nil {
				return err
			}
			a.lns = append(a.lns, ln)
			a.tasks = append(a.tasks, func(ctx context.Context) error { return s.vs.serve(ctx, ln) })
		}
	}
	if t := a.cfg.usbredir; t != nil {
		f, err := a.usbredirExport(*t)
		if err != nil {
			return err
		}
		a.tasks = append(a.tasks, f)
	}
	if a.cfg.usbip != "" {
		f, err := a.usbipExport(a.cfg.usbip, a.cfg.busid)
		if err != nil {
			return err
		}
		a.tasks = append(a.tasks, f)
	}
	for _, s := range a.slots {
		if s.bridge != nil {
			a.tasks = append(a.tasks, s.bridge.Run)
		}
	}
	return nil
}

// run serves the sources and the exports until ctx ends.
func (a *readerApp) run(ctx context.Context) error {
	if err := a.prepare(); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, len(a.tasks))
	for _, f := range a.tasks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(ctx); err != nil && ctx.Err() == nil {
				errc <- err
				cancel()
			}
		}()
	}
	a.log.Info("vscard reader running", "slots", len(a.slots), "vid_pid", fmt.Sprintf("%04x:%04x", a.cfg.vid, a.cfg.pid),
		"sources", a.sourceList())
	<-ctx.Done()
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

func (a *readerApp) sourceList() string {
	var parts []string
	for _, s := range a.slots {
		parts = append(parts, fmt.Sprintf("%d=%s", s.idx, s.spec))
	}
	return strings.Join(parts, " ")
}

// export registers an export for status.
func (a *readerApp) export(name, addr, state string) *exportState {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := &exportState{name: name, addr: addr, state: state}
	a.exps = append(a.exps, e)
	return e
}

func (a *readerApp) setExport(e *exportState, state, peer string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e.state, e.peer = state, peer
	if peer != "" {
		e.since = time.Now()
		e.count++
	}
}

// handle runs one command line and returns the answer.
func (a *readerApp) handle(ctx context.Context, line string) string {
	f := strings.Fields(line)
	if len(f) == 0 {
		return ""
	}
	cmd, args := f[0], f[1:]
	switch cmd {
	case "insert", "remove":
		if len(args) > 1 {
			return fmt.Sprintf("error: %s takes at most 1 argument (a slot number)", cmd)
		}
		slots := a.slots
		if len(args) == 1 {
			n, err := strconv.Atoi(args[0])
			if err != nil || n < 0 || n >= len(a.slots) {
				return fmt.Sprintf("error: no slot %q: slots are 0 to %d", args[0], len(a.slots)-1)
			}
			slots = a.slots[n : n+1]
		}
		var out, fails []string
		for _, s := range slots {
			var msg string
			var err error
			if cmd == "insert" {
				msg, err = a.insertCmd(ctx, s)
			} else {
				msg, err = a.removeCmd(s)
			}
			if err != nil {
				fails = append(fails, fmt.Sprintf("slot %d: %v", s.idx, err))
				out = append(out, fmt.Sprintf("slot %d: error: %v", s.idx, err))
				continue
			}
			out = append(out, fmt.Sprintf("slot %d: %s", s.idx, msg))
		}
		if len(fails) == len(slots) {
			// One line that starts with "error:", so that 'vscard ctl'
			// exits non-zero.
			return "error: " + strings.Join(fails, "; ")
		}
		return strings.Join(out, "\n")
	case "list":
		return a.list()
	case "status":
		return a.status()
	case "debug":
		if len(args) != 1 {
			return "error: debug takes 1 argument (debug, info, warn or error)"
		}
		var l slog.Level
		if err := l.UnmarshalText([]byte(args[0])); err != nil {
			return fmt.Sprintf("error: unknown log level %q: want debug, info, warn or error", args[0])
		}
		a.level.Set(l)
		return "log level: " + strings.ToLower(l.String())
	case "quit", "exit":
		if len(args) > 0 {
			return "error: quit takes no arguments"
		}
		a.quit()
		return "detaching the reader, then exiting"
	case "help", "?":
		return readerCommands
	}
	return fmt.Sprintf("error: unknown command %q; try help", cmd)
}

func (a *readerApp) insertCmd(ctx context.Context, s *readerSlot) (string, error) {
	switch {
	case s.card != nil:
		if s.isInserted() {
			return "", errors.New("the card is already inserted")
		}
		if err := a.insert(s, s.card); err != nil {
			return "", err
		}
		return "card inserted", nil
	case s.bridge != nil:
		if err := s.bridge.Reinsert(ctx); err != nil {
			return "", err
		}
		return "card inserted", nil
	case s.vs != nil:
		return s.vs.reinsert()
	}
	return "", errors.New("no card source")
}

func (a *readerApp) removeCmd(s *readerSlot) (string, error) {
	switch {
	case s.bridge != nil:
		if err := s.bridge.Eject(); err != nil {
			return "", err
		}
		return "card removed (the physical card stays in its reader; 'insert' forwards it again)", nil
	case s.vs != nil:
		return s.vs.hold()
	}
	had, err := a.remove(s)
	if err != nil {
		return "", err
	}
	if !had {
		return "", errors.New("no card inserted")
	}
	return "card removed", nil
}

// list shows each slot, its source and its card.
func (a *readerApp) list() string {
	var b strings.Builder
	for _, s := range a.slots {
		state := "empty"
		if s.isInserted() {
			state = "card inserted"
		}
		fmt.Fprintf(&b, "slot %d: %s: %s\n", s.idx, state, s.desc)
		switch {
		case s.bridge != nil:
			st := s.bridge.Status()
			if len(st.Slots) == 1 {
				ss := st.Slots[0]
				switch {
				case !st.PCSCUp:
					fmt.Fprintf(&b, "  pcscd: not reachable (%s); waiting for it\n", orUnknown(st.PCSCErr))
				case ss.Reader == "":
					fmt.Fprintf(&b, "  waiting for %s\n", wantedReader(st.Wanted))
				case ss.Held:
					fmt.Fprintf(&b, "  reader %q: card removed by 'remove' (ATR %X)\n", ss.Reader, ss.ATR)
				case ss.Card:
					fmt.Fprintf(&b, "  reader %q: card present, ATR %X\n", ss.Reader, ss.ATR)
				default:
					fmt.Fprintf(&b, "  reader %q: no card\n", ss.Reader)
				}
			}
		case s.vs != nil:
			fmt.Fprintf(&b, "  %s\n", s.vs.describe())
		}
	}
	return strings.TrimRight(b.String(), "\n")
}

func (a *readerApp) status() string {
	var b strings.Builder
	a.mu.Lock()
	fmt.Fprintf(&b, "reader: %04x:%04x, %d slot(s)\n", a.cfg.vid, a.cfg.pid, len(a.slots))
	if who := a.att.holder(); who != "" {
		fmt.Fprintf(&b, "attached: over %s\n", who)
	} else {
		fmt.Fprintf(&b, "attached: no\n")
	}
	for _, e := range a.exps {
		fmt.Fprintf(&b, "%s %s: %s", e.name, e.addr, e.state)
		if e.peer != "" {
			fmt.Fprintf(&b, " (peer %s since %s)", e.peer, e.since.Format(time.RFC3339))
		}
		fmt.Fprintf(&b, ", %d peer(s) served\n", e.count)
	}
	fmt.Fprintf(&b, "apdus: %d\n", a.apdus)
	a.mu.Unlock()
	fmt.Fprintf(&b, "%s\n", a.list())
	fmt.Fprintf(&b, "log level: %s", strings.ToLower(a.level.Level().String()))
	return b.String()
}

// attachment is the rule that the reader, one USB device, is attached to
// one importer at a time: QEMU over usbredir or a USB/IP client. The
// other export refuses or waits until it is released. Claims by the same
// export are counted: two USB/IP connections may both ask to import (the
// server answers the second DEV_BUSY), and the first must keep the reader
// when the second closes.
type attachment struct {
	mu  sync.Mutex
	who string
	n   int
}

// acquire claims the reader for who; it fails, naming the holder, when
// another export has it.
func (t *attachment) acquire(who string) (bool, string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n > 0 && t.who != who {
		return false, t.who
	}
	t.who = who
	t.n++
	return true, ""
}

// release gives back one claim of who.
func (t *attachment) release(who string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n > 0 && t.who == who {
		t.n--
		if t.n == 0 {
			t.who = ""
		}
	}
}

func (t *attachment) holder() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.who
}

// listenTarget listens on a tcp or unix target; a stale unix socket file
// left by a killed run is replaced.
func listenTarget(t target) (net.Listener, error) {
	if t.Network == "unix" {
		removeStaleSocket(t.Addr)
	}
	ln, err := net.Listen(t.Network, t.Addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", t, err)
	}
	return ln, nil
}
