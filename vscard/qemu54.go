package vscard

// The QEMU 7.2 54-byte workaround (ClientOptions.QEMU54Workaround).
//
// QEMU 7.2's usb-ccid wraps a response APDU in a 10-byte CCID DataBlock
// header; a 54-byte response makes exactly one full 64-byte bulk packet,
// which QEMU follows with a zero-length packet that the guest's libccid
// reads as the answer to its next command. Every later answer is then one
// command late until the reader is re-plugged (peers.md appendix "QEMU 7.2
// usb-ccid loses sync on a 54-byte response"). libcacard's CCC T-buffer
// is exactly that size, so the stock stack fails on the first
// `pkcs11-tool -L`.
//
// The fix stays within ISO 7816-4: a 54-byte response (52 data bytes and
// SW1 SW2) goes out as its first data byte followed by 61 33 ("51 more
// bytes available"), 3 bytes; the client keeps the other 51 data bytes and
// the original status word and answers the host's GET RESPONSE itself,
// without involving the card. Clients that follow 61 xx chains (OpenSC,
// CoolKey, Windows; OpenSC appends each GET RESPONSE answer to the data it
// already has) see the same 52 bytes and status word. The held part is at
// most 51 data bytes, so no answer built from it can be 54 bytes either.
// Any other command drops what is held, as a card drops its response
// buffer.
//
// Limit: CoolKey cannot be helped here. Its CKYCardConnection_ExchangeAPDU
// (dogtagpki/coolkey src/libckyapplet/cky_card.c) issues GET RESPONSE only
// when a response is exactly the 2 bytes 61 xx, and only once: it takes a
// split first answer (3 bytes) as the final one, and it cannot follow a
// chained GET RESPONSE either. When CoolKey reads a 52-byte object (the
// CCC T-buffer: READ FILE, 61 34, GET RESPONSE 34), any answer but the 54
// bytes fails it; only the card can avoid that, by not having objects
// whose reads end in 52-byte chunks.

// qemuBadLen is the response length QEMU 7.2 cannot deliver.
const qemuBadLen = 54

// split54 returns the first part of the 54-byte response resp and holds
// the rest for GET RESPONSE.
func (s *session) split54(resp []byte) []byte {
	data, sw := resp[:len(resp)-2], resp[len(resp)-2:]
	const first = 1
	s.held = append(append(make([]byte, 0, len(data)-first+2), data[first:]...), sw...)
	return []byte{data[0], 0x61, byte(len(data) - first)}
}

// isGetResponse reports whether cmd is GET RESPONSE (INS C0, P1 P2 00 00,
// case 2 short: just Le) under any CLA.
func isGetResponse(cmd []byte) bool {
	return len(cmd) == 5 && cmd[1] == 0xC0 && cmd[2] == 0 && cmd[3] == 0
}

// fromHeld answers GET RESPONSE with Le le (0 means 256) from the held
// remainder: as much data as Le allows, then the original status word if
// everything went out, or 61 xx for what is still held.
func (s *session) fromHeld(le byte) []byte {
	data, sw := s.held[:len(s.held)-2], s.held[len(s.held)-2:]
	n := len(data)
	if le != 0 {
		n = min(n, int(le))
	}
	out := append([]byte(nil), data[:n]...)
	if n == len(data) {
		s.held = nil
		return append(out, sw...)
	}
	rest := len(data) - n
	s.held = append(append(make([]byte, 0, rest+2), data[n:]...), sw...)
	return append(out, 0x61, byte(rest))
}
