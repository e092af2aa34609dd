package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/vscard/vscard/vscard"
)

// serverTLSConfig builds the TLS configuration of --vscard-listen, or nil
// without TLS flags. With --tls-ca, clients must present a certificate
// from that CA, as QEMU's tls-creds-x509 with verify-peer=on asks
// (peers.md §7.3).
func serverTLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	if certFile == "" {
		return nil, nil
	}
	kp, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pool, err := readCertPool(caFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// handshakeTimeout bounds a client's TLS handshake, so that a silent
// connection cannot keep the slot.
const handshakeTimeout = 10 * time.Second

// vscardSlot is a slot fed by VSCard clients connecting in: the role of
// QEMU's ccid-card-passthru, one client (one reader) at a time.
type vscardSlot struct {
	app  *readerApp
	slot *readerSlot
	addr target
	tls  *tls.Config
	log  *slog.Logger

	mu      sync.Mutex
	host    *vscard.Host // the connected client, nil when none
	peer    string
	since   time.Time
	atr     []byte // the client's card, nil when it has none
	held    bool   // 'remove' took the card out; 'insert' or the next client undoes it
	clients int
	lastErr string
}

func (v *vscardSlot) listen() (net.Listener, error) {
	ln, err := listenTarget(v.addr)
	if err != nil {
		return nil, fmt.Errorf("slot %d: --vscard-listen: %w", v.slot.idx, err)
	}
	return ln, nil
}

// serve accepts clients until ctx ends.
func (v *vscardSlot) serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	mode := "plain"
	if v.tls != nil {
		mode = "tls"
	}
	v.log.Info("no VSCard client yet; waiting for one (vscard connect "+v.addr.String()+", or vscclient)",
		"slot", v.slot.idx, "listen", v.addr.String(), "transport", mode)
	delay := 5 * time.Millisecond
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) || isTemporary(err) {
				// EMFILE and the like: wait and try again rather than spin.
				time.Sleep(delay)
				delay = min(2*delay, time.Second)
				continue
			}
			return fmt.Errorf("slot %d: accept VSCard clients: %w", v.slot.idx, err)
		}
		delay = 5 * time.Millisecond
		v.mu.Lock()
		busy := v.host != nil || v.peer != ""
		if !busy {
			v.peer = peerName(nc)
		}
		v.mu.Unlock()
		if busy {
			// QEMU's chardev takes one client at a time too; turn the
			// second away rather than let two cards fight for one slot.
			v.log.Warn("a second VSCard client connected while the slot has one; closing it", "peer", peerName(nc))
			nc.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			v.client(ctx, nc)
		}()
	}
}

// isTemporary reports accept errors worth retrying (EMFILE, ECONNABORTED).
func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

func peerName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" && a.String() != "@" {
		return a.String()
	}
	return "unix socket peer"
}

// client serves one connected client until it goes away.
func (v *vscardSlot) client(ctx context.Context, nc net.Conn) {
	peer := peerName(nc)
	log := v.log.With("peer", peer)
	defer func() {
		// Empty the slot before freeing it, so that the next client's card
		// is never removed by this one's leaving.
		if had, err := v.app.remove(v.slot); had {
			log.Info("VSCard client's card removed from the slot", "err", err)
		}
		v.mu.Lock()
		v.host, v.peer, v.atr = nil, "", nil
		v.mu.Unlock()
		if ctx.Err() == nil {
			log.Info("no VSCard client now; waiting for one", "listen", v.addr.String())
		}
	}()
	if v.tls != nil {
		tc, err := serverHandshake(ctx, nc, v.tls)
		if err != nil {
			v.setErr(err)
			log.Warn("VSCard client's TLS handshake failed", "err", err)
			return
		}
		nc = tc
	}
	h := vscard.NewHost(nc, &vscard.HostOptions{Logger: log})
	v.mu.Lock()
	v.host, v.since, v.held = h, time.Now(), false
	v.clients++
	v.mu.Unlock()
	log.Info("VSCard client connected; waiting for its reader and card")

	done := make(chan error, 1)
	go func() { done <- h.Serve(ctx) }()
	for ev := range h.Events() {
		switch ev := ev.(type) {
		case vscard.ReaderAdded:
			log.Info("VSCard client added its reader", "name", ev.Name)
		case vscard.ReaderRemoved:
			log.Info("VSCard client removed its reader")
		case vscard.CardInserted:
			v.mu.Lock()
			v.atr = ev.ATR
			held := v.held
			v.mu.Unlock()
			if held {
				log.Info("VSCard client inserted a card; kept out of the slot until 'insert'", "atr", fmt.Sprintf("%X", ev.ATR))
				continue
			}
			if err := v.app.insert(v.slot, &hostCard{h: h, atr: ev.ATR, log: log}); err != nil {
				v.setErr(err)
				log.Warn("cannot insert the VSCard client's card", "err", err)
				continue
			}
			log.Info("VSCard client's card inserted", "atr", fmt.Sprintf("%X", ev.ATR))
		case vscard.CardRemoved:
			v.mu.Lock()
			v.atr = nil
			v.mu.Unlock()
			if had, _ := v.app.remove(v.slot); had {
				log.Info("VSCard client removed its card")
			}
		case vscard.Closed:
			if ev.Err != nil {
				v.setErr(ev.Err)
				log.Info("VSCard client went away", "reason", ev.Err)
			}
		}
	}
	<-done
}

func (v *vscardSlot) setErr(err error) {
	v.mu.Lock()
	v.lastErr = err.Error()
	v.mu.Unlock()
}

// reinsert is the "insert" command: put back the client's card that
// "remove" took out.
func (v *vscardSlot) reinsert() (string, error) {
	v.mu.Lock()
	h, atr := v.host, v.atr
	v.mu.Unlock()
	switch {
	case h == nil:
		return "", fmt.Errorf("no VSCard client connected (waiting on %s)", v.addr)
	case atr == nil:
		return "", errors.New("the VSCard client has no card in its reader")
	case v.slot.isInserted():
		return "", errors.New("the card is already inserted")
	}
	if err := v.app.insert(v.slot, &hostCard{h: h, atr: atr, log: v.log}); err != nil {
		return "", err
	}
	v.mu.Lock()
	v.held = false
	v.mu.Unlock()
	return "card inserted", nil
}

// hold is the "remove" command: the guest sees the card pulled out; the
// client keeps its card until "insert" or its next connection.
func (v *vscardSlot) hold() (string, error) {
	had, err := v.app.remove(v.slot)
	if err != nil {
		return "", err
	}
	if !had {
		return "", errors.New("no card inserted")
	}
	v.mu.Lock()
	v.held = true
	v.mu.Unlock()
	return "card removed (the VSCard client keeps it; 'insert' puts it back)", nil
}

// describe is the line "list" shows under the slot.
func (v *vscardSlot) describe() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	s := fmt.Sprintf("no VSCard client (waiting on %s)", v.addr)
	if v.host != nil {
		s = fmt.Sprintf("VSCard client %s connected since %s", v.peer, v.since.Format(time.RFC3339))
		switch {
		case v.atr == nil:
			s += ", no card"
		case v.held:
			s += fmt.Sprintf(", card removed by 'remove' (ATR %X)", v.atr)
		default:
			s += fmt.Sprintf(", card ATR %X", v.atr)
		}
	}
	s += fmt.Sprintf(", %d client(s) so far", v.clients)
	if v.lastErr != "" {
		s += ", last error: " + v.lastErr
	}
	return s
}

// hostCard is a VSCard client's card as the reader's card.Card.
type hostCard struct {
	h   *vscard.Host
	atr []byte
	log *slog.Logger
}

func (c *hostCard) ATR() []byte { return c.atr }

// PowerOn, PowerOff and Reset do nothing: VSCard has no message for them,
// and QEMU's ccid-card-passthru does not tell the client either; the
// client's card stays powered while it is inserted.
func (c *hostCard) PowerOn()  {}
func (c *hostCard) PowerOff() {}
func (c *hostCard) Reset()    {}

// swWrongLength is 67 00: what the guest gets for a command the client
// cannot take.
var swWrongLength = []byte{0x67, 0x00}

func (c *hostCard) Transmit(ctx context.Context, cmd []byte) ([]byte, error) {
	resp, err := c.h.Transmit(ctx, vscard.MinimalReaderID, cmd)
	if errors.Is(err, vscard.ErrAPDUTooLong) {
		// vscclient reads messages into a 270-byte buffer with no bounds
		// check (protocols.md §2.3); the Host refuses to send more. The
		// guest's extended APDU gets a protocol answer, wrong length, so
		// that its middleware can fall back to chaining, rather than a
		// reader error.
		c.log.Warn("command APDU too long for a VSCard client; answered 67 00", "len", len(cmd), "limit", vscard.DefaultMaxAPDU)
		return append([]byte(nil), swWrongLength...), nil
	}
	var ae *vscard.APDUError
	if errors.As(err, &ae) {
		// The client could not process this one command (vscclient's
		// Error answer). QEMU fails the XfrBlock; here a Transmit error
		// would mean the card is gone (the reader takes it out), so the
		// guest gets "no precise diagnosis" and the card stays: a client
		// whose card really went away sends CardRemove.
		c.log.Warn("VSCard client could not process the APDU; answered 6F 00", "code", ae.Code)
		return []byte{0x6F, 0x00}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("VSCard client: %w", err)
	}
	return resp, nil
}
