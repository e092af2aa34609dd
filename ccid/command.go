package ccid

import (
	"context"
	"encoding/binary"
	"time"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/usb"
)

// PC_to_RDR message types (CCID 1.1 §6.1).
const (
	cmdSetParameters   = 0x61
	cmdIccPowerOn      = 0x62
	cmdIccPowerOff     = 0x63
	cmdGetSlotStatus   = 0x65
	cmdSecure          = 0x69
	cmdT0APDU          = 0x6A
	cmdEscape          = 0x6B
	cmdGetParameters   = 0x6C
	cmdResetParameters = 0x6D
	cmdIccClock        = 0x6E
	cmdXfrBlock        = 0x6F
	cmdMechanical      = 0x71
	cmdAbort           = 0x72
	cmdSetDataRate     = 0x73
)

// RDR_to_PC message types (CCID 1.1 §6.2).
const (
	rspDataBlock  = 0x80
	rspSlotStatus = 0x81
	rspParameters = 0x82
	rspEscape     = 0x83
	rspDataRate   = 0x84
)

// bStatus bits and bError values (CCID 1.1 §6.2.6).
const (
	iccActive   = 0
	iccInactive = 1
	iccAbsent   = 2

	cmdFailed  = 0x40
	cmdTimeExt = 0x80

	errNotSupported = 0x00
	errBadLength    = 1 // offset of dwLength
	errBadSlot      = 5 // offset of bSlot
	errBadByte7     = 7 // bPowerSelect, bProtocolNum, bClockCommand...
	errBadLevel     = 8 // wLevelParameter
	errSlotBusy     = 0xE0
	errHardware     = 0xFB
	errOverrun      = 0xFC
	errICCMute      = 0xFE
	errAborted      = 0xFF
)

// responseType is the RDR_to_PC message that answers a PC_to_RDR command
// (CCID 1.1 Table 6.1-1), also when the command fails. Unknown types get
// SlotStatus.
func responseType(cmd byte) byte {
	switch cmd {
	case cmdIccPowerOn, cmdXfrBlock, cmdSecure:
		return rspDataBlock
	case cmdGetParameters, cmdResetParameters, cmdSetParameters:
		return rspParameters
	case cmdEscape:
		return rspEscape
	case cmdSetDataRate:
		return rspDataRate
	}
	return rspSlotStatus
}

// wantLength says which dwLength a command may carry: -1 any, else exact.
func wantLength(cmd byte) (n int, known bool) {
	switch cmd {
	case cmdIccPowerOn, cmdIccPowerOff, cmdGetSlotStatus, cmdGetParameters,
		cmdResetParameters, cmdIccClock, cmdT0APDU, cmdMechanical, cmdAbort:
		return 0, true
	case cmdSetDataRate:
		return 8, true
	case cmdXfrBlock, cmdSecure, cmdEscape, cmdSetParameters:
		return -1, true
	}
	return 0, false
}

// message builds an RDR_to_PC message.
func message(typ, slot, seq, status, bErr, b9 byte, data []byte) []byte {
	m := make([]byte, 10, 10+len(data))
	m[0] = typ
	binary.LittleEndian.PutUint32(m[1:], uint32(len(data)))
	m[5], m[6], m[7], m[8], m[9] = slot, seq, status, bErr, b9
	return append(m, data...)
}

func (s *slot) iccStatus() byte {
	switch {
	case s.card == nil || s.removing:
		return iccAbsent
	case s.powered:
		return iccActive
	}
	return iccInactive
}

// queueLocked appends a message for bulk IN.
func (r *Reader) queueLocked(b []byte) *outMsg {
	m := &outMsg{b: b}
	r.queue = append(r.queue, m)
	r.dataChanged()
	return m
}

// Out implements usb.Device. Each call normally carries one whole command;
// a transport that hands over 64-byte packets instead is served too: a
// piece that is a multiple of the packet size and leaves the message short
// of its dwLength waits for the next piece, as a USB device reassembles a
// transfer that has not ended with a short packet (QEMU does the same,
// protocols.md §3.6). Zero-length pieces (ZLPs) are ignored.
func (r *Reader) Out(ctx context.Context, ep uint8, data []byte) error {
	if ep != epBulkOut {
		return usb.ErrStall
	}
	if len(data) == 0 {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	gen := r.gen
	// A host that sends without reading is held off here, at the start of
	// a message (a NAK on the bus), so answers cannot pile up unbounded.
	for len(r.outBuf) == 0 && len(r.queue)+r.running >= r.maxQueued {
		if err := r.waitLocked(ctx, gen, r.wake); err != nil {
			return err
		}
	}
	if r.halted[epBulkOut] {
		return usb.ErrStall
	}
	if len(r.outBuf) == 0 && len(data) < 10 {
		// Too short for a header: nothing to answer to.
		r.log.Debug("ccid: bulk OUT shorter than a CCID header", "len", len(data))
		return usb.ErrStall
	}
	f := append(r.outBuf, data...)
	dw := binary.LittleEndian.Uint32(f[1:5])
	if dw > maxMessage-10 {
		r.outBuf = nil
		r.log.Debug("ccid: command longer than dwMaxCCIDMessageLength", "dwLength", dw)
		r.failLocked(f, errBadLength)
		return nil
	}
	need := 10 + int(dw)
	if len(f) < need && len(data)%64 == 0 {
		r.outBuf = f
		return nil
	}
	r.outBuf = nil
	if len(f) != need {
		r.log.Debug("ccid: command length does not match dwLength", "len", len(f), "dwLength", dw)
		r.failLocked(f, errBadLength)
		return nil
	}
	r.dispatchLocked(f, gen)
	return nil
}

// failLocked answers command f with a failure of its natural type.
func (r *Reader) failLocked(f []byte, bErr byte) {
	status := byte(iccAbsent)
	if int(f[5]) < len(r.slots) && bErr != errBadSlot {
		status = r.slots[f[5]].iccStatus()
	}
	r.queueLocked(message(responseType(f[0]), f[5], f[6], status|cmdFailed, bErr, 0, nil))
}

// dispatchLocked answers a well-framed command: at once if it needs no
// card, else from a goroutine that owns the slot until it answers.
func (r *Reader) dispatchLocked(f []byte, gen uint64) {
	typ, n, seq := f[0], int(f[5]), f[6]
	want, known := wantLength(typ)
	if !known {
		r.log.Debug("ccid: unknown command", "type", typ)
		r.failLocked(f, errNotSupported)
		return
	}
	if n >= len(r.slots) {
		r.failLocked(f, errBadSlot)
		return
	}
	s := r.slots[n]
	data := f[10:]
	if want >= 0 && len(data) != want {
		r.failLocked(f, errBadLength)
		return
	}
	if typ == cmdAbort {
		if s.busy && s.abortCmd != nil {
			// One Abort at a time: each command gets one answer.
			r.failLocked(f, errSlotBusy)
			return
		}
		if s.busy {
			// The running command answers CMD_ABORTED, then this Abort
			// is answered (CCID 1.1 §5.3.1).
			s.abortSeq = int(seq)
			s.abortCmd = f[:10:10]
			if s.cancel != nil {
				s.cancel()
			}
			return
		}
		s.abortSeq = -1
		r.queueLocked(message(rspSlotStatus, f[5], seq, s.iccStatus(), 0, 0, nil))
		return
	}
	if s.busy && typ != cmdAbort {
		r.failLocked(f, errSlotBusy)
		return
	}
	ok := func(typ, b9 byte, d []byte) {
		r.queueLocked(message(typ, f[5], seq, s.iccStatus(), 0, b9, d))
	}
	switch typ {
	case cmdGetSlotStatus:
		ok(rspSlotStatus, s.clockStatus(), nil)

	case cmdIccPowerOn:
		if f[7] > 3 { // bPowerSelect: automatic, 5 V, 3 V or 1.8 V
			r.failLocked(f, errBadByte7)
			return
		}
		if s.card == nil {
			r.failLocked(f, errICCMute)
			return
		}
		r.startLocked(s, f, gen)

	case cmdIccPowerOff:
		if !s.powered || s.card == nil {
			ok(rspSlotStatus, s.clockStatus(), nil)
			return
		}
		r.startLocked(s, f, gen)

	case cmdXfrBlock:
		switch {
		case s.card == nil || !s.powered:
			r.failLocked(f, errICCMute)
		case binary.LittleEndian.Uint16(f[8:]) != 0:
			// No APDU chaining: this reader takes an extended APDU
			// whole (dwMaxCCIDMessageLength), so libccid never chains.
			r.failLocked(f, errBadLevel)
		case len(data) == 0:
			r.failLocked(f, errBadLength)
		default:
			r.startLocked(s, f, gen)
		}

	case cmdGetParameters, cmdResetParameters, cmdSetParameters:
		if s.card == nil {
			r.failLocked(f, errICCMute)
			return
		}
		switch typ {
		case cmdResetParameters:
			s.params = paramsFromATR(s.card.ATR())
		case cmdSetParameters:
			if e := checkParams(f[7], data); e != 0 {
				r.failLocked(f, e)
				return
			}
			// Stored and reported back; the card sees APDUs either way.
			s.params = params{proto: f[7], data: append([]byte(nil), data...)}
		}
		ok(rspParameters, s.params.proto, s.params.data)

	case cmdIccClock:
		if f[7] > 1 { // bClockCommand: 0 restart, 1 stop
			r.failLocked(f, errBadByte7)
			return
		}
		if s.card == nil {
			r.failLocked(f, errICCMute)
			return
		}
		s.clockStopped = f[7] == 1
		ok(rspSlotStatus, s.clockStatus(), nil)

	case cmdSetDataRate:
		// Clock and rate are automatic: the answer gives the values in
		// use, which is what CCID 1.1 §6.1.14 asks of a reader that
		// picks its own.
		d := binary.LittleEndian.AppendUint32(nil, defaultClockKHz)
		d = binary.LittleEndian.AppendUint32(d, defaultDataRate)
		ok(rspDataRate, 0, d)

	default:
		// Escape (no vendor commands; libccid's Gemalto firmware query
		// tolerates the failure, protocols.md §4.2), Secure (bPINSupport
		// 0), T0APDU (APDU level, nothing to configure), Mechanical
		// (dwMechanical 0).
		r.failLocked(f, errNotSupported)
	}
}

func (s *slot) clockStatus() byte {
	if s.clockStopped {
		return 3 // stopped in an unknown state
	}
	return 0
}

// startLocked hands a command that needs the card to a goroutine.
func (r *Reader) startLocked(s *slot, f []byte, gen uint64) {
	ctx, cancel := context.WithCancel(context.Background())
	s.busy, s.cancel, s.seq = true, cancel, f[6]
	s.ext = nil
	r.running++
	go r.run(ctx, cancel, s, f, gen)
}

// run executes a card command on slot s, which it owns (busy) until it has
// queued the answer.
func (r *Reader) run(ctx context.Context, cancel context.CancelFunc, s *slot, f []byte, gen uint64) {
	defer cancel()
	r.mu.Lock()
	c := s.card
	r.mu.Unlock()
	n, typ := int(f[5]), f[0]

	// Time extensions only for XfrBlock: libccid's CCID_Receive waits on
	// them, but its CmdPowerOn would take one for the ATR answer
	// (commands.c reads one message and uses its dwLength) and then be a
	// message out of step.
	var stopExt func()
	if typ == cmdXfrBlock {
		stopExt = r.timeExtensions(s, f, gen)
	}
	start := time.Now()
	var (
		resp  []byte
		err   error
		ev    TraceEvent
		atrOK = true
	)
	switch typ {
	case cmdIccPowerOn:
		r.mu.Lock()
		warm := s.powered
		r.mu.Unlock()
		if warm {
			c.Reset()
		} else {
			c.PowerOn()
		}
		resp = append([]byte(nil), c.ATR()...)
		atrOK = len(resp) >= 2 && len(resp) <= card.MaxATRLen
		ev = TraceEvent{Event: EventPowerOn, Response: append([]byte(nil), resp...)}
	case cmdIccPowerOff:
		c.PowerOff()
		ev = TraceEvent{Event: EventPowerOff}
	case cmdXfrBlock:
		resp, err = c.Transmit(ctx, f[10:])
		ev = TraceEvent{Event: EventAPDU, Response: append([]byte(nil), resp...), Err: err}
		ev.Command, ev.Redacted = apdu.Redact(f[10:])
	}
	if stopExt != nil {
		stopExt()
	}
	ev.Time, ev.Slot, ev.Duration = start, n, time.Since(start)
	if r.opts.Trace != nil {
		r.opts.Trace(ev)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	defer func() {
		s.busy, s.cancel = false, nil
		r.running--
		if s.changed {
			r.broadcast() // the card failed and left: slot news
		} else {
			r.dataChanged()
		}
	}()
	if r.gen != gen {
		// Reset while the card worked: the answer is for a host that
		// has gone; leave the card powered off as Reset promised.
		if s.card != nil && (s.powered || typ == cmdIccPowerOn) {
			s.powered = false
			s.params = paramsFromATR(c.ATR())
			r.mu.Unlock()
			c.PowerOff()
			r.mu.Lock()
		}
		s.abortSeq, s.abortCmd = -1, nil
		return
	}
	// An ABORT for the slot (control request or bulk Abort) arrived
	// while the command ran; CCID 1.1 §5.3.1 has it end CMD_ABORTED.
	aborted := s.abortSeq >= 0
	reply := func(status, bErr, b9 byte, d []byte) {
		r.queueLocked(message(responseType(typ), f[5], f[6], status, bErr, b9, d))
	}
	switch {
	case s.removing:
		reply(iccAbsent|cmdFailed, errICCMute, 0, nil)
	case aborted:
		reply(s.iccStatus()|cmdFailed, errAborted, 0, nil)
	case typ == cmdIccPowerOn && !atrOK:
		r.log.Warn("ccid: card ATR unusable (longer than 33 bytes or empty)", "slot", n, "len", len(resp))
		c.PowerOff()
		s.powered = false
		reply(s.iccStatus()|cmdFailed, errHardware, 0, nil)
	case typ == cmdIccPowerOn:
		s.powered = true
		s.clockStopped = false
		s.params = paramsFromATR(resp)
		reply(iccActive, 0, 0, resp)
	case typ == cmdIccPowerOff:
		s.powered = false
		reply(s.iccStatus(), 0, s.clockStatus(), nil)
	case err != nil:
		// The card can no longer answer (card.Card): it is gone.
		r.log.Warn("ccid: card failed; taking it out of the slot", "slot", n, "err", err)
		s.card, s.powered, s.changed = nil, false, true
		reply(iccAbsent|cmdFailed, errICCMute, 0, nil)
	case len(resp) > maxMessage-10:
		r.log.Warn("ccid: card response longer than dwMaxCCIDMessageLength", "slot", n, "len", len(resp))
		reply(s.iccStatus()|cmdFailed, errOverrun, 0, nil)
	default:
		reply(iccActive, 0, 0, resp)
	}
	if s.abortCmd != nil {
		h := s.abortCmd
		r.queueLocked(message(rspSlotStatus, h[5], h[6], s.iccStatus(), 0, s.clockStatus(), nil))
	}
	s.abortSeq, s.abortCmd = -1, nil
}

// timeExtensions sends a time extension request (bStatus 0x80, bError the
// BWT multiplier, CCID 1.1 §6.2.6) for the running command once it has
// taken r.timeExt, then every r.timeExtEvery, until the returned stop is
// called. Only one such message is queued at a time, so a host that does
// not read is not flooded. libccid keeps waiting on each, multiplying its
// timeout by bError (protocols.md §4.2).
func (r *Reader) timeExtensions(s *slot, f []byte, gen uint64) (stop func()) {
	// A timer, not a goroutine with a timer: nearly every command ends
	// before r.timeExt, and then no goroutine was ever started for it.
	var (
		t       *time.Timer
		stopped bool // under r.mu
	)
	// t is set under r.mu, which the callback takes before it uses t.
	r.mu.Lock()
	defer r.mu.Unlock()
	t = time.AfterFunc(r.timeExt, func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		if stopped {
			return
		}
		if r.gen == gen && (s.ext == nil || s.ext.taken) {
			s.ext = r.queueLocked(message(rspDataBlock, f[5], f[6], iccActive|cmdTimeExt, 1, 0, nil))
		}
		t.Reset(r.timeExtEvery)
	})
	return func() {
		t.Stop()
		// A callback already running sees stopped once it has the lock,
		// and the final answer is queued under the lock after this: no
		// extension may follow it.
		r.mu.Lock()
		stopped = true
		r.mu.Unlock()
	}
}
