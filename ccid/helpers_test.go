package ccid

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"
)

// fakeCard is a card.Card whose answers a test chooses.
type fakeCard struct {
	atr        []byte
	delay      time.Duration // Transmit's
	powerDelay time.Duration // PowerOn's
	// answer gives the response; nil echoes the command's data and 90 00.
	answer func(cmd []byte) ([]byte, error)

	mu                 sync.Mutex
	on, off, reset, tx int
	active             int // Transmit calls in progress
	overlap            bool
}

// T=0 ATR like libcacard's (3B 8C ...), T=1 one with TCK.
var (
	atrT0 = []byte{0x3B, 0x8C, 0x80, 0x01, 0x50, 0x43, 0x41, 0x43, 0x20, 0x43, 0x61, 0x72, 0x64, 0x20, 0x20, 0x20, 0x28}
	atrT1 = []byte{0x3B, 0xF8, 0x13, 0x00, 0x00, 0x81, 0x31, 0xFE, 0x15, 0x59, 0x75, 0x62, 0x69, 0x6B, 0x65, 0x79, 0x34, 0xD4}
)

func newFake(atr []byte) *fakeCard { return &fakeCard{atr: atr} }

func (c *fakeCard) ATR() []byte { return c.atr }
func (c *fakeCard) PowerOn() {
	c.enter()
	c.mu.Lock()
	c.on++
	d := c.powerDelay
	c.mu.Unlock()
	time.Sleep(d)
	c.leave()
}
func (c *fakeCard) PowerOff() { c.enter(); c.mu.Lock(); c.off++; c.mu.Unlock(); c.leave() }
func (c *fakeCard) Reset()    { c.enter(); c.mu.Lock(); c.reset++; c.mu.Unlock(); c.leave() }

// enter and leave bracket a card call; two at once mean the reader broke
// card.Card's one-caller-at-a-time rule.
func (c *fakeCard) enter() {
	c.mu.Lock()
	c.active++
	if c.active > 1 {
		c.overlap = true
	}
	c.mu.Unlock()
	time.Sleep(10 * time.Microsecond) // widen the window
}

func (c *fakeCard) leave() { c.mu.Lock(); c.active--; c.mu.Unlock() }

func (c *fakeCard) Transmit(ctx context.Context, cmd []byte) ([]byte, error) {
	c.enter()
	defer c.leave()
	c.mu.Lock()
	c.tx++
	c.mu.Unlock()
	if c.delay > 0 {
		select {
		case <-time.After(c.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if c.answer != nil {
		return c.answer(cmd)
	}
	out := append([]byte(nil), cmd...)
	return append(out, 0x90, 0x00), nil
}

func (c *fakeCard) counts() (on, off, reset, tx int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.on, c.off, c.reset, c.tx
}

// frame builds a PC_to_RDR message.
func frame(typ, slot, seq, b7, b8, b9 byte, data []byte) []byte {
	f := []byte{typ, 0, 0, 0, 0, slot, seq, b7, b8, b9}
	binary.LittleEndian.PutUint32(f[1:], uint32(len(data)))
	return append(f, data...)
}

// rsp is a decoded RDR_to_PC message.
type rsp struct {
	typ, slot, seq, status, err, b9 byte
	data                            []byte
}

func parseRsp(t testing.TB, m []byte) rsp {
	t.Helper()
	if len(m) < 10 {
		t.Fatalf("response % X shorter than a header", m)
	}
	if n := binary.LittleEndian.Uint32(m[1:]); int(n) != len(m)-10 {
		t.Fatalf("response dwLength %d, carries %d bytes", n, len(m)-10)
	}
	return rsp{m[0], m[5], m[6], m[7], m[8], m[9], m[10:]}
}

// host drives a Reader as a CCID host driver would.
type host struct {
	t   testing.TB
	r   *Reader
	seq byte
}

func newHost(t testing.TB, opts *Options) *host {
	r := New(opts)
	r.timeExt = time.Hour // tests that want time extensions set it
	return &host{t: t, r: r}
}

// read returns the next bulk IN message, whole.
func (h *host) read() []byte {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := h.r.In(ctx, epBulkIn, 1<<20)
	if err != nil {
		h.t.Fatalf("bulk IN: %v", err)
	}
	return b
}

// noRead asserts that nothing is queued on bulk IN.
func (h *host) noRead() {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if b, err := h.r.In(ctx, epBulkIn, 1<<20); !errors.Is(err, context.DeadlineExceeded) {
		h.t.Fatalf("unexpected bulk IN: % X, %v", b, err)
	}
}

// cmd sends one command and returns its (final) answer, checking bSeq
// and bSlot are echoed.
func (h *host) cmd(typ, slot, b7 byte, data []byte) rsp {
	h.t.Helper()
	h.seq++
	if err := h.r.Out(context.Background(), epBulkOut, frame(typ, slot, h.seq, b7, 0, 0, data)); err != nil {
		h.t.Fatalf("bulk OUT: %v", err)
	}
	r := parseRsp(h.t, h.read())
	if r.seq != h.seq || r.slot != slot {
		h.t.Fatalf("answer slot %d seq %d, want %d %d", r.slot, r.seq, slot, h.seq)
	}
	return r
}

func (h *host) powerOn(slot byte) rsp {
	h.t.Helper()
	r := h.cmd(cmdIccPowerOn, slot, 0, nil)
	if r.status != 0 {
		h.t.Fatalf("IccPowerOn: bStatus %02X bError %02X", r.status, r.err)
	}
	return r
}
