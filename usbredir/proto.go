package usbredir

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Packet types (protocols.md §6.2).
const (
	typeHello                    = 0
	typeDeviceConnect            = 1
	typeDeviceDisconnect         = 2
	typeReset                    = 3
	typeInterfaceInfo            = 4
	typeEPInfo                   = 5
	typeSetConfiguration         = 6
	typeGetConfiguration         = 7
	typeConfigurationStatus      = 8
	typeSetAltSetting            = 9
	typeGetAltSetting            = 10
	typeAltSettingStatus         = 11
	typeStartIsoStream           = 12
	typeStopIsoStream            = 13
	typeIsoStreamStatus          = 14
	typeStartInterruptReceiving  = 15
	typeStopInterruptReceiving   = 16
	typeInterruptReceivingStatus = 17
	typeAllocBulkStreams         = 18
	typeFreeBulkStreams          = 19
	typeBulkStreamsStatus        = 20
	typeCancelDataPacket         = 21
	typeFilterReject             = 22
	typeFilterFilter             = 23
	typeDeviceDisconnectAck      = 24
	typeStartBulkReceiving       = 25
	typeStopBulkReceiving        = 26
	typeBulkReceivingStatus      = 27

	typeControlPacket      = 100
	typeBulkPacket         = 101
	typeIsoPacket          = 102
	typeInterruptPacket    = 103
	typeBufferedBulkPacket = 104
)

// Status codes carried by status fields (protocols.md §6.2).
const (
	statusSuccess   = 0
	statusCancelled = 1
	statusInval     = 2
	statusIOError   = 3
	statusStall     = 4
	statusTimeout   = 5
	statusBabble    = 6
)

// Capability bits of the hello's first caps word (protocols.md §6.2).
type caps uint32

const (
	capBulkStreams          caps = 1 << 0
	capConnectDeviceVersion caps = 1 << 1
	capFilter               caps = 1 << 2
	capDeviceDisconnectAck  caps = 1 << 3
	capEPInfoMaxPacketSize  caps = 1 << 4
	cap64BitIDs             caps = 1 << 5
	cap32BitBulkLength      caps = 1 << 6
	capBulkReceiving        caps = 1 << 7
)

// ourCaps is what vscard advertises. Everything QEMU checks before putting
// a device on an xHCI port (ep_info_max_packet_size, 32bits_bulk_length and
// 64bits_ids, protocols.md §6.4 step 1), plus connect_device_version so the
// guest sees bcdDevice, device_disconnect_ack so a shutdown can wait for the
// peer to have seen the unplug, and filter because QEMU may send its filter
// rules (accepted and ignored). Not bulk_streams nor bulk_receiving: a CCID
// reader needs neither, and QEMU uses buffered bulk only for quirk devices.
const ourCaps = capConnectDeviceVersion | capFilter | capDeviceDisconnectAck |
	capEPInfoMaxPacketSize | cap64BitIDs | cap32BitBulkLength

// Limits. The reference parser accepts bulk transfers up to 128 MiB; a
// CCID message is at most a few KiB (dwMaxCCIDMessageLength), so anything
// past maxData is an error, rejected before allocating (protocols.md §6.3).
const (
	maxData      = 1 << 20
	maxSkip      = 128<<20 + 1024 // the reference parser's packet limit
	helloLen     = 64
	maxControlIn = 4096
	hdrLen32     = 12
	hdrLen64     = 16
)

// codec holds what the negotiated capabilities change in the framing.
type codec struct {
	ids64  bool // 16-byte header
	both   caps // capabilities both hellos advertise (0 before the peer's hello)
	bulk32 bool // bulk_packet carries length_high
}

func (c codec) headerLen() int {
	if c.ids64 {
		return hdrLen64
	}
	return hdrLen32
}

// packet is one decoded packet from the peer.
type packet struct {
	typ  uint32
	id   uint64
	hdr  []byte // type-specific header, exactly its negotiated size
	data []byte
}

// errMalformed marks a packet that was read completely but violates the
// protocol; the stream stays in sync and the session goes on.
var errMalformed = errors.New("usbredir: malformed packet")

// malformedError is errMalformed with the packet it concerns, so that the
// session can answer a data packet with an error status.
type malformedError struct {
	p      packet
	reason string
}

func (e *malformedError) Error() string {
	return fmt.Sprintf("usbredir: malformed packet type %d id %d: %s", e.p.typ, e.p.id, e.reason)
}

func (e *malformedError) Unwrap() error { return errMalformed }

// recvHeaderLen is the size of the type-specific header of a packet the
// peer (the usb-guest) sends to us, or -1 when the guest never sends that
// type (it is then skipped by length, as the reference parser does).
func (c codec) recvHeaderLen(typ uint32) int {
	switch typ {
	case typeHello:
		return helloLen
	case typeReset, typeGetConfiguration, typeCancelDataPacket,
		typeFilterReject, typeFilterFilter, typeDeviceDisconnectAck:
		return 0
	case typeSetConfiguration, typeGetAltSetting, typeStopIsoStream,
		typeStartInterruptReceiving, typeStopInterruptReceiving:
		return 1
	case typeSetAltSetting:
		return 2
	case typeStartIsoStream:
		return 3
	case typeFreeBulkStreams, typeIsoPacket, typeInterruptPacket:
		return 4
	case typeStopBulkReceiving:
		return 5
	case typeAllocBulkStreams:
		return 8
	case typeStartBulkReceiving, typeControlPacket:
		return 10
	case typeBulkPacket:
		return c.bulkHeaderLen()
	}
	return -1
}

func (c codec) bulkHeaderLen() int {
	if c.bulk32 {
		return 10
	}
	return 8
}

// carriesData reports whether a packet type may have data after its
// type-specific header at all; which direction carries it is checked
// separately (dataRule).
func carriesData(typ uint32) bool {
	switch typ {
	case typeHello, typeControlPacket, typeBulkPacket, typeIsoPacket,
		typeInterruptPacket, typeFilterFilter:
		return true
	}
	return false
}

// endpointAndLength returns the endpoint and transfer length fields of a
// data packet's type-specific header.
func (c codec) endpointAndLength(p packet) (ep uint8, n int, ok bool) {
	switch p.typ {
	case typeControlPacket:
		return p.hdr[0], int(binary.LittleEndian.Uint16(p.hdr[8:])), true
	case typeBulkPacket:
		n = int(binary.LittleEndian.Uint16(p.hdr[2:]))
		if c.bulk32 {
			n |= int(binary.LittleEndian.Uint16(p.hdr[8:])) << 16
		}
		return p.hdr[0], n, true
	case typeIsoPacket, typeInterruptPacket:
		return p.hdr[0], int(binary.LittleEndian.Uint16(p.hdr[2:])), true
	}
	return 0, 0, false
}

// readPacket reads the next packet. A packet the peer may not send, or one
// that is too long for us, is consumed and reported as a *malformedError;
// any other error means the stream is unusable (I/O error, EOF, or a length
// beyond what even the reference parser accepts).
func (c codec) readPacket(r *bufio.Reader) (packet, error) {
	var h [hdrLen64]byte
	hl := c.headerLen()
	if _, err := io.ReadFull(r, h[:hl]); err != nil {
		return packet{}, err
	}
	p := packet{typ: binary.LittleEndian.Uint32(h[0:])}
	length := binary.LittleEndian.Uint32(h[4:])
	if c.ids64 {
		p.id = binary.LittleEndian.Uint64(h[8:])
	} else {
		p.id = uint64(binary.LittleEndian.Uint32(h[8:]))
	}
	if length > maxSkip {
		return p, fmt.Errorf("usbredir: packet type %d length %d exceeds %d", p.typ, length, maxSkip)
	}
	thl := c.recvHeaderLen(p.typ)
	bad := ""
	switch {
	case thl < 0:
		bad = "type not sent by a usb-guest"
	case int64(length) < int64(thl):
		bad = fmt.Sprintf("length %d shorter than its %d-byte header", length, thl)
	case int64(length) > int64(thl) && !carriesData(p.typ):
		bad = fmt.Sprintf("length %d: unexpected data after the %d-byte header", length, thl)
	case int64(length)-int64(thl) > maxData:
		bad = fmt.Sprintf("length %d exceeds the %d-byte limit", length, maxData)
	}
	if bad != "" {
		// Keep the header (when it fits) so a data packet can be answered
		// with an error status under its id.
		keep := 0
		if thl > 0 && int64(length) >= int64(thl) {
			keep = thl
			p.hdr = make([]byte, thl)
			if _, err := io.ReadFull(r, p.hdr); err != nil {
				return packet{}, midPacket(err)
			}
		}
		if _, err := r.Discard(int(length) - keep); err != nil {
			return packet{}, midPacket(err)
		}
		return p, &malformedError{p: p, reason: bad}
	}
	buf := make([]byte, length)
	if _, err := io.ReadFull(r, buf); err != nil {
		return packet{}, midPacket(err)
	}
	p.hdr, p.data = buf[:thl:thl], buf[thl:]
	if len(p.data) == 0 {
		p.data = nil
	}
	if err := c.checkData(p); err != nil {
		return p, err
	}
	return p, nil
}

// midPacket reports an EOF after a packet's header as what it is: the
// peer went away in the middle of a packet, not between packets.
func midPacket(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// checkData applies the data-direction rule (protocols.md §6.3): data
// follows the header only for an OUT endpoint's packets from the guest,
// and then its size equals the header's length field.
func (c codec) checkData(p packet) error {
	switch p.typ {
	case typeHello:
		// Like the reference parser, take whole caps words and ignore a
		// ragged tail rather than lose the hello the session needs.
		return nil
	case typeFilterFilter:
		if len(p.data) == 0 || p.data[len(p.data)-1] != 0 {
			return &malformedError{p: p, reason: "filter string not NUL-terminated"}
		}
		return nil
	}
	ep, n, ok := c.endpointAndLength(p)
	if !ok {
		return nil
	}
	if ep&0x80 == 0 {
		if len(p.data) != n {
			return &malformedError{p: p, reason: fmt.Sprintf("%d data bytes for length %d", len(p.data), n)}
		}
		return nil
	}
	if len(p.data) != 0 {
		return &malformedError{p: p, reason: fmt.Sprintf("data on IN endpoint %#02x", ep)}
	}
	if p.typ == typeIsoPacket || p.typ == typeInterruptPacket {
		return &malformedError{p: p, reason: "IN packet sent by the guest"}
	}
	return nil
}

// appendPacket encodes one packet for the peer.
func (c codec) appendPacket(b []byte, typ uint32, id uint64, hdr, data []byte) []byte {
	var h [hdrLen64]byte
	binary.LittleEndian.PutUint32(h[0:], typ)
	binary.LittleEndian.PutUint32(h[4:], uint32(len(hdr)+len(data)))
	hl := hdrLen32
	if c.ids64 {
		binary.LittleEndian.PutUint64(h[8:], id)
		hl = hdrLen64
	} else {
		binary.LittleEndian.PutUint32(h[8:], uint32(id))
	}
	b = append(b, h[:hl]...)
	b = append(b, hdr...)
	return append(b, data...)
}

// helloPayload is our hello's type-specific header plus caps.
func helloPayload(version string) (hdr, data []byte) {
	hdr = make([]byte, helloLen)
	// NUL-terminated free text (protocols.md §6.3): at most 63 characters.
	copy(hdr[:helloLen-1], version)
	data = binary.LittleEndian.AppendUint32(nil, uint32(ourCaps))
	return hdr, data
}

// parseHello returns the peer's version string and first caps word.
func parseHello(p packet) (string, caps) {
	v := p.hdr
	for i, b := range v {
		if b == 0 {
			v = v[:i]
			break
		}
	}
	var c caps
	if len(p.data) >= 4 {
		c = caps(binary.LittleEndian.Uint32(p.data))
	}
	// The reference parser drops bulk_streams from a peer without
	// ep_info_max_packet_size (protocols.md §6.2).
	if c&capEPInfoMaxPacketSize == 0 {
		c &^= capBulkStreams
	}
	return string(v), c
}

// negotiate returns the codec for packets after both hellos.
func negotiate(peer caps) codec {
	both := ourCaps & peer
	return codec{ids64: both&cap64BitIDs != 0, both: both, bulk32: both&cap32BitBulkLength != 0}
}

// epIndex is an endpoint's slot in ep_info's arrays: 0..15 OUT, 16..31 IN.
func epIndex(ep uint8) int {
	i := int(ep & 0x0F)
	if ep&0x80 != 0 {
		i += 16
	}
	return i
}
