package passthru

import (
	"github.com/vscard/vscard/card"
)

// T0ATR returns an ATR for the same card that offers only T=0, for readers
// that cannot do T=1: QEMU 7.2's usb-ccid announces dwProtocols T=0 only
// (protocols.md §3.2, §3.7), so the guest's libccid refuses a card whose
// ATR offers only T=1 ("Protocol T=1 not supported by reader", and OpenSC
// reports an unresponsive card). Most physical cards, and vsmartcard's
// vicc, offer only T=1.
//
// The new ATR keeps TS, TA1 (Fi/Di) and TC1 (extra guard time) and the
// historical bytes, which is what card drivers match on (OpenSC's ATR
// tables, Windows' smart card minidriver lookup), and drops TB1, every TD
// and the protocol-specific bytes, so no TCK is needed (ISO/IEC 7816-3
// §8.2.5). The exchange itself needs no translation: QEMU passes command
// APDUs through verbatim (protocols.md §3.7) and pcscd talks to the real
// card in its own protocol.
//
// changed is false, and atr is returned as is, when atr already offers
// T=0 or does not parse.
func T0ATR(atr []byte) (out []byte, changed bool) {
	a, err := card.ParseATR(atr)
	if err != nil {
		return atr, false
	}
	for _, p := range a.Protocols {
		if p == 0 {
			return atr, false
		}
	}
	k := byte(len(a.Historical))
	out = []byte{atr[0], k}
	if len(a.Groups) > 0 {
		g := a.Groups[0]
		if g.HasTA {
			out[1] |= 0x10
			out = append(out, g.TA)
		}
		if g.HasTC {
			out[1] |= 0x40
			out = append(out, g.TC)
		}
	}
	return append(out, a.Historical...), true
}
