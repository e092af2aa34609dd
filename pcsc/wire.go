package pcsc

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// Commands of pcscd's socket protocol (pcsc-lite src/winscard_msg.h,
// peers.md §5.2). SCARD_GET_STATUS_CHANGE (0x0C) exists but pcscd does not
// implement it: GetStatusChange is built on the client side from
// cmdGetReadersState and cmdWaitReaderStateChange, as libpcsclite does.
const (
	cmdEstablishContext      uint32 = 0x01
	cmdReleaseContext        uint32 = 0x02
	cmdConnect               uint32 = 0x04
	cmdReconnect             uint32 = 0x05
	cmdDisconnect            uint32 = 0x06
	cmdBeginTransaction      uint32 = 0x07
	cmdEndTransaction        uint32 = 0x08
	cmdTransmit              uint32 = 0x09
	cmdControl               uint32 = 0x0A
	cmdStatus                uint32 = 0x0B
	cmdCancel                uint32 = 0x0D
	cmdGetAttrib             uint32 = 0x0F
	cmdVersion               uint32 = 0x11
	cmdGetReadersState       uint32 = 0x12
	cmdWaitReaderStateChange uint32 = 0x13
	cmdStopWaiting           uint32 = 0x14
	cmdGetReaderEvents       uint32 = 0x15 // IPC 4.5 (pcsc-lite 2.3.0+)
)

// Sizes fixed by pcsc-lite's headers.
const (
	maxReaderName  = 128 // MAX_READERNAME
	maxATRSize     = 33  // MAX_ATR_SIZE
	maxBufferSize  = 264 // MAX_BUFFER_SIZE: getset_struct's pbAttr
	maxReaders     = 16  // PCSCLITE_MAX_READERS_CONTEXTS: the table pcscd sends through 2.4.x
	readerStateLen = 184 // sizeof(READER_STATE), eventhandler.h (peers.md §5.2)
	// MaxAPDU is pcscd's MAX_BUFFER_SIZE_EXTENDED (4 + 3 + 65536 + 3 + 2):
	// the largest command or response Transmit and Control carry, room for
	// an extended APDU with 65535 data bytes and a 65536-byte response.
	MaxAPDU = 4 + 3 + (1 << 16) + 3 + 2

	readerTableLen = maxReaders * readerStateLen
)

// Fixed struct sizes (all uint32/int32 fields, no padding).
const (
	versionLen    = 12 // version_struct {major, minor, rv}
	establishLen  = 12 // establish_struct {dwScope, hContext, rv}
	releaseLen    = 8  // release_struct {hContext, rv}
	connectLen    = 4 + maxReaderName + 5*4
	reconnectLen  = 24 // {hCard, dwShareMode, dwPreferredProtocols, dwInitialization, dwActiveProtocol, rv}
	disconnectLen = 12 // {hCard, dwDisposition, rv}
	beginLen      = 8  // {hCard, rv}
	endLen        = 12 // {hCard, dwDisposition, rv}
	cancelLen     = 8  // {hContext, rv}
	statusLen     = 8  // {hCard, rv}
	transmitLen   = 32 // {hCard, sendPciProto, sendPciLen, cbSendLength, recvPciProto, recvPciLen, pcbRecvLength, rv}
	controlLen    = 24 // {hCard, dwControlCode, cbSendLength, cbRecvLength, dwBytesReturned, rv}
	getsetLen     = 4 + 4 + maxBufferSize + 4 + 4
	waitLen       = 8 // wait_reader_state_change {timeOut, rv}
	eventsLen     = 8 // get_reader_events {readerEvents, rv}
)

// Sharing values of READER_STATE.readerSharing (readerfactory.h).
const (
	sharingExclusive = -1 // PCSCLITE_SHARING_EXCLUSIVE_CONTEXT
	sharingNone      = 0  // PCSCLITE_SHARING_NO_CONTEXT
)

// Card states in READER_STATE.readerState (SCARD_ABSENT etc. in pcsclite.h),
// which pcscd keeps and GetStatusChange turns into SCARD_STATE_* flags.
const (
	cardUnknown    = 0x0001
	cardAbsent     = 0x0002
	cardPresent    = 0x0004
	cardSwallowed  = 0x0008
	cardPowered    = 0x0010
	cardNegotiable = 0x0020
	cardSpecific   = 0x0040
)

// Card states reported in CardStatus.State (pcsclite.h SCARD_ABSENT etc.).
const (
	CardUnknown    uint32 = cardUnknown
	CardAbsent     uint32 = cardAbsent
	CardPresent    uint32 = cardPresent
	CardSwallowed  uint32 = cardSwallowed
	CardPowered    uint32 = cardPowered
	CardNegotiable uint32 = cardNegotiable
	CardSpecific   uint32 = cardSpecific
)

// errMalformed marks a reply that does not fit the protocol. It wraps
// ErrCommError (SCARD_F_COMM_ERROR, "an internal communications error has
// been detected"), so callers see a PC/SC code; the connection is closed
// since its byte stream can no longer be trusted.
var errMalformed = fmt.Errorf("malformed reply from pcscd (%w)", ErrCommError)

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errMalformed, fmt.Sprintf(format, args...))
}

var le = binary.LittleEndian

// request builds one message: the {size, command} header, then the fixed
// struct, then any trailing payload (Transmit's and Control's send buffer).
// pcscd reads them from one stream, so one write carries all three.
func request(cmd uint32, fields []uint32, extra []byte) []byte {
	b := make([]byte, 8, 8+4*len(fields)+len(extra))
	le.PutUint32(b[0:], uint32(4*len(fields)))
	le.PutUint32(b[4:], cmd)
	for _, f := range fields {
		b = le.AppendUint32(b, f)
	}
	return append(b, extra...)
}

// u32 reads field i (0-based, 4 bytes each) of a fixed struct.
func u32(b []byte, i int) uint32 { return le.Uint32(b[4*i:]) }

// readerEntry is one decoded READER_STATE record.
type readerEntry struct {
	name         string
	eventCounter uint32
	state        uint32 // SCARD_ABSENT, SCARD_PRESENT, ... bits
	sharing      int32
	atr          []byte
	protocol     uint32
}

// cString takes a NUL-terminated name from a fixed char array; a name that
// fills the array without a NUL is refused rather than read past.
func cString(b []byte) (string, error) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return "", errors.New("reader name without NUL terminator")
	}
	return string(b[:i]), nil
}

// decodeReaderTable decodes pcscd's reader-state table: readerStateLen-byte
// records (eventhandler.h: readerName[128] @0, eventCounter @128,
// readerState @132, readerSharing @136, cardAtr[33] @140, cardAtrLength
// @176, cardProtocol @180). Empty slots (name starting with NUL) are
// skipped, so the result lists the readers in pcscd's slot order.
func decodeReaderTable(b []byte) ([]readerEntry, error) {
	if len(b)%readerStateLen != 0 || len(b) == 0 {
		return nil, malformed("reader table of %d bytes, want a multiple of %d", len(b), readerStateLen)
	}
	var out []readerEntry
	for off := 0; off < len(b); off += readerStateLen {
		r := b[off : off+readerStateLen]
		if r[0] == 0 {
			continue
		}
		name, err := cString(r[:maxReaderName])
		if err != nil {
			return nil, malformed("reader slot %d: %v", off/readerStateLen, err)
		}
		atrLen := le.Uint32(r[176:])
		if atrLen > maxATRSize {
			return nil, malformed("reader %q: ATR length %d > %d", name, atrLen, maxATRSize)
		}
		e := readerEntry{
			name:         name,
			eventCounter: le.Uint32(r[128:]),
			state:        le.Uint32(r[132:]),
			sharing:      int32(le.Uint32(r[136:])),
			protocol:     le.Uint32(r[180:]),
		}
		if atrLen > 0 {
			e.atr = bytes.Clone(r[140 : 140+atrLen])
		}
		for _, prev := range out {
			if prev.name == name {
				return nil, malformed("reader %q listed twice", name)
			}
		}
		out = append(out, e)
	}
	return out, nil
}

// encodeReaderTable is decodeReaderTable's inverse, for the fake pcscd of
// the tests and the fuzz seeds.
func encodeReaderTable(entries []readerEntry) []byte {
	b := make([]byte, readerTableLen)
	for i, e := range entries {
		if i >= maxReaders {
			break
		}
		r := b[i*readerStateLen:]
		copy(r[:maxReaderName-1], e.name)
		le.PutUint32(r[128:], e.eventCounter)
		le.PutUint32(r[132:], e.state)
		le.PutUint32(r[136:], uint32(e.sharing))
		n := copy(r[140:140+maxATRSize], e.atr)
		le.PutUint32(r[176:], uint32(n))
		le.PutUint32(r[180:], e.protocol)
	}
	return b
}

// pciLength is sizeof(SCARD_IO_REQUEST) in libpcsclite: two C longs.
// pcscd passes it to the driver untouched; we send what a native client of
// the same word size would.
const pciLength = 2 * (32 << (^uint(0) >> 63)) / 8
