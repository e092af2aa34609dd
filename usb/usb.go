// Package usb is the small device model that vscard's USB transports
// (usbredir, usbip) carry, and that USB device classes (ccid) implement.
//
// # Model
//
// A Device is a full-speed USB device seen from the bus: the transports
// never interpret its class. They learn its shape from Info (what usbredir's
// device_connect, interface_info and ep_info and USB/IP's device record
// need, protocols.md §5 and §6), pass control transfers on endpoint 0 to
// Control (standard requests included: GET_DESCRIPTOR, SET_CONFIGURATION and
// the like are the device's business, so each transport need not know
// descriptors), deliver OUT transfers with Out, and collect IN transfers
// with In, which blocks until the device has data: that is how a USB device
// NAKs, and how a CCID reader's interrupt endpoint waits for a slot change.
//
// A transport may have several IN requests outstanding on one endpoint
// (QEMU pipelines bulk IN, USB/IP clients queue URBs), but it calls In for
// an endpoint from one goroutine at a time and completes its requests in
// order. When a request is cancelled (usbredir cancel_data_packet, USB/IP
// UNLINK) the transport cancels the ctx of the In call serving it; a Device
// must not lose data then: what In had not returned stays queued for the
// next call.
//
// A transfer is a whole transfer, not a packet: Out gets all the bytes of
// one bulk OUT transfer, and In returns at most max bytes of one IN
// transfer (the rest, if any, is returned by the next call, as a USB host
// would read it with the next transfer). Packetisation and zero-length
// packets are below this level (peers.md appendix on QEMU 7.2's 54-byte
// response: a ZLP must never become a message of its own).
package usb

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
)

// ErrStall is returned by a Device for a request it does not support or
// a halted endpoint; transports answer it with their STALL status
// (usbredir status 4, USB/IP -EPIPE).
var ErrStall = errors.New("usb: stall")

// Speed is the bus speed of a device.
type Speed uint8

// Speeds, numbered as USB/IP's device record and Linux's enum usb_device_speed
// number them (protocols.md §5); usbredir numbers them one lower.
const (
	SpeedUnknown Speed = 0
	SpeedLow     Speed = 1
	SpeedFull    Speed = 2
	SpeedHigh    Speed = 3
	SpeedSuper   Speed = 5
)

// EndpointType is the transfer type of an endpoint, as in bits 0..1 of
// an endpoint descriptor's bmAttributes (and usbredir's ep_info types).
type EndpointType uint8

const (
	Control     EndpointType = 0
	Isochronous EndpointType = 1
	Bulk        EndpointType = 2
	Interrupt   EndpointType = 3
)

// Endpoint describes one endpoint other than endpoint 0.
type Endpoint struct {
	Address       uint8 // with 0x80 for IN, e.g. 0x82
	Type          EndpointType
	MaxPacketSize uint16
	Interval      uint8 // bInterval; interrupt and isochronous only
	Interface     uint8 // bInterfaceNumber it belongs to
}

// In reports whether the endpoint is an IN (device-to-host) endpoint.
func (e Endpoint) In() bool { return e.Address&0x80 != 0 }

// Interface describes one interface of the active configuration.
type Interface struct {
	Number, AltSetting        uint8
	Class, SubClass, Protocol uint8
}

// Info is what transports announce about a device.
type Info struct {
	Speed                     Speed
	Class, SubClass, Protocol uint8 // bDeviceClass etc. (0: per interface)
	VendorID, ProductID       uint16
	BCDDevice                 uint16
	ConfigurationValue        uint8 // bConfigurationValue of the (only) configuration
	NumConfigurations         uint8
	Interfaces                []Interface
	Endpoints                 []Endpoint // not endpoint 0
}

// Setup is the 8-byte setup packet of a control transfer.
type Setup struct {
	RequestType uint8 // bmRequestType: 0x80 = device-to-host
	Request     uint8
	Value       uint16
	Index       uint16
	Length      uint16
}

// In reports whether the data stage goes device-to-host.
func (s Setup) In() bool { return s.RequestType&0x80 != 0 }

// ParseSetup decodes a setup packet as it is on the bus (little-endian
// wValue, wIndex, wLength).
func ParseSetup(b []byte) (Setup, error) {
	if len(b) != 8 {
		return Setup{}, fmt.Errorf("usb: setup packet is %d bytes, want 8", len(b))
	}
	return Setup{
		RequestType: b[0], Request: b[1],
		Value:  binary.LittleEndian.Uint16(b[2:]),
		Index:  binary.LittleEndian.Uint16(b[4:]),
		Length: binary.LittleEndian.Uint16(b[6:]),
	}, nil
}

// Bytes encodes s as on the bus.
func (s Setup) Bytes() []byte {
	b := []byte{s.RequestType, s.Request, 0, 0, 0, 0, 0, 0}
	binary.LittleEndian.PutUint16(b[2:], s.Value)
	binary.LittleEndian.PutUint16(b[4:], s.Index)
	binary.LittleEndian.PutUint16(b[6:], s.Length)
	return b
}

// Standard requests (USB 2.0 §9.4) that transports may see.
const (
	ReqGetStatus        = 0x00
	ReqClearFeature     = 0x01
	ReqSetFeature       = 0x03
	ReqSetAddress       = 0x05
	ReqGetDescriptor    = 0x06
	ReqGetConfiguration = 0x08
	ReqSetConfiguration = 0x09
	ReqGetInterface     = 0x0A
	ReqSetInterface     = 0x0B
)

// Device is a USB device as transports drive it. Methods may be called
// from several goroutines; see the package comment for In's rules.
type Device interface {
	// Info describes the device; it does not change while attached.
	Info() Info
	// Control performs a control transfer on endpoint 0, standard
	// requests included. For an IN request it returns at most
	// setup.Length bytes; for OUT, data is the data stage and the result
	// is empty. ErrStall for a request the device does not support.
	Control(ctx context.Context, setup Setup, data []byte) ([]byte, error)
	// Out delivers one OUT transfer to endpoint ep (an OUT address).
	// Called with a ctx that is already done, Out either takes the whole
	// transfer or returns ctx.Err() having taken nothing: usbredir relies
	// on that to try a transfer on its reading goroutine first and hand
	// it to a worker only when the device would block.
	Out(ctx context.Context, ep uint8, data []byte) error
	// In waits until endpoint ep (an IN address) has data and returns at
	// most max bytes of it, or ctx's error, keeping undelivered data.
	In(ctx context.Context, ep uint8, max int) ([]byte, error)
	// Reset is a USB port reset: the device returns to its default
	// (unconfigured) state, as after attach. Pending In calls return.
	Reset()
}
