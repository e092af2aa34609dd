package passthru

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/vscard/vscard/pcsc"
)

// EventKind says what changed.
type EventKind int

const (
	// ReaderAdded: a reader appeared (or was there when watching began).
	ReaderAdded EventKind = iota + 1
	// ReaderRemoved: a reader went away; a CardRemoved for it comes first.
	ReaderRemoved
	// CardInserted: a card is in the reader; Event.ATR is its ATR.
	CardInserted
	// CardRemoved: the card left the reader.
	CardRemoved
	// ServiceDown: pcscd cannot be reached (not running, restarting). Every
	// reader was reported removed before it.
	ServiceDown
	// ServiceUp: a context with pcscd is established; the readers it has
	// follow as ReaderAdded.
	ServiceUp
)

func (k EventKind) String() string {
	switch k {
	case ReaderAdded:
		return "reader added"
	case ReaderRemoved:
		return "reader removed"
	case CardInserted:
		return "card inserted"
	case CardRemoved:
		return "card removed"
	case ServiceDown:
		return "pcscd down"
	case ServiceUp:
		return "pcscd up"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is one change seen by Watch.
type Event struct {
	Kind   EventKind
	Reader string // empty for ServiceDown and ServiceUp
	ATR    []byte // CardInserted only
	Err    error  // ServiceDown: why
}

// WatchOptions configures Watch. The zero value (or nil) is ready to use.
type WatchOptions struct {
	// PCSC is passed to pcsc.EstablishContext.
	PCSC *pcsc.Options
	// Logger receives what Watch waits for. Nil discards.
	Logger *slog.Logger
	// Poll bounds one wait in GetStatusChange; the reader list is read
	// again after each, so that readers are found even by a daemon that
	// does not signal the PnP pseudo-reader. Zero means 2 s.
	Poll time.Duration
	// MinBackoff and MaxBackoff bound the wait between attempts to reach
	// pcscd. Zero means 100 ms and 5 s.
	MinBackoff, MaxBackoff time.Duration
}

// Watch reports reader and card changes until ctx is done, then closes the
// channel. The first events describe the readers and cards present. When
// pcscd goes away (ErrNoService: stopped, restarted) every reader is
// reported removed, followed by ServiceDown; Watch re-establishes its
// context with backoff, and the readers come back as ReaderAdded. The
// caller must keep receiving: Watch blocks until each event is taken.
func Watch(ctx context.Context, opts *WatchOptions) <-chan Event {
	var o WatchOptions
	if opts != nil {
		o = *opts
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Poll <= 0 {
		o.Poll = 2 * time.Second
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 100 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 5 * time.Second
	}
	o.MaxBackoff = max(o.MaxBackoff, o.MinBackoff)
	ch := make(chan Event)
	w := &watcher{o: o, ch: ch, known: map[string]*readerSt{}}
	go func() {
		defer close(ch)
		w.run(ctx)
	}()
	return ch
}

type readerSt struct {
	present bool
	state   pcsc.State // last EventState, without StateChanged
	atr     []byte
}

type watcher struct {
	o     WatchOptions
	ch    chan<- Event
	known map[string]*readerSt
	order []string // reader names in pcscd's order
	down  bool     // ServiceDown reported and not yet followed by ServiceUp
	pnp   pcsc.State
}

func (w *watcher) emit(ctx context.Context, e Event) bool {
	select {
	case w.ch <- e:
		return true
	case <-ctx.Done():
		return false
	}
}

func (w *watcher) run(ctx context.Context) {
	log := w.o.Logger
	backoff := w.o.MinBackoff
	lastErr := ""
	for ctx.Err() == nil {
		pc, err := pcsc.EstablishContext(ctx, w.o.PCSC)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !w.down {
				w.down = true
				if !w.emit(ctx, Event{Kind: ServiceDown, Err: err}) {
					return
				}
			}
			level := slog.LevelDebug
			if err.Error() != lastErr {
				level, lastErr = slog.LevelInfo, err.Error()
			}
			wait := backoff/2 + rand.N(backoff/2+1)
			log.Log(ctx, level, "waiting for pcscd", "err", err, "retry_in", wait)
			if !sleepCtx(ctx, wait) {
				return
			}
			backoff = min(2*backoff, w.o.MaxBackoff)
			continue
		}
		backoff, lastErr = w.o.MinBackoff, ""
		if w.down || len(w.known) == 0 {
			w.down = false
			if !w.emit(ctx, Event{Kind: ServiceUp}) {
				pc.Release()
				return
			}
		}
		err = w.serve(ctx, pc)
		pc.Release()
		if ctx.Err() != nil {
			return
		}
		// The daemon went away (or the context broke): every reader is gone
		// as far as anyone can tell.
		log.Warn("lost pcscd; all readers are gone until it is back", "err", err)
		if !w.dropAll(ctx) {
			return
		}
		w.down = true
		if !w.emit(ctx, Event{Kind: ServiceDown, Err: err}) {
			return
		}
		if !sleepCtx(ctx, backoff) {
			return
		}
	}
}

// dropAll reports every known reader (and its card) removed.
func (w *watcher) dropAll(ctx context.Context) bool {
	for _, name := range slices.Clone(w.order) {
		if !w.removeReader(ctx, name) {
			return false
		}
	}
	return true
}

func (w *watcher) removeReader(ctx context.Context, name string) bool {
	st := w.known[name]
	if st == nil {
		return true
	}
	if st.present {
		if !w.emit(ctx, Event{Kind: CardRemoved, Reader: name}) {
			return false
		}
	}
	delete(w.known, name)
	w.order = slices.DeleteFunc(w.order, func(s string) bool { return s == name })
	return w.emit(ctx, Event{Kind: ReaderRemoved, Reader: name})
}

// serve watches through one context until it fails.
func (w *watcher) serve(ctx context.Context, pc *pcsc.Context) error {
	waitingLogged := false
	for {
		names, err := pc.ListReaders()
		if errors.Is(err, pcsc.ErrNoReadersAvailable) {
			names, err = nil, nil
		}
		if err != nil {
			return fmt.Errorf("list readers: %w", err)
		}
		// Readers gone, then readers new, in pcscd's order.
		for _, name := range slices.Clone(w.order) {
			if !slices.Contains(names, name) {
				if !w.removeReader(ctx, name) {
					return ctx.Err()
				}
			}
		}
		for _, name := range names {
			if w.known[name] == nil {
				w.known[name] = &readerSt{}
				w.order = append(w.order, name)
				if !w.emit(ctx, Event{Kind: ReaderAdded, Reader: name}) {
					return ctx.Err()
				}
			}
		}
		if len(names) == 0 && !waitingLogged {
			w.o.Logger.Info("waiting for a PC/SC reader to be plugged in")
			waitingLogged = true
		} else if len(names) > 0 {
			waitingLogged = false
		}

		states := make([]pcsc.ReaderState, 0, len(w.order)+1)
		for _, name := range w.order {
			states = append(states, pcsc.ReaderState{Reader: name, CurrentState: w.known[name].state})
		}
		// The PnP pseudo-reader wakes the wait when a reader is plugged in
		// or out; pass back the state it reported last time, as for a
		// reader (pcsc-lite keeps the reader count in its upper bits).
		states = append(states, pcsc.ReaderState{Reader: pcsc.PnPNotification, CurrentState: w.pnp})
		start := time.Now()
		err = pc.GetStatusChange(ctx, w.o.Poll, states)
		switch {
		case err == nil:
		case errors.Is(err, pcsc.ErrTimeout):
			continue
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, pcsc.ErrUnknownReader), errors.Is(err, pcsc.ErrReaderUnavailable):
			// A reader vanished between listing and waiting: list again.
			continue
		default:
			return fmt.Errorf("get status change: %w", err)
		}
		changed := false
		for _, rs := range states[:len(states)-1] {
			if rs.EventState&pcsc.StateChanged != 0 && rs.EventState&^pcsc.StateChanged != w.known[rs.Reader].state {
				changed = true
			}
			if !w.update(ctx, rs) {
				return ctx.Err()
			}
		}
		pnp := states[len(states)-1]
		if pnp.EventState&pcsc.StateUnknown != 0 {
			// No PnP support: the Poll timeout finds new readers.
			w.pnp = pcsc.StateIgnore
		} else if pnp.EventState&pcsc.StateChanged != 0 {
			w.pnp = pnp.EventState &^ pcsc.StateChanged
		}
		if !changed && time.Since(start) < 10*time.Millisecond {
			// A wait that returns at once with nothing new must not spin.
			if !sleepCtx(ctx, 50*time.Millisecond) {
				return ctx.Err()
			}
		}
	}
}

// update emits card events for one reader's new state.
func (w *watcher) update(ctx context.Context, rs pcsc.ReaderState) bool {
	st := w.known[rs.Reader]
	if st == nil || rs.EventState&pcsc.StateChanged == 0 {
		return true
	}
	ev := rs.EventState &^ pcsc.StateChanged
	old := st.state
	st.state = ev
	if ev&(pcsc.StateUnknown|pcsc.StateUnavailable) != 0 {
		// The reader is going away; the next ListReaders reports it.
		return true
	}
	present := ev&pcsc.StatePresent != 0 && ev&pcsc.StateMute == 0
	atr := append([]byte(nil), rs.ATR...)
	switch {
	case present && !st.present:
		st.present, st.atr = true, atr
		return w.emit(ctx, Event{Kind: CardInserted, Reader: rs.Reader, ATR: atr})
	case !present && st.present:
		st.present, st.atr = false, nil
		return w.emit(ctx, Event{Kind: CardRemoved, Reader: rs.Reader})
	case present && (!bytes.Equal(atr, st.atr) || (old>>16 != 0 && old>>16 != ev>>16)):
		// Swapped between two waits: a different ATR, or pcsc-lite's
		// insertion counter (upper 16 bits of the state) moved on.
		if !w.emit(ctx, Event{Kind: CardRemoved, Reader: rs.Reader}) {
			return false
		}
		st.atr = atr
		return w.emit(ctx, Event{Kind: CardInserted, Reader: rs.Reader, ATR: atr})
	}
	return true
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
