package vscard

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// MsgType is the type field of a VSCard message header (VSCMsgType in
// libcacard's vscard_common.h, protocols.md §1.2).
type MsgType uint32

// Message types. The comment says which side sends each one: C is the
// client (card owner, vscclient), H the host (QEMU's ccid-card-passthru).
const (
	MsgInit          MsgType = 1 // both: magic, version, capabilities
	MsgError         MsgType = 2 // both: a 4-byte ErrorCode; H uses it to ack C's messages
	MsgReaderAdd     MsgType = 3 // C→H: optional UTF-8 reader name
	MsgReaderRemove  MsgType = 4 // C→H: empty
	MsgATR           MsgType = 5 // C→H: the ATR; means card inserted (or reset)
	MsgCardRemove    MsgType = 6 // C→H: empty
	MsgAPDU          MsgType = 7 // both: command APDU (H→C) or response APDU (C→H)
	MsgFlush         MsgType = 8 // H→C: empty; answered with FlushComplete
	MsgFlushComplete MsgType = 9 // C→H: empty
)

var msgNames = [...]string{"", "Init", "Error", "ReaderAdd", "ReaderRemove", "ATR", "CardRemove", "APDU", "Flush", "FlushComplete"}

// String returns the message type's name without the VSC_ prefix, or
// "MsgType(N)" for types the protocol does not define.
func (t MsgType) String() string {
	if t >= MsgInit && t <= MsgFlushComplete {
		return msgNames[t]
	}
	return "MsgType(" + strconv.FormatUint(uint64(t), 10) + ")"
}

// Protocol constants (protocols.md §1.2).
const (
	// Version is VSCARD_VERSION, MAKE_VERSION(0,0,2): the only version any
	// peer speaks. QEMU and vscclient only warn on a mismatch.
	Version = 2

	// MaxPayload is the largest payload ReadMessage accepts. QEMU reassembles
	// messages in a 64 KiB buffer and drops the link for good when a message
	// does not fit (protocols.md §1.5), so no real peer sends more; a length
	// above this is a corrupt stream, not a big message.
	MaxPayload = 65536

	// MinimalReaderID is the reader id QEMU assigns to every reader
	// (VSCARD_MINIMAL_READER_ID).
	MinimalReaderID = 0

	// UndefinedReaderID is VSCARD_UNDEFINED_READER_ID; QEMU puts it in the
	// header of every Init it sends.
	UndefinedReaderID = 0xFFFFFFFF
)

// HeaderSize is the size of a message header: type, reader_id and length,
// each a big-endian uint32 (protocols.md §1.1).
const HeaderSize = 12

// maxQEMUPayload is the largest payload QEMU's 64 KiB reassembly buffer can
// hold together with its header (protocols.md §1.5): vscard never sends more.
const maxQEMUPayload = MaxPayload - HeaderSize

// ErrorCode is the payload of an Error message (VSCErrorCode).
type ErrorCode uint32

// Error codes (protocols.md §1.2).
const (
	CodeOK                  ErrorCode = 0 // VSC_SUCCESS: QEMU's ack of ReaderAdd/ReaderRemove/ATR/CardRemove
	CodeGeneralError        ErrorCode = 1 // VSC_GENERAL_ERROR
	CodeCannotAddReaders    ErrorCode = 2 // VSC_CANNOT_ADD_MORE_READERS
	CodeCardAlreadyInserted ErrorCode = 3 // VSC_CARD_ALREAY_INSERTED (sic)
)

var codeNames = [...]string{"ok", "general error", "cannot add more readers", "card already inserted"}

// String names the code as vscard_common.h's comments do.
func (c ErrorCode) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return "ErrorCode(" + strconv.FormatUint(uint64(c), 10) + ")"
}

// magic is VSCARD_MAGIC as it appears on the wire: the ASCII bytes "VSCD",
// copied without byte swapping on any host (protocols.md §1.2).
var magic = [4]byte{'V', 'S', 'C', 'D'}

// initPayloadSize is the shortest valid Init payload: magic, version and one
// capability word. QEMU computes the capability count as (length-12)/4 in
// unsigned arithmetic, so a shorter Init corrupts its memory (§1.3).
const initPayloadSize = 12

// Errors returned by the codec. They are wrapped with context; test with
// errors.Is.
var (
	// ErrTooLarge means a header announced a payload above MaxPayload. The
	// stream cannot be resynchronised after it: drop the link.
	ErrTooLarge = errors.New("vscard: payload too large")
	// ErrMalformed means a payload does not have the layout its type
	// requires (a short Init, a wrong magic, an Error that is not 4 bytes).
	ErrMalformed = errors.New("vscard: malformed payload")
)

// Message is one VSCard message.
type Message struct {
	Type     MsgType
	ReaderID uint32
	Payload  []byte
}

// ReadMessage reads one message from r. It reads exactly the message's
// bytes and no more, so a zero-length message (Flush) is complete as soon
// as its header is: vscclient instead waits for further bytes before it
// handles one (peers.md §1.4).
//
// buf is scratch space that ReadMessage reuses, growing it when a message
// does not fit; it returns the buffer to pass to the next call, and the
// returned Message's Payload aliases it. The buffer never grows beyond
// HeaderSize+MaxPayload, whatever the header claims: a larger length is an
// error wrapping ErrTooLarge, read before any payload byte.
//
// A stream that ends before the first header byte gives io.EOF; one that
// ends inside a message gives an error wrapping io.ErrUnexpectedEOF.
func ReadMessage(r io.Reader, buf []byte) (Message, []byte, error) {
	if cap(buf) < HeaderSize {
		buf = make([]byte, 0, 512)
	}
	buf = buf[:HeaderSize]
	if _, err := io.ReadFull(r, buf); err != nil {
		if err == io.ErrUnexpectedEOF {
			return Message{}, buf, fmt.Errorf("vscard: truncated header: %w", err)
		}
		return Message{}, buf, err
	}
	m := Message{
		Type:     MsgType(binary.BigEndian.Uint32(buf[0:])),
		ReaderID: binary.BigEndian.Uint32(buf[4:]),
	}
	n := binary.BigEndian.Uint32(buf[8:])
	if n > MaxPayload {
		return m, buf, fmt.Errorf("vscard: %v message announces %d payload bytes (limit %d): %w", m.Type, n, MaxPayload, ErrTooLarge)
	}
	size := HeaderSize + int(n)
	if cap(buf) < size {
		nb := make([]byte, size, max(size, min(2*cap(buf), HeaderSize+MaxPayload)))
		copy(nb, buf)
		buf = nb
	}
	buf = buf[:size]
	if _, err := io.ReadFull(r, buf[HeaderSize:]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return m, buf, fmt.Errorf("vscard: truncated %v payload (want %d bytes): %w", m.Type, n, err)
	}
	m.Payload = buf[HeaderSize:size:size]
	return m, buf, nil
}

// AppendMessage appends m's header and payload to dst, so that the whole
// message goes out in a single write: QEMU writes header and payload
// separately and pays a Nagle/delayed-ACK stall for it (peers.md §1.3, §4).
// The caller keeps the payload within MaxPayload.
func AppendMessage(dst []byte, m Message) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(m.Type))
	dst = binary.BigEndian.AppendUint32(dst, m.ReaderID)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(m.Payload)))
	return append(dst, m.Payload...)
}

// InitPayload returns an Init payload: the magic "VSCD", Version and one
// capability word, 12 bytes as both QEMU and vscclient send it
// (protocols.md §1.3). No capability bit is defined; pass 0.
func InitPayload(caps uint32) []byte {
	p := make([]byte, 0, initPayloadSize)
	p = append(p, magic[:]...)
	p = binary.BigEndian.AppendUint32(p, Version)
	return binary.BigEndian.AppendUint32(p, caps)
}

// ParseInit checks an Init payload and returns its version and first
// capability word (further words, which no peer sends, are ignored). It
// rejects payloads shorter than 12 bytes and a magic other than "VSCD";
// a different version is not an error, as neither QEMU nor vscclient
// treats it as one.
func ParseInit(p []byte) (version, caps uint32, err error) {
	if len(p) < initPayloadSize {
		return 0, 0, fmt.Errorf("vscard: Init payload of %d bytes, want at least %d: %w", len(p), initPayloadSize, ErrMalformed)
	}
	if [4]byte(p[:4]) != magic {
		return 0, 0, fmt.Errorf("vscard: Init magic % X, want % X (\"VSCD\"): %w", p[:4], magic[:], ErrMalformed)
	}
	return binary.BigEndian.Uint32(p[4:]), binary.BigEndian.Uint32(p[8:]), nil
}

// ErrorPayload returns the 4-byte payload of an Error message carrying code
// in network byte order, as QEMU sends it.
func ErrorPayload(code ErrorCode) []byte {
	return binary.BigEndian.AppendUint32(make([]byte, 0, 4), uint32(code))
}

// ParseError decodes an Error payload, which must be exactly 4 bytes.
//
// The protocol says network byte order, and QEMU complies, but libcacard's
// vscclient writes its codes in host byte order, i.e. little-endian on
// every machine it runs on (protocols.md §2.3 item 6, peers.md §1.5). The
// two readings never collide for meaningful codes, so ParseError applies
// this rule: if the big-endian value is at most 0xFFFF it is the code;
// otherwise, if the little-endian value is at most 0xFFFF, the sender was
// vscclient and that is the code; otherwise the big-endian value is
// returned as is. (A value ≤ 0xFFFF in one order has its two high bytes
// zero, so it is ≥ 0x10000 in the other order unless it is 0 in both.)
func ParseError(p []byte) (ErrorCode, error) {
	if len(p) != 4 {
		return 0, fmt.Errorf("vscard: Error payload of %d bytes, want 4: %w", len(p), ErrMalformed)
	}
	if be := binary.BigEndian.Uint32(p); be <= 0xFFFF {
		return ErrorCode(be), nil
	}
	if le := binary.LittleEndian.Uint32(p); le <= 0xFFFF {
		return ErrorCode(le), nil
	}
	return ErrorCode(binary.BigEndian.Uint32(p)), nil
}
