package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/card/passthru"
	"github.com/vscard/vscard/pcsc"
	"github.com/vscard/vscard/vscard"
)

// servePassthru forwards the first PC/SC reader and its card (libcacard's
// passthru), following readers and cards as they come and go.
func servePassthru(ctx context.Context, cfg *config, level *slog.LevelVar, log *slog.Logger, stdin io.Reader, stdout, stderr io.Writer) error {
	addr, dial := dialFor(cfg)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	client := vscard.NewClient(dial, nil, &vscard.ClientOptions{
		Logger:           log,
		Trace:            traceFor(cfg, stderr),
		QEMU54Workaround: !cfg.noWorkaround,
		NoReader:         true,
	})
	bridge := passthru.NewBridge([]passthru.Slot{holdingClient{client}}, &passthru.BridgeOptions{Logger: log})
	log.Info("forwarding the first PC/SC reader", "pcscd", pcsc.SocketPath(), "host", addr)
	s := &session{client: client, bridge: bridge, reader: "", level: level, debug: cfg.debug, quit: cancel, out: stdout}
	go s.loop(ctx, stdin, log)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		client.Run(ctx)
	}()
	err := bridge.Run(ctx)
	cancel()
	wg.Wait()
	return err
}

// holdingClient lets the bridge see that the client dropped a failed card.
type holdingClient struct{ *vscard.Client }

func (c holdingClient) HoldsCard() bool { return c.Status().CardInserted }

// mirror is -p: the soft card answers the host, and each command also goes
// to the card in the first PC/SC reader; where the answers differ, both
// are printed (libcacard's vscclient -p, protocols.md §2.1). The physical
// card is opened in shared mode with the last-PIN-try guard on, so the
// mirrored VERIFYs of a different PIN can never block it.
type mirror struct {
	soft card.Card
	out  io.Writer
	log  *slog.Logger
	ctx  context.Context

	mu       sync.Mutex
	real     *passthru.Card
	lastOpen time.Time
}

// reopenEvery bounds how often a missing physical card is looked for.
const reopenEvery = 2 * time.Second

func newMirror(ctx context.Context, soft card.Card, out io.Writer, log *slog.Logger) *mirror {
	m := &mirror{soft: soft, out: out, log: log, ctx: ctx}
	m.mu.Lock()
	m.openLocked()
	m.mu.Unlock()
	return m
}

// openLocked opens the card in the first reader that has one.
func (m *mirror) openLocked() {
	m.lastOpen = time.Now()
	ctx, cancel := context.WithTimeout(m.ctx, 5*time.Second)
	defer cancel()
	pc, err := pcsc.EstablishContext(ctx, nil)
	if err != nil {
		m.log.Warn("-p: no pcscd; APDUs are not mirrored until it is there", "err", err)
		return
	}
	readers, err := pc.Readers()
	pc.Release()
	if err != nil {
		m.log.Warn("-p: cannot list PC/SC readers", "err", err)
		return
	}
	for _, r := range readers {
		if r.State&pcsc.StatePresent == 0 || r.State&pcsc.StateMute != 0 {
			continue
		}
		c, err := passthru.Dial(ctx, nil, r.Name, &passthru.Options{Logger: m.log})
		if err != nil {
			m.log.Warn("-p: cannot open the physical card", "reader", r.Name, "err", err)
			return
		}
		m.real = c
		m.log.Info("-p: mirroring APDUs to the physical card", "reader", r.Name, "atr", fmt.Sprintf("%X", c.ATR()))
		fmt.Fprintf(m.out, "mirroring to %s (ATR %X)\n", r.Name, c.ATR())
		if soft := m.soft.ATR(); string(soft) != string(c.ATR()) {
			fmt.Fprintf(m.out, "ATR differs: soft %X, card %X\n", soft, c.ATR())
		}
		return
	}
	m.log.Warn("-p: no card in any PC/SC reader; APDUs are not mirrored until one is inserted")
}

func (m *mirror) ATR() []byte { return m.soft.ATR() }

func (m *mirror) PowerOn()  { m.soft.PowerOn(); m.each(func(c *passthru.Card) { c.PowerOn() }) }
func (m *mirror) PowerOff() { m.soft.PowerOff(); m.each(func(c *passthru.Card) { c.PowerOff() }) }
func (m *mirror) Reset()    { m.soft.Reset(); m.each(func(c *passthru.Card) { c.Reset() }) }

func (m *mirror) each(f func(*passthru.Card)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.real != nil {
		f(m.real)
	}
}

// Transmit answers from the soft card and compares with the physical one.
func (m *mirror) Transmit(ctx context.Context, cmd []byte) ([]byte, error) {
	resp, err := m.soft.Transmit(ctx, cmd)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.real == nil && time.Since(m.lastOpen) >= reopenEvery {
		m.openLocked()
	}
	if m.real == nil {
		return resp, nil
	}
	realResp, rerr := m.real.Transmit(ctx, cmd)
	// Commands with a PIN are printed without it (apdu.Redact).
	kept, redacted := apdu.Redact(cmd)
	shown := fmt.Sprintf("%X", kept)
	if redacted > 0 {
		shown += fmt.Sprintf(" (%d bytes with the PIN not shown)", redacted)
	}
	switch {
	case rerr != nil:
		fmt.Fprintf(m.out, "APDU %s: soft %X, card error: %v\n", shown, resp, rerr)
		if !errors.Is(rerr, context.Canceled) {
			m.real.Close()
			m.real = nil
		}
	case string(realResp) != string(resp):
		fmt.Fprintf(m.out, "APDU %s differs:\n  soft %X\n  card %X\n", shown, resp, realResp)
	}
	return resp, nil
}

// Close closes the physical card.
func (m *mirror) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.real != nil {
		m.real.Close()
		m.real = nil
	}
	return nil
}
