package piv

import (
	"context"
	"crypto/subtle"
	"errors"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/tlv"
	"github.com/vscard/vscard/token"
)

// Instruction bytes (SP 800-73-4 Part 2 §3; Yubico's vendor extensions
// as yubico-piv-tool's ykpiv.h names them).
const (
	insSelect       = 0xA4
	insGetResponse  = 0xC0
	insVerify       = 0x20
	insChangeRef    = 0x24
	insResetRetry   = 0x2C
	insGenAuth      = 0x87
	insGenerate     = 0x47
	insGetData      = 0xCB
	insPutData      = 0xDB
	insYKGetVersion = 0xFD
	insYKGetSerial  = 0xF8
	insYKSetMgmKey  = 0xFF
	insYKImportKey  = 0xFE
)

// Status words ISO 7816-4 names that package apdu does not.
const (
	swNotEnoughMemory apdu.SW = 0x6A84
	swIncorrectP1     apdu.SW = 0x6A86
)

// maxChain bounds the data one chained command may accumulate: the
// largest legitimate input is a certificate object (SP 800-73-4 caps
// containers at a few KiB) or an RSA-4096 block.
const maxChain = 16 << 10

// Handle implements card.Applet. It sees every command on its channel,
// whatever the CLA, so command chaining (CLA 10) reaches it directly.
func (a *application) Handle(ctx context.Context, ch int, cmd apdu.Command) (apdu.Response, bool, error) {
	c := a.c
	switch cmd.INS {
	case insSelect, insGetResponse:
		// The engine's generic path selects (with prefix matching) and
		// drains buffered responses.
		c.dropChain()
		return apdu.Response{}, false, nil
	}
	// CLA: 00-03 and, for chaining, 10-13; secure messaging is not
	// supported (PIV's SM needs a pairing the card does not have).
	if cmd.CLA&0x0C != 0 {
		c.dropChain()
		return apdu.Status(apdu.SWSecureMessaging), true, nil
	}
	if cmd.CLA&^0x13 != 0 {
		c.dropChain()
		return apdu.Status(apdu.SWCLANotSupported), true, nil
	}

	// Command chaining (ISO 7816-4 §5.1.1.1): CLA bit 10 says more data
	// follows in a command with the same INS P1 P2; any other command
	// abandons the chain.
	hdr := [3]byte{cmd.INS, cmd.P1, cmd.P2}
	if c.chaining && hdr != c.chainHdr {
		c.dropChain()
	}
	if cmd.CLA&0x10 != 0 {
		if !chainable(cmd.INS) {
			return apdu.Status(apdu.SWFuncNotSupported), true, nil
		}
		if len(c.chain)+len(cmd.Data) > maxChain {
			c.dropChain()
			return apdu.Status(swNotEnoughMemory), true, nil
		}
		c.chain = append(c.chain, cmd.Data...)
		c.chainHdr = hdr
		c.chaining = true
		return apdu.Status(apdu.SWOK), true, nil
	}
	if c.chaining {
		if len(c.chain)+len(cmd.Data) > maxChain {
			c.dropChain()
			return apdu.Status(swNotEnoughMemory), true, nil
		}
		cmd.Data = append(c.chain, cmd.Data...)
		c.chaining = false
		// The chain buffer is reused by the next chain only after this
		// command is done with it.
		defer func() { c.chain = c.chain[:0] }()
	}

	resp, err := c.dispatch(ctx, cmd)
	if err != nil {
		return apdu.Response{}, true, err
	}
	return resp, true, nil
}

// chainable reports whether a command may be sent in chained parts: the
// ones whose data can exceed a short APDU.
func chainable(ins byte) bool {
	switch ins {
	case insGenAuth, insPutData, insYKImportKey, insChangeRef, insResetRetry, insVerify, insGenerate:
		return true
	}
	return false
}

func (c *Card) dispatch(ctx context.Context, cmd apdu.Command) (apdu.Response, error) {
	switch cmd.INS {
	case insVerify:
		return c.verify(cmd), nil
	case insChangeRef:
		return c.changeReference(cmd), nil
	case insResetRetry:
		return c.resetRetry(cmd), nil
	case insGetData:
		return c.getData(cmd), nil
	case insPutData:
		return c.putData(cmd), nil
	case insGenAuth:
		return c.generalAuthenticate(ctx, cmd)
	case insGenerate:
		return c.generate(ctx, cmd)
	case insYKGetVersion:
		return apdu.OK(c.version[:]), nil
	case insYKGetSerial:
		var b [4]byte
		b[0], b[1], b[2], b[3] = byte(c.serial>>24), byte(c.serial>>16), byte(c.serial>>8), byte(c.serial)
		return apdu.OK(b[:]), nil
	case insYKSetMgmKey:
		return c.setManagementKey(cmd), nil
	case insYKImportKey:
		return c.importKey(cmd), nil
	}
	return apdu.Status(apdu.SWINSNotSupported), nil
}

// pinValue checks the 8-byte FF-padded PIN block of VERIFY and friends
// (SP 800-73-4 Part 2 §3.2.1) and returns the PIN without its padding.
func pinValue(b []byte) ([]byte, bool) {
	if len(b) != 8 {
		return nil, false
	}
	n := len(b)
	for n > 0 && b[n-1] == 0xFF {
		n--
	}
	for _, x := range b[:n] {
		if x == 0xFF {
			return nil, false
		}
	}
	return b[:n], n > 0
}

// newPINOK enforces SP 800-73-4 Part 2 §2.4.3's PIN length (6–8 bytes) on
// a value about to be stored; the PUK is 8 bytes on most cards, but
// Yubico allows 6–8 for it too.
func newPINOK(p []byte) bool { return len(p) >= 6 && len(p) <= 8 }

// refPIN returns the PIN object for key reference 80 (PIN) or 81 (PUK).
func (c *Card) refPIN(p2 byte) token.SettablePIN {
	switch p2 {
	case 0x80:
		return c.st.PIN()
	case 0x81:
		return c.st.PUK()
	}
	return nil
}

// verify implements VERIFY (INS 20). PINs are never logged.
func (c *Card) verify(cmd apdu.Command) apdu.Response {
	pin := c.refPIN(cmd.P2)
	if pin == nil {
		return apdu.Status(apdu.SWReferencedDataNotFound)
	}
	switch cmd.P1 {
	case 0xFF:
		// Reset form (SP 800-73-4 Part 2 §3.2.1): no data, the
		// security status becomes false.
		if len(cmd.Data) != 0 {
			return apdu.Status(apdu.SWWrongLength)
		}
		if cmd.P2 == 0x80 {
			c.pinVerified, c.pinFresh = false, false
		}
		return apdu.Status(apdu.SWOK)
	case 0x00:
	default:
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	if len(cmd.Data) == 0 {
		// Status query: 90 00 when verified, else the tries left.
		if cmd.P2 == 0x80 && c.pinVerified {
			return apdu.Status(apdu.SWOK)
		}
		left, _ := pin.TriesLeft()
		if left <= 0 {
			return apdu.Status(apdu.SWAuthBlocked)
		}
		return triesLeft(left)
	}
	v, ok := pinValue(cmd.Data)
	if !ok {
		return apdu.Status(apdu.SWWrongData)
	}
	if cmd.P2 == 0x80 {
		c.pinVerified, c.pinFresh = false, false
	}
	resp := c.check(pin, v)
	if resp.SW == apdu.SWOK && cmd.P2 == 0x80 {
		c.pinVerified, c.pinFresh = true, true
	}
	return resp
}

// check verifies a PIN or PUK value and maps the outcome to a status word.
// The token persists the counter before it returns.
func (c *Card) check(pin token.PIN, v []byte) apdu.Response {
	left, err := pin.Verify(v)
	switch {
	case err == nil:
		return apdu.Status(apdu.SWOK)
	case errors.Is(err, token.ErrPINBlocked):
		return apdu.Status(apdu.SWAuthBlocked)
	case errors.Is(err, token.ErrPINIncorrect):
		if left <= 0 {
			// The try that blocked it: SP 800-73-4 answers 63 C0.
			return triesLeft(0)
		}
		return triesLeft(left)
	default:
		c.log.Warn("piv: PIN check failed", "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
}

// triesLeft encodes 63 Cx, x = tries left (at most 15).
func triesLeft(left int) apdu.Response {
	return apdu.Status(apdu.SWVerifyFailed | apdu.SW(max(0, min(left, 15))))
}

// changeReference implements CHANGE REFERENCE DATA (INS 24) for the PIN
// (80) and the PUK (81): data is the current and the new value, each
// FF-padded to 8 bytes.
func (c *Card) changeReference(cmd apdu.Command) apdu.Response {
	if cmd.P1 != 0x00 {
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	pin := c.refPIN(cmd.P2)
	if pin == nil {
		return apdu.Status(apdu.SWReferencedDataNotFound)
	}
	if len(cmd.Data) != 16 {
		return apdu.Status(apdu.SWWrongData)
	}
	old, ok1 := pinValue(cmd.Data[:8])
	nv, ok2 := pinValue(cmd.Data[8:])
	if !ok1 || !ok2 || !newPINOK(nv) {
		return apdu.Status(apdu.SWWrongData)
	}
	if cmd.P2 == 0x80 {
		c.pinVerified, c.pinFresh = false, false
	}
	if r := c.check(pin, old); r.SW != apdu.SWOK {
		return r
	}
	if err := pin.Set(nv); err != nil {
		c.log.Warn("piv: CHANGE REFERENCE DATA: store failed", "ref", cmd.P2, "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
	if cmd.P2 == 0x80 {
		c.pinVerified, c.pinFresh = true, true
	}
	return apdu.Status(apdu.SWOK)
}

// resetRetry implements RESET RETRY COUNTER (INS 2C): the PUK unblocks
// the PIN and sets a new value. Data is PUK and new PIN, 8 bytes each.
func (c *Card) resetRetry(cmd apdu.Command) apdu.Response {
	if cmd.P1 != 0x00 || cmd.P2 != 0x80 {
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	if len(cmd.Data) != 16 {
		return apdu.Status(apdu.SWWrongData)
	}
	puk, ok1 := pinValue(cmd.Data[:8])
	nv, ok2 := pinValue(cmd.Data[8:])
	if !ok1 || !ok2 || !newPINOK(nv) {
		return apdu.Status(apdu.SWWrongData)
	}
	c.pinVerified, c.pinFresh = false, false
	if r := c.check(c.st.PUK(), puk); r.SW != apdu.SWOK {
		return r
	}
	if err := c.st.PIN().Set(nv); err != nil {
		c.log.Warn("piv: RESET RETRY COUNTER: store failed", "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
	return apdu.Status(apdu.SWOK)
}

// pinProtected lists the objects whose read access rule is the PIN (SP
// 800-73-4 Part 1 table 3; cac.md §11).
func pinProtected(tag uint32) bool {
	switch tag {
	case TagPrinted, TagFingerprints, TagFacialImage, TagIris:
		return true
	}
	return false
}

// objectTag decodes the 5C tag list of GET DATA and PUT DATA: one BER tag
// of 1 to 3 bytes.
func objectTag(v []byte) (uint32, bool) {
	if len(v) < 1 || len(v) > 3 {
		return 0, false
	}
	var t uint32
	for _, b := range v {
		t = t<<8 | uint32(b)
	}
	return t, true
}

// getData implements GET DATA (INS CB): 00 CB 3F FF Lc 5C n <tag>.
func (c *Card) getData(cmd apdu.Command) apdu.Response {
	if cmd.P1 != 0x3F || cmd.P2 != 0xFF {
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	e, rest, err := tlv.ReadBER(cmd.Data)
	if err != nil || e.Tag != 0x5C || len(rest) != 0 {
		return apdu.Status(apdu.SWWrongData)
	}
	tag, ok := objectTag(e.Value)
	if !ok {
		return apdu.Status(apdu.SWWrongData)
	}
	if pinProtected(tag) && !c.pinVerified {
		return apdu.Status(apdu.SWSecurityNotSatisfied)
	}
	v, err := c.st.Object(tag)
	if errors.Is(err, ErrNotFound) {
		return apdu.Status(apdu.SWFileNotFound)
	}
	if err != nil {
		c.log.Warn("piv: GET DATA: store failed", "tag", tag, "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
	// Discovery and the BIT group template are returned under their own
	// tag; everything else inside 53 (SP 800-73-4 Part 2 §3.1.2).
	outer := uint32(0x53)
	if tag == TagDiscovery || tag == TagBITGroup {
		outer = tag
	}
	return apdu.OK(tlv.AppendBER(nil, outer, v))
}

// putData implements PUT DATA (INS DB), which needs the card management
// key: 5C <tag> 53 <value>, or 7E <value> for Discovery and 7F 61 for the
// BIT group template.
func (c *Card) putData(cmd apdu.Command) apdu.Response {
	if cmd.P1 != 0x3F || cmd.P2 != 0xFF {
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	if !c.mgmAuthed {
		return apdu.Status(apdu.SWSecurityNotSatisfied)
	}
	e, rest, err := tlv.ReadBER(cmd.Data)
	if err != nil {
		return apdu.Status(apdu.SWWrongData)
	}
	var tag uint32
	var value []byte
	switch e.Tag {
	case TagDiscovery, TagBITGroup:
		if len(rest) != 0 {
			return apdu.Status(apdu.SWWrongData)
		}
		tag, value = e.Tag, e.Value
	case 0x5C:
		t, ok := objectTag(e.Value)
		if !ok || t == TagDiscovery || t == TagBITGroup {
			return apdu.Status(apdu.SWWrongData)
		}
		d, rest2, err := tlv.ReadBER(rest)
		if err != nil || d.Tag != 0x53 || len(rest2) != 0 {
			return apdu.Status(apdu.SWWrongData)
		}
		tag, value = t, d.Value
	default:
		return apdu.Status(apdu.SWWrongData)
	}
	if err := c.st.PutObject(tag, value); err != nil {
		c.log.Warn("piv: PUT DATA: store failed", "tag", tag, "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
	return apdu.Status(apdu.SWOK)
}

// setManagementKey implements Yubico's SET MANAGEMENT KEY (INS FF, P1 FF
// or FE for touch, P2 FF): data 03|08|0A|0C, 9B, length, key. It needs
// the current management key.
func (c *Card) setManagementKey(cmd apdu.Command) apdu.Response {
	if (cmd.P1 != 0xFF && cmd.P1 != 0xFE) || cmd.P2 != 0xFF {
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	if !c.mgmAuthed {
		return apdu.Status(apdu.SWSecurityNotSatisfied)
	}
	d := cmd.Data
	if len(d) < 3 || d[1] != KeyManagementKey || int(d[2]) != len(d)-3 {
		return apdu.Status(apdu.SWWrongData)
	}
	alg, key := d[0], d[3:]
	if n, ok := mgmKeyLen(alg); !ok || n != len(key) {
		return apdu.Status(apdu.SWWrongData)
	}
	if err := c.st.SetManagementKey(alg, key); err != nil {
		c.log.Warn("piv: SET MANAGEMENT KEY: store failed", "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
	return apdu.Status(apdu.SWOK)
}

// equal compares secrets in constant time.
func equal(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }
