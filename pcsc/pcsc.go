// Package pcsc is a pure-Go client of pcscd, the PC/SC daemon of
// pcsc-lite: it speaks pcscd's unix-socket protocol directly, so it needs
// neither cgo nor libpcsclite (peers.md §5.2).
//
// The API mirrors WinSCard. EstablishContext opens a Context, one socket
// to pcscd (path from PCSCLITE_CSOCK_NAME, as in libpcsclite), negotiating
// IPC protocol 4.4 or 4.5. Context.Connect gives a Card handle for
// Transmit, Status, transactions, Control and GetAttrib. GetStatusChange
// is built on the client side from pcscd's reader table and its
// wait-for-event commands, exactly as libpcsclite builds it, including the
// PnPNotification pseudo-reader for readers being plugged in or out.
//
// Concurrency: a Context and its Cards share one socket and one mutex, so
// their calls are serialised; a GetStatusChange waiting for an event holds
// the Context until it returns. Use one Context per goroutine that waits in
// GetStatusChange, and another for card traffic, as with libpcsclite.
// Cancel alone may be called from any goroutine: like SCardCancel it uses
// a connection of its own to make pcscd end the wait. Calls that wait
// while another handle holds the card (BeginTransaction, and Transmit,
// Status and Reconnect like libpcsclite's) poll with the mutex released.
//
// Errors: a return code from pcscd is an Error (compare with errors.Is or
// ==). When pcscd goes away, every call on the Context returns an error
// wrapping ErrNoService from then on; establish a new Context once pcscd is
// back. A reply that breaks the protocol (wrong size, a handle that is not
// echoed, a length beyond its buffer, a reader name without NUL) closes
// the connection with an error wrapping ErrCommError; the client never
// trusts a length from pcscd beyond the protocol's fixed buffers.
package pcsc

import (
	"log/slog"
	"os"
	"strings"
)

// DefaultSocket is where pcscd listens unless PCSCLITE_CSOCK_NAME says otherwise.
const DefaultSocket = "/run/pcscd/pcscd.comm"

// SocketPath is $PCSCLITE_CSOCK_NAME, else /run/pcscd/pcscd.comm, as in libpcsclite.
func SocketPath() string {
	if s := os.Getenv("PCSCLITE_CSOCK_NAME"); s != "" {
		return s
	}
	return DefaultSocket
}

// Options configure EstablishContext.
type Options struct {
	Socket string       // "" = SocketPath()
	Logger *slog.Logger // nil = discard
}

// PnPNotification is the pseudo-reader name whose state changes when a
// reader is added or removed.
const PnPNotification = `\\?PnP?\Notification`

// ShareMode is SCARD_SHARE_*.
type ShareMode uint32

const (
	ShareExclusive ShareMode = 1
	ShareShared    ShareMode = 2
	ShareDirect    ShareMode = 3
)

// Protocol is SCARD_PROTOCOL_*.
type Protocol uint32

const (
	ProtocolUndefined Protocol = 0
	ProtocolT0        Protocol = 1
	ProtocolT1        Protocol = 2
	ProtocolRaw       Protocol = 4
	ProtocolAny                = ProtocolT0 | ProtocolT1
)

// Disposition is SCARD_LEAVE_CARD etc.
type Disposition uint32

const (
	LeaveCard   Disposition = 0
	ResetCard   Disposition = 1
	UnpowerCard Disposition = 2
	EjectCard   Disposition = 3
)

// State is a set of SCARD_STATE_* flags.
type State uint32

const (
	StateUnaware     State = 0x0000
	StateIgnore      State = 0x0001
	StateChanged     State = 0x0002
	StateUnknown     State = 0x0004
	StateUnavailable State = 0x0008
	StateEmpty       State = 0x0010
	StatePresent     State = 0x0020
	StateATRMatch    State = 0x0040
	StateExclusive   State = 0x0080
	StateInUse       State = 0x0100
	StateMute        State = 0x0200
	StateUnpowered   State = 0x0400
)

var stateNames = []struct {
	s    State
	name string
}{
	{StateIgnore, "ignore"}, {StateChanged, "changed"}, {StateUnknown, "unknown"},
	{StateUnavailable, "unavailable"}, {StateEmpty, "empty"}, {StatePresent, "present"},
	{StateATRMatch, "atrmatch"}, {StateExclusive, "exclusive"}, {StateInUse, "inuse"},
	{StateMute, "mute"}, {StateUnpowered, "unpowered"},
}

// String lists the flags, e.g. "present|inuse"; "unaware" for 0.
func (s State) String() string {
	if s == StateUnaware {
		return "unaware"
	}
	var parts []string
	for _, n := range stateNames {
		if s&n.s != 0 {
			parts = append(parts, n.name)
			s &^= n.s
		}
	}
	if s != 0 {
		parts = append(parts, "0x"+strings.ToUpper(hex32(uint32(s))))
	}
	return strings.Join(parts, "|")
}

func hex32(v uint32) string {
	const digits = "0123456789abcdef"
	var b [8]byte
	for i := 7; i >= 0; i-- {
		b[i] = digits[v&0xF]
		v >>= 4
	}
	return strings.TrimLeft(string(b[:]), "0")
}

// ReaderInfo is one reader as pcscd's shared reader-state table shows it.
type ReaderInfo struct {
	Name         string
	State        State
	ATR          []byte
	Protocol     Protocol
	EventCounter uint32
}

// ReaderState is one entry of GetStatusChange, like SCARD_READERSTATE.
type ReaderState struct {
	Reader       string
	CurrentState State
	EventState   State
	ATR          []byte
}

// CardStatus is what SCardStatus answers.
type CardStatus struct {
	Reader   string
	State    uint32 // SCARD_ABSENT, SCARD_PRESENT, ... bits
	Protocol Protocol
	ATR      []byte
}
