package passthru

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/pcsc"
)

// Slot is one virtual reader that a Bridge drives; *vscard.Client is one
// (create it with ClientOptions.NoReader so that it starts without a
// reader).
type Slot interface {
	AddReader() error
	RemoveReader() error
	Insert(card.Card) error
	Remove() error
}

// BridgeOptions configures a Bridge. The zero value (or nil) forwards the
// first reader to the first slot.
type BridgeOptions struct {
	// Reader picks the PC/SC readers: "" is the first reader pcscd lists
	// (at start, or the first to be plugged in); "all" maps every reader to
	// the next free slot; anything else is an exact reader name or a
	// unique prefix or substring of one.
	Reader string
	// Card configures each forwarded card.
	Card Options
	// PCSC is passed to pcsc.EstablishContext.
	PCSC *pcsc.Options
	// Logger receives what the bridge does and waits for. Nil discards.
	Logger *slog.Logger
	// Retry is how often a card that should be in a slot but is not (it
	// failed to open, or failed in use while still in the reader) is
	// opened again. Zero means 1 s.
	Retry time.Duration

	// watch and open replace Watch and Dial in tests.
	watch func(ctx context.Context) <-chan Event
	open  func(ctx context.Context, reader string) (forwarded, error)
}

// forwarded is a forwarded card: a *Card, or a fake in tests.
type forwarded interface {
	card.Card
	Close() error
}

// Bridge maps PC/SC readers and their cards onto Slots: a reader plugged
// in is AddReader, a card inserted is Insert of a forwarded Card, a card
// removed is Remove, a reader unplugged is RemoveReader (QEMU's
// ccid-card-passthru has one reader per chardev, so one Slot is one
// reader). It survives pcscd restarts: the readers go and come back.
type Bridge struct {
	slots []Slot
	o     BridgeOptions
	log   *slog.Logger

	mu       sync.Mutex
	ctx      context.Context // Run's, for opening cards from bind
	bound    []*binding      // per slot, nil when free
	added    []bool          // per slot: AddReader called, RemoveReader not since
	lastSlot map[string]int
	readers  map[string]*readerView // every reader pcscd has
	order    []string
	up       bool   // pcscd reachable
	downErr  string // why not
}

// binding is a reader forwarded to a slot.
type binding struct {
	reader   string
	present  bool   // the watcher sees a card
	atr      []byte // its ATR
	card     forwarded
	inserted bool // card was Inserted into the slot
	held     bool // removed by the user ("remove"): not re-inserted
	lastErr  string
}

type readerView struct {
	present bool
	atr     []byte
}

// SlotStatus describes one slot for list and status commands.
type SlotStatus struct {
	Reader  string // the PC/SC reader forwarded, "" if none yet
	Card    bool   // a card is in that reader
	ATR     []byte // its ATR
	Held    bool   // the user removed the card ("remove"); "insert" brings it back
	LastErr string // the last error opening or using the card
}

// BridgeStatus is a snapshot of a Bridge.
type BridgeStatus struct {
	PCSCUp   bool
	PCSCErr  string // why pcscd is unreachable
	Readers  []string
	Slots    []SlotStatus
	Wanted   string   // BridgeOptions.Reader
	Unmapped []string // readers with no free slot (all) or not selected
}

// NewBridge returns a Bridge that drives slots.
func NewBridge(slots []Slot, opts *BridgeOptions) *Bridge {
	var o BridgeOptions
	if opts != nil {
		o = *opts
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Retry <= 0 {
		o.Retry = time.Second
	}
	if o.Card.Logger == nil {
		o.Card.Logger = o.Logger
	}
	if o.watch == nil {
		o.watch = func(ctx context.Context) <-chan Event {
			return Watch(ctx, &WatchOptions{PCSC: o.PCSC, Logger: o.Logger})
		}
	}
	if o.open == nil {
		o.open = func(ctx context.Context, reader string) (forwarded, error) {
			return Dial(ctx, o.PCSC, reader, &o.Card)
		}
	}
	return &Bridge{slots: slots, o: o, log: o.Logger, bound: make([]*binding, len(slots)), added: make([]bool, len(slots)),
		lastSlot: map[string]int{}, readers: map[string]*readerView{}}
}

// MatchReader picks the reader that want names among readers: an exact
// name, else the one reader that starts with want, else the one that
// contains it. ok is false when none does; an error says that several do.
func MatchReader(want string, readers []string) (name string, ok bool, err error) {
	if slices.Contains(readers, want) {
		return want, true, nil
	}
	for _, match := range []func(string, string) bool{strings.HasPrefix, strings.Contains} {
		var found []string
		for _, r := range readers {
			if match(r, want) {
				found = append(found, r)
			}
		}
		if len(found) == 1 {
			return found[0], true, nil
		}
		if len(found) > 1 {
			return "", false, fmt.Errorf("reader %q is ambiguous: it matches %q", want, found)
		}
	}
	return "", false, nil
}

// Run forwards until ctx is done, then closes the forwarded cards. The
// slots' own Run loops are the caller's: cancel them after Run returns, or
// with the same ctx (a vscard.Client removes card and reader from its host
// when its ctx ends).
func (b *Bridge) Run(ctx context.Context) error {
	b.mu.Lock()
	b.ctx = ctx
	b.mu.Unlock()
	events := b.o.watch(ctx)
	tick := time.NewTicker(b.o.Retry)
	defer tick.Stop()
	b.log.Info("waiting for pcscd's readers", "reader", b.want())
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				b.closeAll()
				return nil
			}
			b.handle(ctx, ev)
		case <-tick.C:
			b.retry(ctx)
		case <-ctx.Done():
			// Drain so the watcher can stop.
			for range events {
			}
			b.closeAll()
			return nil
		}
	}
}

func (b *Bridge) want() string {
	if b.o.Reader == "" {
		return "the first reader"
	}
	return b.o.Reader
}

func (b *Bridge) closeAll() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, bd := range b.bound {
		if bd != nil && bd.card != nil {
			bd.card.Close()
			bd.card = nil
		}
	}
}

func (b *Bridge) handle(ctx context.Context, ev Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	log := b.log
	switch ev.Kind {
	case ServiceUp:
		b.up, b.downErr = true, ""
		log.Info("connected to pcscd")
	case ServiceDown:
		b.up = false
		if ev.Err != nil {
			b.downErr = ev.Err.Error()
		}
		log.Warn("pcscd is not running or went away; waiting for it", "err", ev.Err)
	case ReaderAdded:
		b.readers[ev.Reader] = &readerView{}
		b.order = append(b.order, ev.Reader)
		log.Info("PC/SC reader plugged in", "pcsc_reader", ev.Reader)
		b.bind(ev.Reader)
	case ReaderRemoved:
		delete(b.readers, ev.Reader)
		b.order = slices.DeleteFunc(b.order, func(s string) bool { return s == ev.Reader })
		log.Info("PC/SC reader unplugged", "pcsc_reader", ev.Reader)
		if i := b.slotOf(ev.Reader); i >= 0 {
			bd := b.bound[i]
			b.takeOut(i, bd)
			if b.added[i] {
				b.added[i] = false
				if err := b.slots[i].RemoveReader(); err != nil {
					log.Warn("remove reader", "slot", i, "err", err)
				}
			}
			b.lastSlot[ev.Reader] = i
			if b.o.Reader == "all" || b.o.Reader == "" {
				// "all" and "the first reader" follow whatever is plugged
				// in; a reader named on the command line keeps its slot.
				b.bound[i] = nil
				// A reader that found no free slot can have this one.
				for _, r := range b.order {
					if b.slotOf(r) < 0 {
						b.bind(r)
						break
					}
				}
			} else {
				// Keep the slot for this reader; it may come back.
				bd.present, bd.atr = false, nil
				log.Info("waiting for the reader to be plugged in again", "pcsc_reader", ev.Reader)
			}
		}
	case CardInserted:
		if rv := b.readers[ev.Reader]; rv != nil {
			rv.present, rv.atr = true, ev.ATR
		}
		if i := b.slotOf(ev.Reader); i >= 0 {
			bd := b.bound[i]
			bd.present, bd.atr, bd.held = true, ev.ATR, false
			log.Info("card inserted", "pcsc_reader", ev.Reader, "atr", fmt.Sprintf("%X", ev.ATR))
			b.putIn(ctx, i, bd)
		}
	case CardRemoved:
		if rv := b.readers[ev.Reader]; rv != nil {
			rv.present, rv.atr = false, nil
		}
		if i := b.slotOf(ev.Reader); i >= 0 {
			bd := b.bound[i]
			bd.present, bd.atr, bd.held = false, nil, false
			log.Info("card removed", "pcsc_reader", ev.Reader)
			b.takeOut(i, bd)
			log.Info("waiting for a card", "pcsc_reader", ev.Reader)
		}
	}
}

// slotOf returns the slot reader is bound to, or -1.
func (b *Bridge) slotOf(reader string) int {
	for i, bd := range b.bound {
		if bd != nil && bd.reader == reader {
			return i
		}
	}
	return -1
}

// bind gives a newly seen reader a slot if the selection wants it.
// Called with mu held.
func (b *Bridge) bind(reader string) {
	if i := b.slotOf(reader); i >= 0 {
		// A reader coming back to the slot it had.
		b.addReader(i)
		return
	}
	switch b.o.Reader {
	case "all":
		i := -1
		if j, ok := b.lastSlot[reader]; ok && b.bound[j] == nil {
			i = j
		} else {
			i = slices.Index(b.bound, nil)
		}
		if i < 0 {
			b.log.Warn("no free TARGET for this reader; give one more TARGET per reader", "pcsc_reader", reader)
			return
		}
		b.bound[i] = &binding{reader: reader}
		b.addReader(i)
	case "":
		if b.bound[0] == nil {
			b.bound[0] = &binding{reader: reader}
			b.addReader(0)
		}
	default:
		if b.bound[0] != nil {
			return
		}
		if name, ok, err := MatchReader(b.o.Reader, b.order); err != nil {
			b.log.Error("cannot pick the reader", "err", err)
		} else if ok && name == reader {
			b.bound[0] = &binding{reader: reader}
			b.addReader(0)
		}
	}
}

func (b *Bridge) addReader(i int) {
	reader := b.bound[i].reader
	if !b.added[i] {
		b.added[i] = true
		if err := b.slots[i].AddReader(); err != nil {
			b.log.Warn("add reader", "slot", i, "err", err)
		}
	}
	b.log.Info("forwarding PC/SC reader", "pcsc_reader", reader, "slot", i)
	rv := b.readers[reader]
	if rv == nil || !rv.present {
		b.log.Info("waiting for a card", "pcsc_reader", reader)
		return
	}
	// The reader got this slot with its card already in.
	bd := b.bound[i]
	if bd.card == nil && !bd.held {
		bd.present, bd.atr = true, rv.atr
		b.putIn(b.ctx, i, bd)
	}
}

// putIn opens the card and inserts it into slot i. Called with mu held.
func (b *Bridge) putIn(ctx context.Context, i int, bd *binding) {
	if bd.card != nil {
		b.takeOut(i, bd)
	}
	c, err := b.o.open(ctx, bd.reader)
	if err != nil {
		// Retried every Retry: say it once per new reason (an exclusive
		// holder may keep the card for a long time).
		level := slog.LevelDebug
		if err.Error() != bd.lastErr {
			level = slog.LevelWarn
		}
		bd.lastErr = err.Error()
		b.log.Log(ctx, level, "cannot open the card; retrying", "pcsc_reader", bd.reader, "err", err, "every", b.o.Retry)
		return
	}
	if err := b.slots[i].Insert(c); err != nil {
		// A card the slot dropped on a failure is still its "last card";
		// the slot reports that it holds one only while it does.
		b.slots[i].Remove()
		err = b.slots[i].Insert(c)
	}
	if err != nil {
		c.Close()
		bd.lastErr = err.Error()
		b.log.Warn("cannot insert the card", "slot", i, "err", err)
		return
	}
	bd.card, bd.inserted, bd.lastErr = c, true, ""
}

// takeOut removes the card from slot i and closes it. Called with mu held.
func (b *Bridge) takeOut(i int, bd *binding) {
	if bd == nil {
		return
	}
	if bd.inserted {
		if err := b.slots[i].Remove(); err != nil {
			b.log.Debug("remove card", "slot", i, "err", err)
		}
		bd.inserted = false
	}
	if bd.card != nil {
		bd.card.Close()
		bd.card = nil
	}
}

// holdsCard is implemented by slots that can say whether they still hold
// the card (vscard.Client drops a card whose Transmit failed).
type holdsCard interface{ HoldsCard() bool }

// retry reopens cards that should be forwarded but are not.
func (b *Bridge) retry(ctx context.Context) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, bd := range b.bound {
		if bd == nil || !bd.present || bd.held {
			continue
		}
		dropped := false
		if hc, ok := b.slots[i].(holdsCard); ok && bd.inserted && !hc.HoldsCard() {
			// The card failed in use (the slot took it out) but the reader
			// still shows it: open it again.
			dropped = true
			b.log.Info("the forwarded card failed while still in the reader; opening it again", "pcsc_reader", bd.reader)
		}
		if bd.card == nil || dropped {
			b.putIn(ctx, i, bd)
		}
	}
}

// Eject takes the card out of every slot until Reinsert (the "remove"
// command), leaving the physical card alone.
func (b *Bridge) Eject() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for i, bd := range b.bound {
		if bd != nil && bd.card != nil {
			b.takeOut(i, bd)
			bd.held = true
			n++
		}
	}
	if n == 0 {
		return errors.New("no forwarded card to remove")
	}
	return nil
}

// Reinsert puts back the cards that Eject took out (the "insert" command).
func (b *Bridge) Reinsert(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	var errs []error
	for i, bd := range b.bound {
		if bd != nil && bd.present && bd.card == nil {
			bd.held = false
			b.putIn(ctx, i, bd)
			if bd.card != nil {
				n++
			} else {
				errs = append(errs, fmt.Errorf("%s: %s", bd.reader, bd.lastErr))
			}
		}
	}
	if n == 0 && len(errs) > 0 {
		return fmt.Errorf("cannot open the card (retrying): %w", errors.Join(errs...))
	}
	if n == 0 {
		return errors.New("no card to insert: no card is in a forwarded reader, or it is already inserted")
	}
	return nil
}

// Status returns a snapshot of the bridge.
func (b *Bridge) Status() BridgeStatus {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := BridgeStatus{PCSCUp: b.up, PCSCErr: b.downErr, Readers: slices.Clone(b.order), Wanted: b.o.Reader}
	for _, bd := range b.bound {
		var ss SlotStatus
		if bd != nil {
			ss = SlotStatus{Reader: bd.reader, Card: bd.present, ATR: bd.atr, Held: bd.held, LastErr: bd.lastErr}
		}
		st.Slots = append(st.Slots, ss)
	}
	for _, r := range b.order {
		if b.slotOf(r) < 0 {
			st.Unmapped = append(st.Unmapped, r)
		}
	}
	return st
}
