package usbip

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire constants (protocols.md §5; Linux usbip_common.h and the userspace
// tool's usbip_network.h). All fields are big-endian.
const (
	version = 0x0111 // the Linux tool rejects any other version

	opReqDevlist = 0x8005
	opRepDevlist = 0x0005
	opReqImport  = 0x8003
	opRepImport  = 0x0003

	// Operation status codes.
	stOK     = 0
	stNA     = 1
	stBusy   = 2
	stDevErr = 3
	stNoDev  = 4
	stError  = 5

	cmdSubmit = 1
	cmdUnlink = 2
	retSubmit = 3
	retUnlink = 4

	dirOut = 0
	dirIn  = 1

	opHeaderLen  = 8
	busIDLen     = 32
	pathLen      = 256
	deviceLen    = 312 // struct usbip_usb_device
	urbHeaderLen = 48

	// Negative errnos carried in RET_SUBMIT / RET_UNLINK status.
	errEPIPE      = -32  // STALL
	errEPROTO     = -71  // any other device failure
	errECONNRESET = -104 // URB unlinked

	// maxTransfer bounds the OUT payload read before allocating
	// (a CCID extended APDU is at most ~65 KiB; 1 MiB leaves ample room).
	maxTransfer = 1 << 20
	// maxISOPackets bounds the ISO descriptors that follow an ISO URB.
	maxISOPackets = 1024
)

// opHeader is the 8-byte header of the operation phase.
type opHeader struct {
	Version uint16
	Code    uint16
	Status  uint32
}

func (h opHeader) append(b []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, h.Version)
	b = binary.BigEndian.AppendUint16(b, h.Code)
	return binary.BigEndian.AppendUint32(b, h.Status)
}

func parseOpHeader(b []byte) (opHeader, error) {
	if len(b) != opHeaderLen {
		return opHeader{}, fmt.Errorf("usbip: operation header is %d bytes, want %d", len(b), opHeaderLen)
	}
	return opHeader{
		Version: binary.BigEndian.Uint16(b),
		Code:    binary.BigEndian.Uint16(b[2:]),
		Status:  binary.BigEndian.Uint32(b[4:]),
	}, nil
}

// deviceRecord is struct usbip_usb_device (312 bytes).
type deviceRecord struct {
	Path, BusID                           string
	BusNum, DevNum, Speed                 uint32
	VendorID, ProductID, BCDDevice        uint16
	Class, SubClass, Protocol             uint8
	ConfigurationValue, NumConfigurations uint8
	NumInterfaces                         uint8
}

func appendFixed(b []byte, s string, n int) []byte {
	start := len(b)
	b = append(b, make([]byte, n)...)
	copy(b[start:start+n-1], s) // keep a terminating NUL, as the C tool expects
	return b
}

func (d deviceRecord) append(b []byte) []byte {
	b = appendFixed(b, d.Path, pathLen)
	b = appendFixed(b, d.BusID, busIDLen)
	b = binary.BigEndian.AppendUint32(b, d.BusNum)
	b = binary.BigEndian.AppendUint32(b, d.DevNum)
	b = binary.BigEndian.AppendUint32(b, d.Speed)
	b = binary.BigEndian.AppendUint16(b, d.VendorID)
	b = binary.BigEndian.AppendUint16(b, d.ProductID)
	b = binary.BigEndian.AppendUint16(b, d.BCDDevice)
	return append(b, d.Class, d.SubClass, d.Protocol, d.ConfigurationValue, d.NumConfigurations, d.NumInterfaces)
}

// cString returns b up to its first NUL.
func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

func parseDeviceRecord(b []byte) (deviceRecord, error) {
	if len(b) != deviceLen {
		return deviceRecord{}, fmt.Errorf("usbip: device record is %d bytes, want %d", len(b), deviceLen)
	}
	p := b[pathLen+busIDLen:]
	return deviceRecord{
		Path:               cString(b[:pathLen]),
		BusID:              cString(b[pathLen : pathLen+busIDLen]),
		BusNum:             binary.BigEndian.Uint32(p),
		DevNum:             binary.BigEndian.Uint32(p[4:]),
		Speed:              binary.BigEndian.Uint32(p[8:]),
		VendorID:           binary.BigEndian.Uint16(p[12:]),
		ProductID:          binary.BigEndian.Uint16(p[14:]),
		BCDDevice:          binary.BigEndian.Uint16(p[16:]),
		Class:              p[18],
		SubClass:           p[19],
		Protocol:           p[20],
		ConfigurationValue: p[21],
		NumConfigurations:  p[22],
		NumInterfaces:      p[23],
	}, nil
}

// urbHeader is the 48-byte header of every URB-phase PDU. Fields that a
// command does not use are zero; padding is not kept.
type urbHeader struct {
	Command, Seqnum, DevID, Direction, EP uint32

	// CMD_SUBMIT
	TransferFlags, TransferBufferLength, StartFrame, NumberOfPackets, Interval uint32
	Setup                                                                      [8]byte

	// CMD_UNLINK
	UnlinkSeqnum uint32

	// RET_SUBMIT and RET_UNLINK
	Status                   int32
	ActualLength, ErrorCount uint32
}

var errUnknownCommand = errors.New("usbip: unknown command")

func (h urbHeader) append(b []byte) []byte {
	for _, v := range []uint32{h.Command, h.Seqnum, h.DevID, h.Direction, h.EP} {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	var rest [28]byte
	switch h.Command {
	case cmdSubmit:
		binary.BigEndian.PutUint32(rest[0:], h.TransferFlags)
		binary.BigEndian.PutUint32(rest[4:], h.TransferBufferLength)
		binary.BigEndian.PutUint32(rest[8:], h.StartFrame)
		binary.BigEndian.PutUint32(rest[12:], h.NumberOfPackets)
		binary.BigEndian.PutUint32(rest[16:], h.Interval)
		copy(rest[20:], h.Setup[:])
	case retSubmit:
		binary.BigEndian.PutUint32(rest[0:], uint32(h.Status))
		binary.BigEndian.PutUint32(rest[4:], h.ActualLength)
		binary.BigEndian.PutUint32(rest[8:], h.StartFrame)
		binary.BigEndian.PutUint32(rest[12:], h.NumberOfPackets)
		binary.BigEndian.PutUint32(rest[16:], h.ErrorCount)
	case cmdUnlink:
		binary.BigEndian.PutUint32(rest[0:], h.UnlinkSeqnum)
	case retUnlink:
		binary.BigEndian.PutUint32(rest[0:], uint32(h.Status))
	}
	return append(b, rest[:]...)
}

// parseURBHeader decodes a 48-byte URB header of any of the four commands;
// errUnknownCommand for anything else.
func parseURBHeader(b []byte) (urbHeader, error) {
	if len(b) != urbHeaderLen {
		return urbHeader{}, fmt.Errorf("usbip: URB header is %d bytes, want %d", len(b), urbHeaderLen)
	}
	u32 := func(off int) uint32 { return binary.BigEndian.Uint32(b[off:]) }
	h := urbHeader{Command: u32(0), Seqnum: u32(4), DevID: u32(8), Direction: u32(12), EP: u32(16)}
	switch h.Command {
	case cmdSubmit:
		h.TransferFlags = u32(20)
		h.TransferBufferLength = u32(24)
		h.StartFrame = u32(28)
		h.NumberOfPackets = u32(32)
		h.Interval = u32(36)
		copy(h.Setup[:], b[40:48])
	case retSubmit:
		h.Status = int32(u32(20))
		h.ActualLength = u32(24)
		h.StartFrame = u32(28)
		h.NumberOfPackets = u32(32)
		h.ErrorCount = u32(36)
	case cmdUnlink:
		h.UnlinkSeqnum = u32(20)
	case retUnlink:
		h.Status = int32(u32(20))
	default:
		return h, fmt.Errorf("%w %#x", errUnknownCommand, h.Command)
	}
	return h, nil
}
