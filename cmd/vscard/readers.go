package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vscard/vscard/pcsc"
)

const readersUsage = `usage: vscard readers [--watch] [--json]

Lists the PC/SC readers pcscd knows, in pcscd's order (the index is what
'vscard apdu --reader N' and 'opensc-tool -r N' take), with the state of
the card in each and its ATR ('vscard atr ATR' decodes it). Card states:
  empty      no card in the reader
  present    a card, powered or not, no program holds it
  in use     a program holds the card in shared mode
  exclusive  a program holds the card exclusively
  mute       a card that did not answer the reset
  unavailable the reader is not usable (driver or device trouble)

--watch then keeps printing changes, one line each, until SIGINT or SIGTERM
(exit 0): reader added/removed, card inserted (with its ATR)/removed, and
state changes. It waits on pcscd's status-change call with the PnP
pseudo-reader, and when pcscd goes away it retries with backoff and
carries on once pcscd is back.

vscard talks to pcscd's socket $PCSCLITE_CSOCK_NAME, default
/run/pcscd/pcscd.comm.

flags:
`

// runReaders implements "vscard readers".
func runReaders(ctx context.Context, env *environ, args []string) error {
	fs := flag.NewFlagSet("readers", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	watch := fs.Bool("watch", false, "keep printing reader and card changes until interrupted")
	asJSON := fs.Bool("json", false, "print JSON: an array of readers; with --watch one event object per line")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), readersUsage)
		fs.PrintDefaults()
	}
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
	}
	c, err := establish(ctx)
	if err != nil {
		return err
	}
	infos, err := snapshot(c)
	if err != nil {
		c.Release()
		return err
	}
	if !*watch {
		defer c.Release()
		if *asJSON {
			return writeReadersJSON(env.stdout, infos)
		}
		printReaders(env.stdout, infos)
		return nil
	}
	w := &watcher{env: env, json: *asJSON, c: c, prev: infos}
	defer func() {
		if w.c != nil {
			w.c.Release()
		}
	}()
	return w.run(ctx)
}

// establish connects to pcscd, turning "nobody listens" into advice.
func establish(ctx context.Context) (*pcsc.Context, error) {
	c, err := pcsc.EstablishContext(ctx, nil)
	if err != nil {
		return nil, pcscdAdvice(err)
	}
	return c, nil
}

func pcscdAdvice(err error) error {
	if errors.Is(err, pcsc.ErrNoService) {
		return fmt.Errorf("%w\n  pcscd is not running or not reachable at %s: start it (systemctl start pcscd.socket), "+
			"or point PCSCLITE_CSOCK_NAME at the socket of the pcscd to use", err, pcsc.SocketPath())
	}
	return err
}

// snapshot is pcscd's reader list; no readers is an empty list, not an error.
func snapshot(c *pcsc.Context) ([]pcsc.ReaderInfo, error) {
	infos, err := c.Readers()
	if errors.Is(err, pcsc.ErrNoReadersAvailable) {
		return nil, nil
	}
	return infos, err
}

// cardState names a reader's state as the usage text lists them. The most
// specific flag wins: a mute card is also present, an exclusive one in use.
func cardState(s pcsc.State) string {
	switch {
	case s&(pcsc.StateUnavailable|pcsc.StateUnknown) != 0:
		return "unavailable"
	case s&pcsc.StateMute != 0:
		return "mute"
	case s&pcsc.StateExclusive != 0:
		return "exclusive"
	case s&pcsc.StateInUse != 0:
		return "in use"
	case s&pcsc.StatePresent != 0:
		return "present"
	case s&pcsc.StateEmpty != 0:
		return "empty"
	}
	return "unknown"
}

func hasCard(s pcsc.State) bool { return s&pcsc.StatePresent != 0 }

func printReaders(w io.Writer, infos []pcsc.ReaderInfo) {
	if len(infos) == 0 {
		fmt.Fprintln(w, "No PC/SC readers found.")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "#\tCard\tReader\tATR")
	for i, ri := range infos {
		atr := ""
		if hasCard(ri.State) && len(ri.ATR) > 0 {
			atr = fmt.Sprintf("% X", ri.ATR)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", i, cardState(ri.State), ri.Name, atr)
	}
	tw.Flush()
}

type readerJSON struct {
	Index int       `json:"index"`
	Name  string    `json:"name"`
	State string    `json:"state"`
	Flags string    `json:"flags"`
	Card  bool      `json:"card"`
	ATR   hexString `json:"atr,omitempty"`
}

func toReaderJSON(i int, ri pcsc.ReaderInfo) readerJSON {
	r := readerJSON{Index: i, Name: ri.Name, State: cardState(ri.State), Flags: ri.State.String(), Card: hasCard(ri.State)}
	if r.Card {
		r.ATR = ri.ATR
	}
	return r
}

func writeReadersJSON(w io.Writer, infos []pcsc.ReaderInfo) error {
	out := make([]readerJSON, 0, len(infos))
	for i, ri := range infos {
		out = append(out, toReaderJSON(i, ri))
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

// event is one change --watch reports.
type event struct {
	Time   string    `json:"time"`
	Event  string    `json:"event"` // reader_added, reader_removed, card_inserted, card_removed, state, pcscd_lost, pcscd_back
	Reader string    `json:"reader,omitempty"`
	State  string    `json:"state,omitempty"`
	ATR    hexString `json:"atr,omitempty"`
	Detail string    `json:"detail,omitempty"`
}

// diffReaders lists what changed between two snapshots, readers in the new
// snapshot's order (removed ones first). A card whose event counter moved
// while it stayed present was removed and inserted in between.
func diffReaders(prev, cur []pcsc.ReaderInfo) []event {
	var out []event
	old := make(map[string]pcsc.ReaderInfo, len(prev))
	for _, ri := range prev {
		old[ri.Name] = ri
	}
	now := make(map[string]bool, len(cur))
	for _, ri := range cur {
		now[ri.Name] = true
	}
	for _, ri := range prev {
		if !now[ri.Name] {
			if hasCard(ri.State) {
				out = append(out, event{Event: "card_removed", Reader: ri.Name})
			}
			out = append(out, event{Event: "reader_removed", Reader: ri.Name})
		}
	}
	for _, ri := range cur {
		o, seen := old[ri.Name]
		if !seen {
			out = append(out, event{Event: "reader_added", Reader: ri.Name, State: cardState(ri.State)})
			if hasCard(ri.State) {
				out = append(out, event{Event: "card_inserted", Reader: ri.Name, State: cardState(ri.State), ATR: ri.ATR})
			}
			continue
		}
		was, is := hasCard(o.State), hasCard(ri.State)
		switch {
		case was && !is:
			out = append(out, event{Event: "card_removed", Reader: ri.Name, State: cardState(ri.State)})
		case !was && is:
			out = append(out, event{Event: "card_inserted", Reader: ri.Name, State: cardState(ri.State), ATR: ri.ATR})
		case was && is && (o.EventCounter != ri.EventCounter || !bytes.Equal(o.ATR, ri.ATR)):
			out = append(out,
				event{Event: "card_removed", Reader: ri.Name},
				event{Event: "card_inserted", Reader: ri.Name, State: cardState(ri.State), ATR: ri.ATR})
		case cardState(o.State) != cardState(ri.State):
			out = append(out, event{Event: "state", Reader: ri.Name, State: cardState(ri.State),
				Detail: cardState(o.State) + " -> " + cardState(ri.State)})
		}
	}
	return out
}

// watcher is the state of "vscard readers --watch".
type watcher struct {
	env  *environ
	json bool
	c    *pcsc.Context // nil while pcscd is away
	prev []pcsc.ReaderInfo
	// cur holds the states last reported by GetStatusChange, event
	// counters included, so the next call blocks until something new.
	cur map[string]pcsc.State
	pnp pcsc.State
	now func() time.Time
	// backoff is the wait before the next reconnection attempt. It grows
	// with each failure and is reset only by a status-change call that
	// worked, so an error pcscd keeps returning cannot make us spin.
	backoff time.Duration
}

// Reconnection backoff while pcscd is away: quick at first (a restart
// takes a fraction of a second), then at most every 5 s.
const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 5 * time.Second
)

// maxWatched is how many readers one GetStatusChange call may watch
// besides the PnP pseudo-reader: PCSCLITE_MAX_READERS_CONTEXTS (16) in all.
const maxWatched = 15

func (w *watcher) run(ctx context.Context) error {
	if w.now == nil {
		w.now = time.Now
	}
	w.cur = make(map[string]pcsc.State)
	if w.json {
		if err := writeEventsJSON(w.env.stdout, w.initial()); err != nil {
			return err
		}
	} else {
		printReaders(w.env.stdout, w.prev)
	}
	w.waiting()
	for {
		if ctx.Err() != nil {
			return nil
		}
		if w.c == nil {
			if !w.reconnect(ctx) {
				return nil
			}
			continue
		}
		states := make([]pcsc.ReaderState, 0, len(w.prev)+1)
		for i, ri := range w.prev {
			if i >= maxWatched {
				// libpcsclite's limit on one call; the snapshot after any
				// wake-up still reports changes in the readers past it.
				break
			}
			cs, ok := w.cur[ri.Name]
			if !ok {
				cs = ri.State
			}
			states = append(states, pcsc.ReaderState{Reader: ri.Name, CurrentState: cs})
		}
		states = append(states, pcsc.ReaderState{Reader: pcsc.PnPNotification, CurrentState: w.pnp})
		err := w.c.GetStatusChange(ctx, -1, states)
		if ctx.Err() != nil {
			return nil // SIGINT/SIGTERM: a normal end
		}
		switch {
		case err == nil:
			w.backoff = 0
			for _, s := range states {
				if s.Reader == pcsc.PnPNotification {
					w.pnp = s.EventState &^ pcsc.StateChanged
				} else {
					w.cur[s.Reader] = s.EventState &^ pcsc.StateChanged
				}
			}
		case errors.Is(err, pcsc.ErrUnknownReader):
			// A reader went between our snapshot and the call: the
			// snapshot below shows it gone.
		case errors.Is(err, pcsc.ErrCancelled) || errors.Is(err, pcsc.ErrTimeout):
		default:
			w.lost(err)
			continue
		}
		infos, err := snapshot(w.c)
		if err != nil {
			w.lost(err)
			continue
		}
		if err := w.report(diffReaders(w.prev, infos)); err != nil {
			return err
		}
		changedSet := len(infos) != len(w.prev)
		w.forget(infos)
		w.prev = infos
		if changedSet {
			w.waiting()
		}
	}
}

// forget drops remembered states of readers that are gone.
func (w *watcher) forget(infos []pcsc.ReaderInfo) {
	keep := make(map[string]bool, len(infos))
	for _, ri := range infos {
		keep[ri.Name] = true
	}
	for name := range w.cur {
		if !keep[name] {
			delete(w.cur, name)
		}
	}
}

// initial is the starting list as events, for JSON watchers.
func (w *watcher) initial() []event {
	var evs []event
	for _, ri := range w.prev {
		e := event{Event: "reader", Reader: ri.Name, State: cardState(ri.State)}
		if hasCard(ri.State) {
			e.ATR = ri.ATR
		}
		evs = append(evs, e)
	}
	return w.stamp(evs)
}

func (w *watcher) stamp(evs []event) []event {
	t := w.now().UTC().Format(time.RFC3339Nano)
	for i := range evs {
		evs[i].Time = t
	}
	return evs
}

// waiting says what --watch waits for, on stderr so stdout stays the
// event stream.
func (w *watcher) waiting() {
	names := make([]string, len(w.prev))
	for i, ri := range w.prev {
		names[i] = ri.Name
	}
	what := "no readers yet"
	if len(names) > 0 {
		what = fmt.Sprintf("%d reader(s): %s", len(names), strings.Join(names, ", "))
	}
	fmt.Fprintf(w.env.stderr, "Waiting for card insertion/removal and readers being plugged/unplugged (%s); Ctrl-C to stop.\n", what)
}

func (w *watcher) report(evs []event) error {
	if len(evs) == 0 {
		return nil
	}
	evs = w.stamp(evs)
	if w.json {
		return writeEventsJSON(w.env.stdout, evs)
	}
	for _, e := range evs {
		fmt.Fprintln(w.env.stdout, formatEvent(e))
	}
	return nil
}

func writeEventsJSON(out io.Writer, evs []event) error {
	enc := json.NewEncoder(out)
	for _, e := range evs {
		if err := enc.Encode(e); err != nil {
			return err
		}
	}
	return nil
}

// formatEvent is one --watch line: "15:04:05.000  READER: card inserted, ATR ...".
func formatEvent(e event) string {
	ts := e.Time
	if t, err := time.Parse(time.RFC3339Nano, e.Time); err == nil {
		ts = t.Local().Format("15:04:05.000")
	}
	var what string
	switch e.Event {
	case "reader_added":
		what = "reader added (" + e.State + ")"
	case "reader_removed":
		what = "reader removed"
	case "card_inserted":
		what = fmt.Sprintf("card inserted, ATR % X", []byte(e.ATR))
	case "card_removed":
		what = "card removed"
	case "state":
		what = "card " + e.Detail
	case "pcscd_lost":
		return fmt.Sprintf("%s  pcscd lost (%s); reconnecting", ts, e.Detail)
	case "pcscd_back":
		return fmt.Sprintf("%s  pcscd back", ts)
	default:
		what = e.Event
	}
	return fmt.Sprintf("%s  %s: %s", ts, e.Reader, what)
}

// lost drops the context after an error from pcscd (it stopped, or
// restarted and forgot us).
func (w *watcher) lost(err error) {
	if w.c != nil {
		w.c.Release()
		w.c = nil
	}
	w.report([]event{{Event: "pcscd_lost", Detail: err.Error()}})
}

// reconnect re-establishes a context with backoff until pcscd answers or
// ctx ends (false). Once back, the differences to the last known list are
// reported like any other change.
func (w *watcher) reconnect(ctx context.Context) bool {
	for {
		w.backoff = min(max(w.backoff*2, backoffMin), backoffMax)
		select {
		case <-ctx.Done():
			return false
		case <-time.After(w.backoff):
		}
		c, err := pcsc.EstablishContext(ctx, nil)
		if err != nil {
			continue
		}
		infos, err := snapshot(c)
		if err != nil {
			c.Release()
			continue
		}
		w.c = c
		w.report([]event{{Event: "pcscd_back"}})
		w.report(diffReaders(w.prev, infos))
		w.prev = infos
		// Counters restart with a new pcscd: forget the old ones.
		w.cur = make(map[string]pcsc.State)
		w.pnp = 0
		w.waiting()
		return true
	}
}
