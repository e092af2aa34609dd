package ccid

import (
	"encoding/binary"
	"unicode/utf16"

	"github.com/vscard/vscard/usb"
)

// Endpoint addresses, as QEMU's usb-ccid numbers them (protocols.md §3.1),
// so that usbredir ep_info and libccid's endpoint search see a familiar
// shape.
const (
	epIntrIn  = 0x81
	epBulkIn  = 0x82
	epBulkOut = 0x03
)

// Descriptor values. The clock and data rate are the ISO 7816-3 defaults
// (4 MHz, Fi=372, Di=1: 4000000/372 = 10752 bps); the reader does all
// parameter work itself (dwFeatures), so these only feed libccid's timeout
// arithmetic (protocols.md §4.3).
const (
	defaultClockKHz = 4000
	defaultDataRate = 10752
	maxIFSD         = 254

	// maxMessage is dwMaxCCIDMessageLength: a 10-byte header plus the
	// longest ISO 7816-4 extended command APDU (4 + 3 + 65535 + 2). libccid
	// sends an extended APDU in one XfrBlock when it fits in both this
	// and its CMD_BUF_SIZE (ccid.h), so it never needs the wLevelParameter
	// chaining this reader does not offer. The longest response
	// (65536 + 2) fits as well.
	maxMessage = 10 + 4 + 3 + 65535 + 2

	// dwFeatures (CCID 1.1 §5.1, protocols.md §4.3):
	//   0x00000002 automatic parameter configuration based on the ATR
	//   0x00000004 automatic activation on insert  } libccid powers on
	//   0x00000008 automatic voltage selection     } with bPowerSelect 0
	//   0x00000010 automatic clock change
	//   0x00000020 automatic baud rate change
	//   0x00000040 automatic parameter negotiation: libccid skips PPS and
	//              SetParameters entirely (IFDHSetProtocolParameters)
	//   0x00000080 automatic PPS
	//   0x00000400 automatic IFSD exchange (no S(IFS) from the host)
	//   0x00040000 extended APDU level: APDUs arrive raw for T=0 and T=1,
	//              never TPDUs or T=1 blocks (QEMU's TPDU level, §3.7, is
	//              the bug not to copy)
	// No clock stop (0x100), no NAD (0x200), no USB wake-up (0x100000).
	features = 0x00000002 | 0x00000004 | 0x00000008 | 0x00000010 | 0x00000020 |
		0x00000040 | 0x00000080 | 0x00000400 | 0x00040000

	maxSlots = 8
)

// deviceDescriptor is the 18-byte device descriptor (USB 2.0 §9.6.1).
func (r *Reader) deviceDescriptor() []byte {
	d := []byte{
		18, 0x01, // bLength, DEVICE
		0x10, 0x01, // bcdUSB 1.10: full speed only, so no device qualifier
		0, 0, 0, // class per interface
		64,         // bMaxPacketSize0
		0, 0, 0, 0, // idVendor, idProduct
		0x00, 0x01, // bcdDevice 1.00
		1, 2, 0, // iManufacturer, iProduct, iSerialNumber
		1, // bNumConfigurations
	}
	binary.LittleEndian.PutUint16(d[8:], r.opts.VendorID)
	binary.LittleEndian.PutUint16(d[10:], r.opts.ProductID)
	if r.opts.Serial != "" {
		d[16] = 3
	}
	return d
}

// classDescriptor is the 54-byte CCID class descriptor (CCID 1.1 §5.1),
// placed after the interface descriptor where libccid looks for it as the
// interface's "extra" bytes (protocols.md §4.1).
func (r *Reader) classDescriptor() []byte {
	d := make([]byte, 54)
	le := binary.LittleEndian
	d[0], d[1] = 54, 0x21
	le.PutUint16(d[2:], 0x0110)   // bcdCCID
	d[4] = byte(r.opts.Slots - 1) // bMaxSlotIndex
	d[5] = 0x07                   // bVoltageSupport: 5 V, 3 V, 1.8 V
	le.PutUint32(d[6:], 0x03)     // dwProtocols: T=0 and T=1
	le.PutUint32(d[10:], defaultClockKHz)
	le.PutUint32(d[14:], defaultClockKHz) // dwMaximumClock
	// bNumClockSupported (18) and bNumDataRatesSupported (27) are 0: "the
	// default and maximum are the only values" (CCID 1.1 §5.1), which the
	// class requests GET_CLOCK_FREQUENCIES and GET_DATA_RATES list.
	le.PutUint32(d[19:], defaultDataRate)
	le.PutUint32(d[23:], defaultDataRate) // dwMaxDataRate
	le.PutUint32(d[28:], maxIFSD)
	// dwSynchProtocols (32), dwMechanical (36): none.
	le.PutUint32(d[40:], features)
	le.PutUint32(d[44:], maxMessage)
	d[48] = 0xFF // bClassGetResponse: echo the command's class
	d[49] = 0xFF // bClassEnvelope: echo
	// wLcdLayout (50) 0; bPINSupport (52) 0: no Secure, so libccid offers
	// no PIN pad (protocols.md §4.3).
	d[53] = 1 // bMaxCCIDBusySlots
	return d
}

// configDescriptor is the whole configuration: configuration, interface,
// CCID class descriptor and the three endpoints.
func (r *Reader) configDescriptor() []byte {
	d := []byte{
		9, 0x02, 0, 0, // bLength, CONFIGURATION, wTotalLength (below)
		1,                               // bNumInterfaces
		1,                               // bConfigurationValue
		0,                               // iConfiguration
		0x80,                            // bmAttributes: bus powered, no remote wake-up
		50,                              // bMaxPower: 100 mA
		9, 0x04, 0, 0, 3, 0x0B, 0, 0, 0, // interface 0: 3 endpoints, CCID class, protocol 0 (bulk+interrupt)
	}
	d = append(d, r.classDescriptor()...)
	for _, e := range endpoints {
		d = append(d, 7, 0x05, e.Address, byte(e.Type), byte(e.MaxPacketSize), byte(e.MaxPacketSize>>8), e.Interval)
	}
	binary.LittleEndian.PutUint16(d[2:], uint16(len(d)))
	return d
}

// endpoints are the reader's endpoints in descriptor order. The interrupt
// endpoint's largest message is 50 plus two bytes of slot bits (8 slots),
// so 8 bytes is ample and well within full speed's 64 (protocols.md §6.4).
var endpoints = []usb.Endpoint{
	{Address: epIntrIn, Type: usb.Interrupt, MaxPacketSize: 8, Interval: 10},
	{Address: epBulkIn, Type: usb.Bulk, MaxPacketSize: 64},
	{Address: epBulkOut, Type: usb.Bulk, MaxPacketSize: 64},
}

// stringDescriptor returns string descriptor i, or nil if there is none.
func (r *Reader) stringDescriptor(i uint8) []byte {
	var s string
	switch i {
	case 0:
		return []byte{4, 0x03, 0x09, 0x04} // LANGID US English only
	case 1:
		s = r.opts.Manufacturer
	case 2:
		s = r.opts.Product
	case 3:
		s = r.opts.Serial
	default:
		return nil
	}
	if s == "" {
		return nil
	}
	u := utf16.Encode([]rune(s))
	if len(u) > 126 { // bLength is one byte
		u = u[:126]
	}
	d := []byte{byte(2 + 2*len(u)), 0x03}
	for _, c := range u {
		d = binary.LittleEndian.AppendUint16(d, c)
	}
	return d
}
