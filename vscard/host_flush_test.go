package vscard

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"
)

// TestHostFlush: Flush waits for FlushComplete; a Flush that gave up (as
// with vscclient, which answers a Flush only when more bytes arrive) does
// not hold the line, and its late FlushComplete neither completes the next
// Flush nor disturbs the next Transmit.
func TestHostFlush(t *testing.T) {
	r := startHost(t, nil)
	go func() {
		for range r.h.Events() {
		}
	}()
	r.client.Write(msg(MsgATR, 0, cacATR))
	expectMsg(t, r.client, MsgError, 0, ErrorPayload(CodeOK))

	// A client that answers.
	done := make(chan error, 1)
	go func() { done <- r.h.Flush(context.Background()) }()
	expectMsg(t, r.client, MsgFlush, 0, nil)
	select {
	case err := <-done:
		t.Fatalf("Flush returned %v before FlushComplete", err)
	case <-time.After(20 * time.Millisecond):
	}
	r.client.Write(msg(MsgFlushComplete, 0, nil))
	if err := <-done; err != nil {
		t.Fatalf("Flush: %v", err)
	}

	// A client that sits on it, like vscclient.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if err := r.h.Flush(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("unanswered Flush: %v", err)
	}
	expectMsg(t, r.client, MsgFlush, 0, nil)

	// The next Transmit goes out at once; the client answers the old Flush
	// first, then the APDU.
	resp := make(chan []byte, 1)
	go func() {
		b, err := r.h.Transmit(context.Background(), 0, []byte{0, 0xB0, 0, 0})
		if err != nil {
			t.Error(err)
		}
		resp <- b
	}()
	expectMsg(t, r.client, MsgAPDU, 0, []byte{0, 0xB0, 0, 0})
	r.client.Write(msg(MsgFlushComplete, 0, nil))
	r.client.Write(msg(MsgAPDU, 0, []byte{0x90, 0x00}))
	if b := <-resp; !bytes.Equal(b, []byte{0x90, 0x00}) {
		t.Fatalf("Transmit after an abandoned Flush: %X", b)
	}

	// Two abandoned Flushes, then one answered: only the third
	// FlushComplete completes it.
	for range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
		r.h.Flush(ctx)
		cancel()
		expectMsg(t, r.client, MsgFlush, 0, nil)
	}
	// The first abandoned Flush's answer came above; two are owed now.
	go func() { done <- r.h.Flush(context.Background()) }()
	expectMsg(t, r.client, MsgFlush, 0, nil)
	r.client.Write(msg(MsgFlushComplete, 0, nil))
	r.client.Write(msg(MsgFlushComplete, 0, nil))
	select {
	case err := <-done:
		t.Fatalf("Flush completed by an abandoned Flush's answer: %v", err)
	case <-time.After(30 * time.Millisecond):
	}
	r.client.Write(msg(MsgFlushComplete, 0, nil))
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Flush not completed by its own FlushComplete")
	}

	// After the link ends, Flush fails at once.
	r.client.Close()
	<-r.served
	if err := r.h.Flush(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Flush after close: %v", err)
	}
}

// TestHostWithRealClient runs vscard's own Client against the Host: Flush
// is answered, a response longer than 270 bytes comes back whole, a
// command longer than 270 bytes never leaves the host, and the card's
// removal and the client's exit reach the events.
func TestHostWithRealClient(t *testing.T) {
	ln, dial := listen(t)
	big := bytes.Repeat([]byte{0xA5}, 1024)
	cd := &fakeCard{respond: func(_ context.Context, cmd []byte) ([]byte, error) {
		if cmd[1] == 0xB0 {
			return append(append([]byte(nil), big...), 0x90, 0x00), nil
		}
		return []byte{cmd[1], 0x90, 0x00}, nil
	}}
	cl := NewClient(dial, cd, &ClientOptions{ReaderName: "r"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runDone := make(chan error, 1)
	go func() { runDone <- cl.Run(ctx) }()

	h := NewHost(accept(t, ln), nil)
	hctx, hcancel := context.WithCancel(context.Background())
	defer hcancel()
	served := make(chan error, 1)
	go func() { served <- h.Serve(hctx) }()
	var evs []HostEvent
	next := func() HostEvent {
		t.Helper()
		select {
		case ev := <-h.Events():
			evs = append(evs, ev)
			return ev
		case <-time.After(5 * time.Second):
			t.Fatalf("no host event after %#v", evs)
			return nil
		}
	}
	if _, ok := next().(ReaderAdded); !ok {
		t.Fatalf("events %#v", evs)
	}
	if _, ok := next().(CardInserted); !ok {
		t.Fatalf("events %#v", evs)
	}

	tests := []struct {
		name     string
		cmd      []byte
		wantResp []byte
		wantErr  error
	}{
		{"short", []byte{0, 0xA4, 4, 0, 0}, []byte{0xA4, 0x90, 0x00}, nil},
		{"1024-byte response", []byte{0, 0xB0, 0, 0, 0, 0x04, 0}, append(append([]byte(nil), big...), 0x90, 0x00), nil},
		{"270-byte command", append([]byte{0, 0x2A, 0x9E, 0x9A, 0, 1, 0x05}, make([]byte, 263)...), []byte{0x2A, 0x90, 0x00}, nil},
		{"271-byte command", append([]byte{0, 0x2A, 0x9E, 0x9A, 0, 1, 0x06}, make([]byte, 264)...), nil, ErrAPDUTooLong},
	}
	for _, tt := range tests {
		tctx, tcancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := h.Transmit(tctx, 0, tt.cmd)
		tcancel()
		if !errors.Is(err, tt.wantErr) || !bytes.Equal(resp, tt.wantResp) {
			t.Errorf("%s: Transmit = %X, %v; want %X, %v", tt.name, resp, err, tt.wantResp, tt.wantErr)
		}
	}
	fctx, fcancel := context.WithTimeout(ctx, 5*time.Second)
	if err := h.Flush(fctx); err != nil {
		t.Errorf("Flush to vscard.Client: %v", err)
	}
	fcancel()
	if got := cl.Status().APDUs; got != 3 {
		t.Errorf("client handled %d APDUs, want 3 (the 271-byte one must not reach it)", got)
	}

	if err := cl.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, ok := next().(CardRemoved); !ok {
		t.Fatalf("events %#v", evs)
	}
	cancel()
	waitRun(t, runDone)
	for {
		if _, ok := next().(Closed); ok {
			break
		}
	}
	<-served
}

// TestHostAPDUError: a client's Error answer to an APDU, in vscclient's
// host byte order, is an *APDUError with the code, and the link and the
// card stay usable.
func TestHostAPDUError(t *testing.T) {
	r := startHost(t, nil)
	go func() {
		for range r.h.Events() {
		}
	}()
	r.client.Write(msg(MsgATR, 0, cacATR))
	expectMsg(t, r.client, MsgError, 0, ErrorPayload(CodeOK))
	for _, tt := range []struct {
		payload []byte
		want    ErrorCode
	}{
		{[]byte{1, 0, 0, 0}, CodeGeneralError},     // vscclient, little-endian host
		{[]byte{0, 0, 0, 2}, CodeCannotAddReaders}, // network order
		{[]byte{0xFF}, CodeGeneralError},           // malformed
	} {
		go func() {
			expectMsg(t, r.client, MsgAPDU, 0, []byte{0, 1, 2, 3})
			r.client.Write(msg(MsgError, 0, tt.payload))
		}()
		_, err := r.h.Transmit(context.Background(), 0, []byte{0, 1, 2, 3})
		var ae *APDUError
		if !errors.As(err, &ae) || ae.Code != tt.want {
			t.Errorf("Error % X: Transmit err %v, want APDUError %v", tt.payload, err, tt.want)
		}
	}
	go func() {
		expectMsg(t, r.client, MsgAPDU, 0, []byte{0, 1, 2, 3})
		r.client.Write(msg(MsgAPDU, 0, []byte{0x90, 0x00}))
	}()
	if resp, err := r.h.Transmit(context.Background(), 0, []byte{0, 1, 2, 3}); err != nil || !bytes.Equal(resp, []byte{0x90, 0x00}) {
		t.Fatalf("after Errors: %X %v", resp, err)
	}
}
