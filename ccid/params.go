package ccid

import "github.com/vscard/vscard/card"

// params is a slot's protocol data structure (CCID 1.1 §6.1.7): 5 bytes
// for T=0, 7 for T=1.
type params struct {
	proto byte
	data  []byte
}

// paramsFromATR derives the protocol and parameters the reader settles on
// by itself (dwFeatures: automatic parameter configuration from the ATR):
// the ATR's first offered protocol and its TA1, TC1, TC2 or T=1 bytes,
// with ISO 7816-3 defaults for what it leaves out. An ATR that does not
// parse gives T=0 defaults.
func paramsFromATR(atr []byte) params {
	a, err := card.ParseATR(atr)
	fidi, inverse := byte(0x11), byte(0)
	var tc1 byte
	if err == nil {
		if len(a.Groups) > 0 {
			g := a.Groups[0]
			if g.HasTA {
				fidi = g.TA
			}
			if g.HasTC {
				tc1 = g.TC
			}
		}
		if a.Convention == card.Inverse {
			inverse = 0x02
		}
	}
	if err == nil && len(a.Protocols) > 0 && a.Protocols[0] == 1 {
		tcck := 0x10 | inverse
		if a.EDCIsCRC {
			tcck |= 0x01
		}
		return params{proto: 1, data: []byte{
			fidi, tcck, tc1,
			byte(a.BWI<<4 | a.CWI&0x0F), // bWaitingIntegerT1
			0,                           // bClockStop: not allowed
			byte(a.IFSC),                // bIFSC
			0,                           // bNadValue
		}}
	}
	wi := byte(10)
	if err == nil && a.HasWI {
		wi = byte(a.WI)
	}
	return params{proto: 0, data: []byte{fidi, inverse, tc1, wi, 0}}
}

// check validates a SetParameters structure, returning the CCID bError
// (offset of the offending byte in the message) or 0.
func checkParams(proto byte, d []byte) byte {
	switch proto {
	case 0:
		if len(d) != 5 {
			return 1 // dwLength
		}
		if d[1]&^0x02 != 0 { // bmTCCKST0: only the convention bit
			return 11
		}
		if d[4] > 3 {
			return 14
		}
	case 1:
		if len(d) != 7 {
			return 1
		}
		if d[1]&^0x03 != 0x10 { // bmTCCKST1: 0x10 | convention | CRC
			return 11
		}
		if d[4] > 3 {
			return 14
		}
		if d[5] == 0 || d[5] == 0xFF { // bIFSC 1..254
			return 15
		}
	default:
		return 7 // bProtocolNum
	}
	return 0
}
