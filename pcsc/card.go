package pcsc

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"time"
)

// Card is a connection to the card in one reader (an SCARDHANDLE). Its
// calls go over its Context's socket and are serialised with the
// Context's other calls.
type Card struct {
	c      *Context
	h      int32
	reader string
	proto  Protocol
}

// Connect connects to the card in reader. With ShareShared other handles
// (in this or other programs) may connect too and take turns with
// BeginTransaction; ShareExclusive fails with ErrSharingViolation while
// any other handle is connected; ShareDirect reaches the reader even
// without a card (protocols may then be 0).
func (c *Context) Connect(reader string, mode ShareMode, protocols Protocol) (*Card, error) {
	const op = "connect"
	// libpcsclite refuses names longer than its fixed field; the last byte
	// is the NUL pcscd forces there.
	if len(reader) >= maxReaderName || strings.IndexByte(reader, 0) >= 0 || reader == "" {
		return nil, fmt.Errorf("pcsc: %s: reader name %q: %w", op, reader, ErrInvalidValue)
	}
	req := make([]uint32, 0, connectLen/4)
	req = append(req, c.hctx)
	var name [maxReaderName]byte
	copy(name[:], reader)
	for i := 0; i < maxReaderName; i += 4 {
		req = append(req, le.Uint32(name[i:]))
	}
	req = append(req, uint32(mode), uint32(protocols), 0, 0, 0)
	var reply [connectLen]byte

	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.exchange(op, request(cmdConnect, req, nil), reply[:]); err != nil {
		return nil, err
	}
	if h := u32(reply[:], 0); h != c.hctx {
		return nil, c.fail(op, malformed("context echo %#x, sent %#x", h, c.hctx))
	}
	if !bytes.Equal(reply[4:4+maxReaderName-1], name[:maxReaderName-1]) {
		return nil, c.fail(op, malformed("reader name not echoed"))
	}
	tail := reply[4+maxReaderName:]
	if rv := le.Uint32(tail[16:]); rv != 0 {
		return nil, Error(rv)
	}
	return &Card{c: c, h: int32(le.Uint32(tail[8:])), reader: reader, proto: Protocol(le.Uint32(tail[12:]))}, nil
}

// Protocol is the protocol negotiated by Connect or Reconnect.
func (k *Card) Protocol() Protocol {
	k.c.mu.Lock()
	defer k.c.mu.Unlock()
	return k.proto
}

// Reader is the name the card was connected with.
func (k *Card) Reader() string { return k.reader }

// Poll intervals while another handle holds the card. libpcsclite sleeps
// PCSCLITE_LOCK_POLL_RATE (100 ms) between tries; a guest and a host
// program taking turns APDU by APDU need much less, so start at 1 ms and
// back off to 20 ms for long holds.
const (
	pollMin = time.Millisecond
	pollMax = 20 * time.Millisecond
)

// retrySharing runs once (with the context locked) until it gives anything
// but SCARD_E_SHARING_VIOLATION, sleeping between tries with the lock
// released so the holder can finish; like libpcsclite's blocking sharing.
func (k *Card) retrySharing(ctx context.Context, op string, once func() (uint32, error)) error {
	delay, maxDelay := pollMin, pollMax
	if k.c.pollMax > 0 {
		delay, maxDelay = k.c.pollMax, k.c.pollMax
	}
	for {
		k.c.mu.Lock()
		rv, err := once()
		k.c.mu.Unlock()
		if err != nil {
			return err
		}
		if Error(rv) != ErrSharingViolation {
			if rv != 0 {
				return Error(rv)
			}
			return nil
		}
		if k.c.pollMax < 0 { // tests: no sleeping
			if ctx.Err() != nil {
				return fmt.Errorf("pcsc: %s: waiting for the card: %w: %w", op, ErrCancelled, ctx.Err())
			}
			continue
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("pcsc: %s: waiting for the card: %w: %w", op, ErrCancelled, ctx.Err())
		case <-t.C:
		}
		delay = min(delay*2, maxDelay)
	}
}

// checkHandle validates the hCard echo at the start of a reply.
func (k *Card) checkHandle(op string, reply []byte) error {
	if h := int32(u32(reply, 0)); h != k.h {
		return k.c.fail(op, malformed("card handle echo %#x, sent %#x", uint32(h), uint32(k.h)))
	}
	return nil
}

// Transmit sends one APDU with the PCI of the active protocol and returns
// the card's response (data and status word). Commands and responses may
// be extended APDUs up to MaxAPDU bytes. While another handle holds a
// transaction it waits, as libpcsclite does.
func (k *Card) Transmit(cmd []byte) ([]byte, error) {
	const op = "transmit"
	if len(cmd) == 0 {
		return nil, fmt.Errorf("pcsc: %s: empty command: %w", op, ErrInvalidParameter)
	}
	if len(cmd) > MaxAPDU {
		return nil, fmt.Errorf("pcsc: %s: %d-byte command, at most %d: %w", op, len(cmd), MaxAPDU, ErrInsufficientBuffer)
	}
	var resp []byte
	err := k.retrySharing(context.Background(), op, func() (uint32, error) {
		proto := k.proto
		if proto == ProtocolUndefined {
			proto = ProtocolAny
		}
		req := request(cmdTransmit, []uint32{uint32(k.h), uint32(proto), pciLength, uint32(len(cmd)),
			uint32(ProtocolAny), pciLength, MaxAPDU, 0}, cmd)
		var reply [transmitLen]byte
		if err := k.c.exchange(op, req, reply[:]); err != nil {
			return 0, err
		}
		if err := k.checkHandle(op, reply[:]); err != nil {
			return 0, err
		}
		if n := u32(reply[:], 3); n != uint32(len(cmd)) {
			return 0, k.c.fail(op, malformed("send length echo %d, sent %d", n, len(cmd)))
		}
		rv := u32(reply[:], 7)
		if rv != 0 {
			return rv, nil
		}
		n := u32(reply[:], 6)
		if n > MaxAPDU {
			return 0, k.c.fail(op, malformed("%d-byte response for a %d-byte buffer", n, MaxAPDU))
		}
		resp = make([]byte, n)
		if err := k.c.recv(op, resp); err != nil {
			return 0, err
		}
		return 0, nil
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

// Status reports the card's reader, state, protocol and ATR, as
// SCardStatus: pcscd checks the handle (ErrResetCard, ErrRemovedCard...)
// and the rest comes from its reader table. State holds the Card* bits
// with the reader's event counter in the upper 16 bits.
func (k *Card) Status() (CardStatus, error) {
	const op = "status"
	var st CardStatus
	err := k.retrySharing(context.Background(), op, func() (uint32, error) {
		t, err := k.c.readerTable(op)
		if err != nil {
			return 0, err
		}
		i := findReader(t, k.reader)
		if i < 0 {
			return uint32(ErrReaderUnavailable), nil
		}
		var reply [statusLen]byte
		if err := k.c.exchange(op, request(cmdStatus, []uint32{uint32(k.h), 0}, nil), reply[:]); err != nil {
			return 0, err
		}
		if err := k.checkHandle(op, reply[:]); err != nil {
			return 0, err
		}
		rv := u32(reply[:], 1)
		if rv != 0 && Error(rv) != ErrInsufficientBuffer {
			return rv, nil
		}
		e := t[i]
		st = CardStatus{
			Reader:   k.reader,
			State:    e.eventCounter<<16 + e.state,
			Protocol: Protocol(e.protocol),
			ATR:      e.atr,
		}
		return 0, nil
	})
	return st, err
}

// Reconnect renegotiates share mode and protocol, doing init to the card
// first (ResetCard: a warm reset, which other handles then see as
// ErrResetCard). It waits while another handle holds a transaction.
func (k *Card) Reconnect(mode ShareMode, protocols Protocol, init Disposition) error {
	const op = "reconnect"
	return k.retrySharing(context.Background(), op, func() (uint32, error) {
		var reply [reconnectLen]byte
		req := request(cmdReconnect, []uint32{uint32(k.h), uint32(mode), uint32(protocols), uint32(init), uint32(k.proto), 0}, nil)
		if err := k.c.exchange(op, req, reply[:]); err != nil {
			return 0, err
		}
		if err := k.checkHandle(op, reply[:]); err != nil {
			return 0, err
		}
		rv := u32(reply[:], 5)
		if rv == 0 {
			k.proto = Protocol(u32(reply[:], 4))
		}
		return rv, nil
	})
}

// simple runs a command whose reply is {hCard, ..., rv} with rv last.
func (k *Card) simple(op string, cmd uint32, fields []uint32, replyLen int) error {
	reply := make([]byte, replyLen)
	k.c.mu.Lock()
	defer k.c.mu.Unlock()
	if err := k.c.exchange(op, request(cmd, fields, nil), reply); err != nil {
		return err
	}
	if err := k.checkHandle(op, reply); err != nil {
		return err
	}
	if rv := u32(reply, replyLen/4-1); rv != 0 {
		return Error(rv)
	}
	return nil
}

// Disconnect ends the connection, doing d to the card.
func (k *Card) Disconnect(d Disposition) error {
	return k.simple("disconnect", cmdDisconnect, []uint32{uint32(k.h), uint32(d), 0}, disconnectLen)
}

// BeginTransaction takes the card for this handle alone until
// EndTransaction: other handles' calls wait (or fail with
// ErrSharingViolation in clients that do not wait). While another handle
// holds it, BeginTransaction polls, as libpcsclite does, but every 1 ms at
// first (backing off to 20 ms) rather than every 100 ms, so that programs
// taking turns APDU by APDU do not stall. It gives up when ctx ends.
func (k *Card) BeginTransaction(ctx context.Context) error {
	const op = "begin transaction"
	return k.retrySharing(ctx, op, func() (uint32, error) {
		var reply [beginLen]byte
		if err := k.c.exchange(op, request(cmdBeginTransaction, []uint32{uint32(k.h), 0}, nil), reply[:]); err != nil {
			return 0, err
		}
		if err := k.checkHandle(op, reply[:]); err != nil {
			return 0, err
		}
		return u32(reply[:], 1), nil
	})
}

// EndTransaction releases the card, doing d to it.
func (k *Card) EndTransaction(d Disposition) error {
	return k.simple("end transaction", cmdEndTransaction, []uint32{uint32(k.h), uint32(d), 0}, endLen)
}

// Control sends a control code (see CtlCode) with in to the reader driver
// and returns its answer, up to MaxAPDU bytes.
func (k *Card) Control(code uint32, in []byte) ([]byte, error) {
	const op = "control"
	if len(in) > MaxAPDU {
		return nil, fmt.Errorf("pcsc: %s: %d-byte input, at most %d: %w", op, len(in), MaxAPDU, ErrInsufficientBuffer)
	}
	req := request(cmdControl, []uint32{uint32(k.h), code, uint32(len(in)), MaxAPDU, 0, 0}, in)
	var reply [controlLen]byte
	k.c.mu.Lock()
	defer k.c.mu.Unlock()
	if err := k.c.exchange(op, req, reply[:]); err != nil {
		return nil, err
	}
	if err := k.checkHandle(op, reply[:]); err != nil {
		return nil, err
	}
	if u32(reply[:], 1) != code || u32(reply[:], 2) != uint32(len(in)) || u32(reply[:], 3) != MaxAPDU {
		return nil, k.c.fail(op, malformed("control code or lengths not echoed"))
	}
	if rv := u32(reply[:], 5); rv != 0 {
		return nil, Error(rv)
	}
	n := u32(reply[:], 4)
	if n > MaxAPDU {
		return nil, k.c.fail(op, malformed("%d-byte answer for a %d-byte buffer", n, MaxAPDU))
	}
	out := make([]byte, n)
	if err := k.c.recv(op, out); err != nil {
		return nil, err
	}
	return out, nil
}

// CtlCode is pcsc-lite's SCARD_CTL_CODE: 0x42000000 + code. (Windows
// encodes control codes differently; pcscd's drivers expect this form.)
func CtlCode(code uint32) uint32 { return 0x42000000 + code }

// Reader attributes for GetAttrib (pcsc-lite reader.h: class << 16 | tag).
const (
	AttrVendorName         uint32 = 0x00010100 // SCARD_ATTR_VENDOR_NAME
	AttrVendorIFDType      uint32 = 0x00010101 // SCARD_ATTR_VENDOR_IFD_TYPE
	AttrChannelID          uint32 = 0x00020110 // SCARD_ATTR_CHANNEL_ID
	AttrATRString          uint32 = 0x00090303 // SCARD_ATTR_ATR_STRING
	AttrDeviceFriendlyName uint32 = 0x7FFF0003 // SCARD_ATTR_DEVICE_FRIENDLY_NAME_A
	AttrMaxInput           uint32 = 0x0007A007 // SCARD_ATTR_MAXINPUT
)

// GetAttrib reads reader attribute id (e.g. AttrATRString); pcscd carries
// at most 264 bytes (MAX_BUFFER_SIZE).
func (k *Card) GetAttrib(id uint32) ([]byte, error) {
	const op = "get attribute"
	// getset_struct: hCard, dwAttrId, pbAttr[264], cbAttrLen, rv.
	fields := make([]uint32, getsetLen/4)
	fields[0], fields[1] = uint32(k.h), id
	fields[2+maxBufferSize/4] = maxBufferSize
	reply := make([]byte, getsetLen)
	k.c.mu.Lock()
	defer k.c.mu.Unlock()
	if err := k.c.exchange(op, request(cmdGetAttrib, fields, nil), reply); err != nil {
		return nil, err
	}
	if err := k.checkHandle(op, reply); err != nil {
		return nil, err
	}
	if got := u32(reply, 1); got != id {
		return nil, k.c.fail(op, malformed("attribute echo %#x, sent %#x", got, id))
	}
	if rv := u32(reply, 3+maxBufferSize/4); rv != 0 {
		return nil, Error(rv)
	}
	n := u32(reply, 2+maxBufferSize/4)
	if n > maxBufferSize {
		return nil, k.c.fail(op, malformed("attribute length %d > %d", n, maxBufferSize))
	}
	return bytes.Clone(reply[8 : 8+n]), nil
}
