// Package vscard speaks the VSCard protocol: the link between a smart card
// owner and QEMU's ccid-card-passthru device (libcacard's vscard_common.h;
// protocols.md §1, §2; peers.md §1).
//
// # Model
//
// Two parties share a byte stream (TCP, Unix socket, TLS). The host is the
// side with the reader — QEMU, which shows the guest a USB CCID reader —
// and the client owns the card, as libcacard's vscclient does. Every
// message is a 12-byte big-endian header (type, reader id, payload length)
// and a payload. The client opens with Init and QEMU answers Init; the
// client then announces a reader (ReaderAdd) and inserts a card (ATR), and
// from then on the host sends command APDUs and the client answers each
// with a response APDU. QEMU acknowledges each of the client's reader and
// card messages with an Error message carrying code 0.
//
// The package has three layers:
//
//   - the codec: ReadMessage, AppendMessage and the payload helpers, which
//     validate every length before allocating;
//   - the client role, Client, which serves a card.Card to QEMU, keeps the
//     link up across QEMU restarts and dropped connections, and removes
//     the card cleanly on shutdown;
//   - the host role, Host, which plays QEMU's part so that vscard's own
//     reader can take cards from any VSCard client, vscclient included.
//
// # Peer quirks
//
// The roles tolerate what the real peers do (peers.md §1): QEMU's own Init
// at startup is lost, so the client always speaks first; QEMU puts reader
// id 0xFFFFFFFF in its Init, answers every ReaderAdd with reader 0, and its
// reply to ReaderRemove may arrive before or after the client's ReaderAdd
// is sent; vscclient writes Error codes in host byte order (ParseError)
// and always uses reader id 0, has a 270-byte receive buffer
// (HostOptions.MaxAPDU), and only handles a zero-length Flush once more
// bytes arrive. QEMU 7.2's usb-ccid loses sync on a 54-byte response; see
// ClientOptions.QEMU54Workaround.
package vscard
