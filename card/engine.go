package card

import (
	"bytes"
	"context"
	"log/slog"
	"sync"

	"github.com/vscard/vscard/apdu"
)

// Channels is the number of logical channels an Engine tracks. libcacard
// keeps a current applet for each of 4 channels (shared reference cac.md
// §2.2).
const Channels = 4

// Applet is one selectable application on an Engine-based card.
//
// Handle sees every command addressed to the applet's channel while it is
// current, whatever the CLA (applet handlers ignore CLA, cac.md §2.2). It
// returns handled=false to pass the command to the engine's generic path
// (SELECT by AID, GET RESPONSE, and the personality's Generic hook). A
// response whose status is 90 00 is sized by the engine (Rule A, cac.md
// §2.4), so Handle returns the whole data and never builds 61xx itself.
// Data may alias the applet's own buffers: the engine copies it before the
// next call.
//
// A non-nil error means the card can no longer answer (a vanished token, a
// cancelled context); Transmit passes it on.
type Applet interface {
	// AID returns the application identifier. The engine does not modify it.
	AID() []byte
	// Select runs when the applet becomes current on channel ch (its
	// "reset hook": drop per-selection state) and returns the data of the
	// SELECT response, usually an FCI.
	Select(ch int) []byte
	// Handle processes one command on channel ch.
	Handle(ctx context.Context, ch int, cmd apdu.Command) (resp apdu.Response, handled bool, err error)
}

// HandlerFunc is the signature of the generic-path hook: it gets every
// command the current applet (if any) deferred, other than SELECT and GET
// RESPONSE, on ISO interindustry CLAs without secure messaging.
type HandlerFunc func(ctx context.Context, ch int, cmd apdu.Command) (resp apdu.Response, handled bool, err error)

// Config describes a card personality to NewEngine.
type Config struct {
	// ATR is the answer-to-reset.
	ATR []byte
	// Applets are searched in order by SELECT (P1=04).
	Applets []Applet
	// MatchAID reports whether a SELECT naming aid picks applet a. Nil
	// means exact match, as libcacard does (cac.md §4.1); a PIV
	// personality supplies prefix matching (cac.md §11).
	MatchAID func(a Applet, aid []byte) bool
	// Generic handles deferred commands on the generic path (VERIFY, GET
	// CHALLENGE...). Nil or handled=false gives 69 00, libcacard's answer
	// for every other INS there (cac.md §2.3).
	Generic HandlerFunc
	// OnPower runs after each PowerOn, PowerOff and Reset, once the
	// engine has dropped its own volatile state; the personality drops its
	// own (verified PIN, applet buffers) there.
	OnPower func()
	// Logger receives debug traces of status words (never command data).
	// Nil discards.
	Logger *slog.Logger
	// AbsentLe256 reports whether a command without Le (case 1 or 3) is
	// answered as if Le were 256: data up to 256 bytes comes back at once
	// with 90 00, the way T=1 cards such as YubiKeys answer, instead of
	// 61 xx (Rule A, cac.md §2.4). Longer data still goes through 61 xx.
	// yubico-piv-tool sends SELECT without Le and fails on anything but
	// 90 00; OpenSC strips Le from every case-4 command on a T=0 card and
	// follows 61 xx with a GET RESPONSE, one more round trip. Nil keeps
	// libcacard's behaviour for every command.
	AbsentLe256 func(cmd apdu.Command) bool
	// Default is the applet implicitly selected on the basic channel (0)
	// after every power event and after a failed SELECT, as ISO 7816-4
	// §7.1.1 allows for a card's default application: PIV clients such as
	// OpenSC read Discovery and send chained (CLA 10) commands without
	// selecting first, and the PIV application stays current when a
	// client probes other AIDs. Nil keeps libcacard's behaviour (nothing
	// selected, a failed SELECT deselects: cac.md §4.1).
	Default Applet
}

// Engine is a Card built from applets. It implements the behaviour shared
// by every applet (cac.md §2): SELECT by AID per logical channel, one
// buffered response per card drained with GET RESPONSE, the CLA rules of
// libcacard's generic path, and 67 00 without any state change for a
// malformed APDU.
//
// An Engine serialises Transmit and the power events with a mutex, so a
// card may be shared, although transports call it from one goroutine.
type Engine struct {
	mu      sync.Mutex
	cfg     Config
	log     *slog.Logger
	current [Channels]Applet

	// pending is the card's single buffered response (cac.md §2.3); its
	// backing array is reused, so steady-state traffic does not allocate.
	pending    []byte
	pendingOff int
	hasPending bool
}

var _ Card = (*Engine)(nil)

// NewEngine returns an engine for cfg. The Config's slices are retained.
func NewEngine(cfg Config) *Engine {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Engine{cfg: cfg, log: log}
	e.current[0] = cfg.Default
	return e
}

// ATR implements Card.
func (e *Engine) ATR() []byte { return e.cfg.ATR }

// PowerOn implements Card.
func (e *Engine) PowerOn() { e.power() }

// PowerOff implements Card.
func (e *Engine) PowerOff() { e.power() }

// Reset implements Card.
func (e *Engine) Reset() { e.power() }

// power drops what vreader_power_off/on drop (cac.md §2.5): every
// channel's applet and the buffered response; the personality logs out.
func (e *Engine) power() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.current = [Channels]Applet{}
	e.current[0] = e.cfg.Default
	e.dropPending()
	if e.cfg.OnPower != nil {
		e.cfg.OnPower()
	}
}

// Current returns the applet selected on channel ch, or nil.
func (e *Engine) Current(ch int) Applet {
	if ch < 0 || ch >= Channels {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.current[ch]
}

func (e *Engine) dropPending() {
	e.pending = e.pending[:0]
	e.pendingOff = 0
	e.hasPending = false
}

// classify decodes CLA the way libcacard's vcard_apdu_set_class does
// (cac.md §2.2): interindustry classes 0/8/9/A carry a channel in bits
// 1-0 and secure messaging in bits 3-1; B/C mean channel 0; the RFU and
// proprietary classes are not ISO commands at all.
func classify(cla byte) (ch int, sm bool, iso bool) {
	switch cla & 0xF0 {
	case 0x00, 0x80, 0x90, 0xA0:
		return int(cla & 3), cla&0x0E != 0, true
	case 0xB0, 0xC0:
		return 0, false, true
	default:
		return 0, false, false
	}
}

// Transmit implements Card.
func (e *Engine) Transmit(ctx context.Context, raw []byte) ([]byte, error) {
	cmd, err := apdu.Parse(raw)
	if err != nil {
		// Malformed: 67 00 and no state change, not even the
		// buffered response (cac.md §2.1).
		return []byte{0x67, 0x00}, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()

	// Any INS but GET RESPONSE silently discards a pending response
	// (cac.md §2.3, libcacard NEWS 2.5.3).
	if cmd.INS != 0xC0 {
		e.dropPending()
	}
	ch, _, _ := classify(cmd.CLA)

	var resp apdu.Response
	handled := false
	if a := e.current[ch]; a != nil {
		resp, handled, err = a.Handle(ctx, ch, cmd)
		if err != nil {
			return nil, err
		}
	}
	if !handled {
		var out []byte
		resp, out, err = e.generic(ctx, cmd)
		if err != nil {
			return nil, err
		}
		if out != nil {
			return out, nil
		}
	}
	ne := cmd.Ne
	if !cmd.HasLe && e.cfg.AbsentLe256 != nil && e.cfg.AbsentLe256(cmd) {
		ne = 256
	}
	out := e.size(resp, ne)
	if e.log.Enabled(ctx, slog.LevelDebug) {
		e.log.DebugContext(ctx, "apdu", "cla", cmd.CLA, "ins", cmd.INS,
			"sw", apdu.SW(out[len(out)-2])<<8|apdu.SW(out[len(out)-1]), "len", len(out)-2)
	}
	return out, nil
}

// size applies Rule A (cac.md §2.4): data that fits Ne goes out with its
// status; longer data becomes the card's buffered response and the answer
// is 61 LL.
func (e *Engine) size(resp apdu.Response, ne int) []byte {
	if resp.SW == apdu.SWOK && len(resp.Data) > ne {
		e.pending = append(e.pending[:0], resp.Data...)
		e.pendingOff = 0
		e.hasPending = true
		sw := apdu.SWBytesRemaining.WithLen(len(resp.Data))
		return []byte{sw.SW1(), sw.SW2()}
	}
	return resp.Bytes()
}

// generic is libcacard's "VM" path (cac.md §2.3). GET RESPONSE builds its
// own output (returned as out) because it must not be re-buffered.
func (e *Engine) generic(ctx context.Context, cmd apdu.Command) (resp apdu.Response, out []byte, err error) {
	ch, sm, iso := classify(cmd.CLA)
	if sm {
		return apdu.Status(apdu.SWSecureMessaging), nil, nil
	}
	if !iso {
		return apdu.Status(apdu.SWCommandNotAllowed), nil, nil
	}
	switch cmd.INS {
	case 0xA4:
		return e.selectAID(ch, cmd), nil, nil
	case 0xC0:
		return apdu.Response{}, e.getResponse(cmd.Ne), nil
	}
	if e.cfg.Generic != nil {
		resp, handled, err := e.cfg.Generic(ctx, ch, cmd)
		if err != nil || handled {
			return resp, nil, err
		}
	}
	return apdu.Status(apdu.SWCommandNotAllowed), nil, nil
}

// selectAID handles SELECT on the generic path (cac.md §4.1): only P1=04;
// P2 is ignored; a miss deselects the channel.
func (e *Engine) selectAID(ch int, cmd apdu.Command) apdu.Response {
	if cmd.P1 != 0x04 {
		return apdu.Status(apdu.SWFuncNotSupported)
	}
	if len(cmd.Data) > 0 {
		for _, a := range e.cfg.Applets {
			if e.match(a, cmd.Data) {
				e.current[ch] = a
				return apdu.OK(a.Select(ch))
			}
		}
	}
	// The failed SELECT clears the channel: CoolKey's card-manager probe
	// depends on the following commands reaching the generic path.
	e.current[ch] = nil
	if ch == 0 {
		e.current[0] = e.cfg.Default
	}
	return apdu.Status(apdu.SWFileNotFound)
}

func (e *Engine) match(a Applet, aid []byte) bool {
	if e.cfg.MatchAID != nil {
		return e.cfg.MatchAID(a, aid)
	}
	return bytes.Equal(a.AID(), aid)
}

// getResponse drains the buffered response (cac.md §2.4): P1/P2 ignored,
// at most Ne bytes, 61 NN while more remains, 6A 88 when nothing is
// pending.
func (e *Engine) getResponse(ne int) []byte {
	if !e.hasPending {
		return []byte{0x6A, 0x88}
	}
	rest := e.pending[e.pendingOff:]
	n := min(ne, len(rest))
	out := make([]byte, n+2)
	copy(out, rest[:n])
	e.pendingOff += n
	left := len(rest) - n
	sw := apdu.SWOK
	if left > 0 {
		sw = apdu.SWBytesRemaining.WithLen(left)
	} else {
		e.dropPending()
	}
	out[n], out[n+1] = sw.SW1(), sw.SW2()
	return out
}
