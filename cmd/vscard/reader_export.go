package main

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vscard/vscard/internal/netutil"
	"github.com/vscard/vscard/usbip"
	"github.com/vscard/vscard/usbredir"
)

// Backoff of the usbredir dialer while QEMU is down or restarting.
const (
	usbredirMinBackoff = 250 * time.Millisecond
	usbredirMaxBackoff = 5 * time.Second
	// A session shorter than this does not reset the backoff: a QEMU that
	// takes the connection and drops it must not be redialled in a loop.
	usbredirStable = 5 * time.Second
	// attachPoll is how often an export waiting for the other one to let
	// the reader go looks again.
	attachPoll = 500 * time.Millisecond
)

// usbredirExport prepares --usbredir: it listens at once with --listen
// (a listen failure is a startup error), and returns the loop to run.
func (a *readerApp) usbredirExport(t target) (func(ctx context.Context) error, error) {
	var tlsCfg *tls.Config
	if a.cfg.usbredirTLSDir != "" {
		var err error
		if tlsCfg, err = usbredirTLSConfig(a.cfg.usbredirTLSDir, a.cfg.usbredirListen, t); err != nil {
			return nil, err
		}
	}
	if !a.cfg.usbredirListen {
		e := a.export("usbredir", t.String(), "QEMU not connected yet (connecting)")
		return func(ctx context.Context) error { return a.usbredirDial(ctx, t, tlsCfg, e) }, nil
	}
	ln, err := listenTarget(t)
	if err != nil {
		return nil, fmt.Errorf("--usbredir --listen: %w", err)
	}
	a.lns = append(a.lns, ln)
	e := a.export("usbredir", t.String(), "QEMU not connected yet (listening)")
	return func(ctx context.Context) error { return a.usbredirListen(ctx, ln, t, tlsCfg, e) }, nil
}

// usbredirSession serves one QEMU on nc and releases the reader after.
func (a *readerApp) usbredirSession(ctx context.Context, nc net.Conn, e *exportState) error {
	peer := peerName(nc)
	a.setExport(e, "QEMU connected", peer)
	a.log.Info("QEMU connected over usbredir; the reader is attached to it", "peer", peer)
	err := usbredir.Serve(ctx, nc, a.rd, &usbredir.Options{Logger: a.log.With("export", "usbredir")})
	nc.Close()
	a.att.release("usbredir")
	if ctx.Err() == nil {
		a.log.Info("QEMU disconnected from usbredir", "err", err)
	}
	return err
}

// usbredirDial connects to QEMU's server chardev, and again whenever
// QEMU goes away, until ctx ends.
func (a *readerApp) usbredirDial(ctx context.Context, t target, tlsCfg *tls.Config, e *exportState) error {
	dial := dialer(t, tlsCfg)
	backoff := usbredirMinBackoff
	loggedWait, loggedDown, loggedTLS := false, false, false
	for ctx.Err() == nil {
		// Look before dialling, and claim only once QEMU answers: a dialer
		// that merely tries must not turn a USB/IP attach away.
		if who := a.att.holder(); who != "" && who != "usbredir" {
			if !loggedWait {
				a.setExport(e, "waiting: the reader is attached over "+who, "")
				a.log.Info("usbredir waits: the reader is attached over "+who+"; it connects to QEMU when that ends", "target", t.String())
				loggedWait = true
			}
			if !sleep(ctx, attachPoll) {
				break
			}
			continue
		}
		loggedWait = false
		nc, err := dial(ctx)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			a.setExport(e, "QEMU not connected yet (retrying): "+err.Error(), "")
			switch tlsErr := errors.Is(err, errTLSHandshake); {
			case tlsErr && !loggedTLS:
				// Said once: every retry fails alike until the files change.
				a.log.Warn("QEMU's usbredir chardev answered, but the TLS handshake failed: check --usbredir-tls-dir against QEMU's tls-creds-x509; retrying with backoff",
					"target", t.String(), "err", err)
				loggedTLS = true
			case !tlsErr && !loggedDown:
				a.log.Info("QEMU not connected yet: its usbredir chardev does not answer; retrying with backoff",
					"target", t.String(), "err", err)
				loggedDown = true
			default:
				a.log.Debug("QEMU's usbredir chardev still refuses the link", "target", t.String(), "err", err, "retry_in", backoff)
			}
			if !sleep(ctx, backoff) {
				break
			}
			backoff = min(2*backoff, usbredirMaxBackoff)
			continue
		}
		if ok, _ := a.att.acquire("usbredir"); !ok {
			// A USB/IP client attached while we dialled.
			nc.Close()
			continue
		}
		loggedDown, loggedTLS = false, false
		start := time.Now()
		a.usbredirSession(ctx, nc, e)
		if ctx.Err() != nil {
			break
		}
		a.setExport(e, "QEMU not connected (reconnecting)", "")
		if time.Since(start) >= usbredirStable {
			backoff = usbredirMinBackoff
		}
		a.log.Info("reconnecting to QEMU's usbredir chardev", "target", t.String(), "in", backoff)
		if !sleep(ctx, backoff) {
			break
		}
		backoff = min(2*backoff, usbredirMaxBackoff)
	}
	a.setExport(e, "stopped", "")
	return nil
}

// usbredirListen waits for QEMU to connect (a client chardev), one QEMU
// at a time.
func (a *readerApp) usbredirListen(ctx context.Context, ln net.Listener, t target, tlsCfg *tls.Config, e *exportState) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	a.setExport(e, "QEMU not connected yet (listening)", "")
	a.log.Info("QEMU not connected yet; waiting for it on the usbredir socket", "listen", t.String())
	delay := 5 * time.Millisecond
	var busy atomic.Bool // a QEMU is served
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if isTemporary(err) {
				time.Sleep(delay)
				delay = min(2*delay, time.Second)
				continue
			}
			return fmt.Errorf("--usbredir --listen: accept: %w", err)
		}
		delay = 5 * time.Millisecond
		if busy.Load() {
			// usbredir carries one device to one peer.
			a.log.Warn("a second QEMU connected over usbredir while one is served; closing it", "peer", peerName(nc))
			nc.Close()
			continue
		}
		if ok, who := a.att.acquire("usbredir"); !ok {
			a.log.Warn("QEMU connected over usbredir while the reader is attached over "+who+"; closing the connection", "peer", peerName(nc))
			nc.Close()
			continue
		}
		busy.Store(true)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer busy.Store(false)
			if tlsCfg != nil {
				// Quick ACKs on the raw socket, under TLS (as dialer does).
				tc, err := serverHandshake(ctx, netutil.LowLatency(nc), tlsCfg)
				if err != nil {
					a.att.release("usbredir")
					a.log.Warn("QEMU's TLS handshake on the usbredir socket failed; waiting for it to connect again",
						"peer", peerName(nc), "err", err)
					return
				}
				nc = tc
			}
			a.usbredirSession(ctx, nc, e)
			if ctx.Err() == nil {
				a.setExport(e, "QEMU not connected (listening)", "")
				a.log.Info("waiting for QEMU to connect again", "listen", t.String())
			}
		}()
	}
}

// usbipExport prepares --usbip: the server with the reader under busid,
// listening at once.
func (a *readerApp) usbipExport(addr, busid string) (func(ctx context.Context) error, error) {
	srv := usbip.NewServer(&usbip.Options{Logger: a.log.With("export", "usbip")})
	if err := srv.Add(busid, a.rd); err != nil {
		return nil, fmt.Errorf("--usbip: %w", err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--usbip: listen on %s: %w", addr, err)
	}
	a.lns = append(a.lns, ln)
	e := a.export("usbip", ln.Addr().String()+" busid "+busid, "no USB/IP client attached yet")
	a.mu.Lock()
	a.usbipAddr = ln.Addr()
	a.mu.Unlock()
	return func(ctx context.Context) error {
		host, port, _ := net.SplitHostPort(ln.Addr().String())
		a.setExport(e, "no USB/IP client attached yet", "")
		a.log.Info("no USB/IP client attached yet; waiting for one", "listen", ln.Addr().String(), "busid", busid,
			"try", fmt.Sprintf("usbip --tcp-port %s attach -r %s -b %s", port, host, busid))
		gl := &importGate{Listener: ln, a: a, e: e}
		err := srv.Serve(ctx, gl)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			return fmt.Errorf("--usbip: %w", err)
		}
		return nil
	}, nil
}

// USB/IP operation codes (protocols.md §5).
const (
	opReqImport = 0x8003
	opHeaderLen = 8
)

// importGate is the USB/IP listener with the one-importer rule: a
// connection whose first request is OP_REQ_IMPORT claims the reader for
// as long as it lasts (the kernel's vhci keeps the connection for the
// attachment), and is closed at once when usbredir has it. Device lists
// (OP_REQ_DEVLIST) pass freely.
type importGate struct {
	net.Listener
	a *readerApp
	e *exportState
}

func (g *importGate) Accept() (net.Conn, error) {
	nc, err := g.Listener.Accept()
	if err != nil {
		return nil, err
	}
	// LowLatency here, on the *net.TCPConn: the server's own LowLatency
	// cannot see through the wrapper, and without quick ACKs each URB can
	// wait for a delayed ACK.
	return &gatedConn{Conn: netutil.LowLatency(nc), g: g}, nil
}

type gatedConn struct {
	net.Conn
	g *importGate

	// checked and head belong to the goroutine calling Read (one at a
	// time, as for any net.Conn reader).
	checked bool
	head    []byte // the peeked request header, not yet read by the server

	mu    sync.Mutex
	holds bool // this connection has the reader
}

func (c *gatedConn) Read(p []byte) (int, error) {
	if !c.checked {
		c.checked = true
		hdr := make([]byte, opHeaderLen)
		n, err := io.ReadFull(c.Conn, hdr)
		c.head = hdr[:n]
		if err == nil && binary.BigEndian.Uint16(hdr[2:]) == opReqImport {
			a := c.g.a
			if ok, who := a.att.acquire("usbip"); !ok {
				a.log.Warn("usbip attach refused: the reader is attached over "+who+"; detach it there first", "peer", peerName(c.Conn))
				c.Conn.Close()
				return 0, io.EOF
			}
			c.mu.Lock()
			c.holds = true
			c.mu.Unlock()
			a.setExport(c.g.e, "USB/IP client attached", peerName(c.Conn))
			a.log.Info("USB/IP client attached the reader", "peer", peerName(c.Conn))
		}
		if err != nil && n == 0 {
			return 0, err
		}
	}
	if len(c.head) > 0 {
		n := copy(p, c.head)
		c.head = c.head[n:]
		return n, nil
	}
	n, err := c.Conn.Read(p)
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		c.release()
	}
	return n, err
}

func (c *gatedConn) release() {
	c.mu.Lock()
	holds := c.holds
	c.holds = false
	c.mu.Unlock()
	if holds {
		a := c.g.a
		a.att.release("usbip")
		a.setExport(c.g.e, "no USB/IP client attached", "")
		a.log.Info("USB/IP client detached; waiting for a client")
	}
}

func (c *gatedConn) Close() error {
	c.release()
	return c.Conn.Close()
}

// removeStaleSocket removes a Unix socket file nobody listens on (left by
// a killed run), so that listening there works again. Anything else at
// the path is left alone and Listen reports it.
func removeStaleSocket(path string) {
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 {
		return
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return
	}
	os.Remove(path)
}

// sleep waits d or until ctx ends; it reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
