// Package fakehost is a stand-in for QEMU 7.2's ccid-card-passthru, for
// tests of VSCard clients (vscard connect, vscclient). It is written from
// the wire format in protocols.md §1 independently of package vscard, so a
// misunderstanding shared by both ends of vscard cannot hide in a test.
package fakehost

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// A Host plays QEMU 7.2's ccid-card-passthru on one connection, written
// from the wire format in protocols.md §1 independently of package vscard,
// so a shared misunderstanding cannot hide in both ends. It acknowledges
// ReaderRemove, ReaderAdd, ATR and CardRemove with Error(0) as QEMU does
// (protocols.md §1.5) and hands every message it got to the test.
type Host struct {
	t    testing.TB
	conn net.Conn
	msgs chan Msg
}

type Msg struct {
	Type, Reader uint32
	Payload      []byte
	Err          error // read error (io.EOF when the client closed)
}

const (
	TInit         = 1
	TError        = 2
	TReaderAdd    = 3
	TReaderRemove = 4
	TATR          = 5
	TCardRemove   = 6
	TAPDU         = 7
)

func Write(w io.Writer, typ, reader uint32, payload []byte) error {
	b := binary.BigEndian.AppendUint32(nil, typ)
	b = binary.BigEndian.AppendUint32(b, reader)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	_, err := w.Write(append(b, payload...))
	return err
}

func Read(r io.Reader) (Msg, error) {
	var h [12]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Msg{}, err
	}
	n := binary.BigEndian.Uint32(h[8:])
	if n > 65536 {
		return Msg{}, fmt.Errorf("payload length %d", n)
	}
	m := Msg{Type: binary.BigEndian.Uint32(h[:]), Reader: binary.BigEndian.Uint32(h[4:]), Payload: make([]byte, n)}
	_, err := io.ReadFull(r, m.Payload)
	return m, err
}

var InitPayload = []byte{'V', 'S', 'C', 'D', 0, 0, 0, 2, 0, 0, 0, 0}

// Accept accepts one connection on ln and serves it as QEMU would.
func Accept(t testing.TB, ln net.Listener) *Host {
	t.Helper()
	if dl, ok := ln.(interface{ SetDeadline(time.Time) error }); ok {
		dl.SetDeadline(time.Now().Add(20 * time.Second))
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatalf("fake host: accept: %v", err)
	}
	return Serve(t, c)
}

func Serve(t testing.TB, c net.Conn) *Host {
	h := &Host{t: t, conn: c, msgs: make(chan Msg, 64)}
	t.Cleanup(func() { c.Close() })
	go func() {
		for {
			m, err := Read(c)
			if err != nil {
				h.msgs <- Msg{Err: err}
				close(h.msgs)
				return
			}
			switch m.Type {
			case TInit:
				Write(c, TInit, 0xFFFFFFFF, InitPayload)
			case TReaderAdd:
				Write(c, TError, 0, []byte{0, 0, 0, 0})
			case TReaderRemove, TATR, TCardRemove:
				Write(c, TError, m.Reader, []byte{0, 0, 0, 0})
			}
			h.msgs <- m
		}
	}()
	return h
}

// next returns the next message from the client.
func (h *Host) Next() Msg {
	h.t.Helper()
	select {
	case m, ok := <-h.msgs:
		if !ok {
			h.t.Fatal("fake host: connection already closed")
		}
		return m
	case <-time.After(20 * time.Second):
		h.t.Fatal("fake host: no message from the client within 20 s")
	}
	return Msg{}
}

// expect reads the next message and checks its type.
func (h *Host) Expect(typ uint32) Msg {
	h.t.Helper()
	m := h.Next()
	if m.Err != nil {
		h.t.Fatalf("fake host: want message type %d, got read error %v", typ, m.Err)
	}
	if m.Type != typ {
		h.t.Fatalf("fake host: got message type %d (payload % x), want %d", m.Type, m.Payload, typ)
	}
	return m
}

// handshake checks the client's opening sequence (protocols.md §2.3):
// Init, ReaderRemove, ReaderAdd with the reader name, ATR. It returns the
// ATR.
func (h *Host) Handshake(readerName string) []byte {
	h.t.Helper()
	m := h.Expect(TInit)
	if !bytes.Equal(m.Payload[:8], InitPayload[:8]) || len(m.Payload) < 12 {
		h.t.Fatalf("Init payload % x", m.Payload)
	}
	h.Expect(TReaderRemove)
	m = h.Expect(TReaderAdd)
	if string(m.Payload) != readerName {
		h.t.Errorf("ReaderAdd name %q, want %q", m.Payload, readerName)
	}
	return h.Expect(TATR).Payload
}

// apdu sends a command APDU and returns the response.
func (h *Host) APDU(cmd []byte) []byte {
	h.t.Helper()
	if err := Write(h.conn, TAPDU, 0, cmd); err != nil {
		h.t.Fatal(err)
	}
	return h.Expect(TAPDU).Payload
}

// expectClose checks that the client closed the connection.
func (h *Host) ExpectClose() {
	h.t.Helper()
	m := h.Next()
	if m.Err == nil {
		h.t.Fatalf("fake host: got message type %d, want the connection closed", m.Type)
	}
}

// SelectACA is the SELECT of the CAC ACA applet, answered 61 0D by a
// libcacard card (peers.md §1.4).
var SelectACA = []byte{0x00, 0xa4, 0x04, 0x00, 0x07, 0xa0, 0x00, 0x00, 0x00, 0x79, 0x03, 0x00}

// Close drops the connection, as QEMU does when it exits.
func (h *Host) Close() error { return h.conn.Close() }
