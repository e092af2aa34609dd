// Package vpcd inserts a vscard card into pcscd through vsmartcard's vpcd
// reader driver (Debian package vsmartcard-vpcd).
//
// # Model
//
// vpcd runs inside pcscd and listens on TCP port 35963+slot (DefaultAddr is
// slot 0). The card side — vscard — connects in; an open connection is a
// card in the reader "Virtual PCD 00 0<slot>", and closing the connection is
// pulling the card out (peers.md §2.1). vpcd always speaks first and the
// card only answers. Every message in both directions is a 2-byte
// big-endian length followed by the payload:
//
//   - a 1-byte payload from vpcd is a control message: 00 power off, 01 power
//     on, 02 reset (no reply), 04 get ATR (reply: the ATR);
//   - any longer payload is a command APDU; the reply is the response APDU.
//
// Serve keeps the card inserted for as long as its context lives: it
// connects, reconnects with exponential backoff when pcscd is not up yet or
// restarts, and closes the connection (removing the card) when the context
// ends. ServeConn runs the protocol on one connection that the caller made.
//
// # Latency
//
// vpcd sends the length and the payload with two send() calls and without
// TCP_NODELAY, so with stock TCP every APDU waits ~40 ms for a delayed ACK
// (peers.md §4). This package answers each message with a single write and
// re-arms TCP_QUICKACK after every read (internal/netutil), which brings a
// round trip down to about a tenth of a millisecond.
package vpcd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"syscall"
	"time"

	"github.com/vscard/vscard/card"
)

// DefaultPort is vpcd's port for slot 0; slot n listens on DefaultPort+n
// (VPCDPORT 0x8C7B, peers.md §2.1).
const DefaultPort = 35963

// DefaultAddr is where a stock pcscd with vsmartcard-vpcd listens for the
// card of slot 0.
const DefaultAddr = "127.0.0.1:35963"

// ErrCardFailed is wrapped by the error ServeConn and Serve return when the
// card's Transmit failed: by card.Card's contract the card can no longer
// answer at all, so reconnecting would only insert a dead card again.
var ErrCardFailed = errors.New("vpcd: card failed")

// Options configures Serve and ServeConn. The zero value (or nil) is ready
// to use.
type Options struct {
	// Logger receives connection events (waiting for vpcd, card inserted,
	// connection lost). Nil discards them. APDUs are never logged here;
	// see Trace.
	Logger *slog.Logger

	// Trace, if set, is called once per message from vpcd, after the
	// answer has been sent. PIN data is removed from the event before the call
	// (see TraceEvent). JSONTrace makes a Trace that writes JSON lines.
	Trace func(TraceEvent)

	// Dial makes the connection to vpcd. Nil uses a net.Dialer with a
	// 10-second timeout.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	// MinBackoff and MaxBackoff bound the wait between connection
	// attempts; each failure doubles the wait, and each wait is jittered
	// down by up to half so that several slots do not retry in lockstep.
	// Zero means 100 ms and 5 s.
	MinBackoff, MaxBackoff time.Duration

	// firstPoll overrides how long Serve waits for vpcd's first message
	// before warning; tests shorten it.
	firstPoll time.Duration

	// noQuickAck turns the TCP_QUICKACK re-arm off, so that benchmarks can
	// show the stall it prevents.
	noQuickAck bool
}

func (o *Options) withDefaults() Options {
	var r Options
	if o != nil {
		r = *o
	}
	if r.Logger == nil {
		r.Logger = slog.New(slog.DiscardHandler)
	}
	if r.Dial == nil {
		d := &net.Dialer{Timeout: 10 * time.Second}
		r.Dial = d.DialContext
	}
	if r.MinBackoff <= 0 {
		r.MinBackoff = 100 * time.Millisecond
	}
	if r.MaxBackoff <= 0 {
		r.MaxBackoff = 5 * time.Second
	}
	r.MaxBackoff = max(r.MaxBackoff, r.MinBackoff)
	return r
}

// pollWait is how long a connected card may go unpolled before Serve warns.
// pcscd polls every 400 ms (peers.md §2.2) and asks for the ATR at once on
// connect, so 5 s of silence means vpcd is not serving this connection.
func (o *Options) pollWait() time.Duration {
	if o.firstPoll > 0 {
		return o.firstPoll
	}
	return 5 * time.Second
}

// Serve connects to vpcd at addr (host:port, e.g. DefaultAddr) and serves c
// until ctx is done. While vpcd cannot be reached, or after the connection
// drops (pcscd restarted), it retries with exponential backoff. When ctx is
// done it closes the connection, which vpcd sees as the card being
// removed, and returns nil.
//
// Serve returns an error only for problems retrying cannot fix: a malformed
// address, or a card whose Transmit failed (the error wraps ErrCardFailed).
func Serve(ctx context.Context, addr string, c card.Card, opts *Options) error {
	if err := checkAddr(addr); err != nil {
		return err
	}
	o := opts.withDefaults()
	log := o.Logger.With("addr", addr)

	backoff := o.MinBackoff
	lastReason := "" // the connect error last logged at Info
	for {
		nc, err := o.Dial(ctx, "tcp", addr)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if !retryable(err) {
				return fmt.Errorf("vpcd: connect to %s: %w", addr, err)
			}
			wait := jitter(backoff)
			// Say once what we are waiting for, and again only when the
			// reason changes: pcscd may legitimately be down for hours.
			reason := dialReason(err)
			level := slog.LevelDebug
			if reason != lastReason {
				level = slog.LevelInfo
				lastReason = reason
			}
			log.Log(ctx, level, "waiting for vpcd", "reason", reason, "retry_in", wait)
			if !sleep(ctx, wait) {
				return nil
			}
			backoff = min(2*backoff, o.MaxBackoff)
			continue
		}

		lastReason = ""
		// The TCP connect alone does not insert the card: vpcd serves one
		// card per slot, and a second one waits in its listen backlog
		// unanswered. vpcd's first GetATR poll is the insertion.
		log.Debug("connected to vpcd; waiting for its first poll")
		slow := time.AfterFunc(o.pollWait(), func() {
			log.Warn("connected to vpcd, but it has not polled the card; is another card in this slot?")
		})
		served, err := serveConn(ctx, nc, c, &o, func() {
			slow.Stop()
			log.Info("card inserted in vpcd")
		})
		slow.Stop()
		if ctx.Err() != nil {
			log.Info("card removed from vpcd")
			return nil
		}
		if errors.Is(err, ErrCardFailed) {
			log.Error("card failed; removed from vpcd", "err", err)
			return err
		}
		if served {
			// The link worked; a drop now is most likely a pcscd restart,
			// which deserves a quick reconnect.
			backoff = o.MinBackoff
		}
		wait := jitter(backoff)
		if served {
			log.Warn("vpcd connection lost; card removed", "err", err, "retry_in", wait)
		} else {
			log.Warn("vpcd dropped the connection before polling the card", "err", err, "retry_in", wait)
		}
		if !sleep(ctx, wait) {
			return nil
		}
		// A peer that accepts and hangs up at once must not make us spin.
		backoff = min(2*backoff, o.MaxBackoff)
	}
}

// checkAddr rejects addresses that no amount of retrying will make
// reachable. The port must be numeric: vpcd ports have no service names.
func checkAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err == nil {
		var n uint64
		if n, err = strconv.ParseUint(port, 10, 16); err == nil && n == 0 {
			err = errors.New("port 0")
		}
	}
	if err != nil {
		return fmt.Errorf("vpcd: address %q: %w", addr, err)
	}
	return nil
}

// retryable reports whether a dial error may go away by itself (pcscd not
// started yet, network not up, name not resolvable yet). Address syntax
// errors never do.
func retryable(err error) bool {
	var addrErr *net.AddrError
	var parseErr *net.ParseError
	var netErr net.UnknownNetworkError
	return !errors.As(err, &addrErr) && !errors.As(err, &parseErr) && !errors.As(err, &netErr)
}

// dialReason is the short cause of a dial failure ("connection refused")
// rather than the full "dial tcp 127.0.0.1:35963: connect: ..." chain,
// which repeats the address the log line already carries.
func dialReason(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return dnsErr.Error()
	}
	return err.Error()
}

// jitter picks a wait in [d/2, d].
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}

// sleep waits for d and reports whether ctx is still alive.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
