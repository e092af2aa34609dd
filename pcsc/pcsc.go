// Package pcsc is a pure-Go client of pcscd's unix socket (no cgo).
package pcsc

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"time"
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

// Context is one connection to pcscd.
type Context struct{}

// Card is a handle from Connect.
type Card struct{}

var errTODO = errors.New("pcsc: not implemented yet")

// EstablishContext connects to pcscd, offering IPC 4.4 and retrying as 4.5 on refusal.
func EstablishContext(ctx context.Context, opts *Options) (*Context, error) { return nil, errTODO }

// Release ends the context and closes its connections.
func (c *Context) Release() error { return errTODO }

// ListReaders names pcscd's readers; ErrNoReadersAvailable when none.
func (c *Context) ListReaders() ([]string, error) { return nil, errTODO }

// Readers is a snapshot of pcscd's reader states.
func (c *Context) Readers() ([]ReaderInfo, error) { return nil, errTODO }

// GetStatusChange waits until a reader's state differs from CurrentState.
func (c *Context) GetStatusChange(ctx context.Context, timeout time.Duration, states []ReaderState) error {
	return errTODO
}

// Cancel ends a GetStatusChange blocked in another goroutine.
func (c *Context) Cancel() error { return errTODO }

// Connect opens a card handle.
func (c *Context) Connect(reader string, mode ShareMode, protocols Protocol) (*Card, error) {
	return nil, errTODO
}

// Protocol is the active protocol.
func (k *Card) Protocol() Protocol { return ProtocolUndefined }

// Transmit sends one APDU with the active protocol's PCI.
func (k *Card) Transmit(cmd []byte) ([]byte, error) { return nil, errTODO }

// Status reports the reader, state, protocol and ATR.
func (k *Card) Status() (CardStatus, error) { return CardStatus{}, errTODO }

// Reconnect re-negotiates the share mode and protocol.
func (k *Card) Reconnect(mode ShareMode, protocols Protocol, init Disposition) error { return errTODO }

// Disconnect closes the handle.
func (k *Card) Disconnect(d Disposition) error { return errTODO }

// BeginTransaction waits while another handle holds the card.
func (k *Card) BeginTransaction(ctx context.Context) error { return errTODO }

// EndTransaction ends the transaction.
func (k *Card) EndTransaction(d Disposition) error { return errTODO }

// Control sends a reader control code.
func (k *Card) Control(code uint32, in []byte) ([]byte, error) { return nil, errTODO }

// CtlCode is pcsc-lite's SCARD_CTL_CODE: 0x42000000 + code.
func CtlCode(code uint32) uint32 { return 0x42000000 + code }

// GetAttrib reads a reader attribute.
func (k *Card) GetAttrib(id uint32) ([]byte, error) { return nil, errTODO }
