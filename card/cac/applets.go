package cac

import (
	"context"
	"fmt"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/tlv"
)

// CAC instruction bytes (GSC-IS 2.1 §5.3.3).
const (
	insGetProperties = 0x56
	insReadBuffer    = 0x52
	insUpdateBuffer  = 0x58
	insGetACR        = 0x4C
	insSignDecrypt   = 0x42
	insSelect        = 0xA4
	insVerify        = 0x20
	insGetResponse   = 0xC0
	insGetChallenge  = 0x84
	insGetData       = 0xCA
	insExternalAuth  = 0x82
	insReadBinary    = 0xB0
)

// AIDs of the fixed applets (§3).
var (
	aidACA      = []byte{0xA0, 0x00, 0x00, 0x00, 0x79, 0x03, 0x00}
	aidCCC      = []byte{0xA0, 0x00, 0x00, 0x01, 0x16, 0xDB, 0x00}
	aidACF      = []byte{0xA0, 0x00, 0x00, 0x01, 0x16, 0x30, 0x00}
	aidGP       = []byte{0xA0, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00}
	aidMSFT     = []byte{0xA0, 0x00, 0x00, 0x03, 0x97, 0x43, 0x49, 0x44, 0x5F, 0x01, 0x00}
	ridGSC      = []byte{0xA0, 0x00, 0x00, 0x00, 0x79}
	appletInfo  = []byte{0x10, 0x02, 0x06, 0x02, 0x03} // family 10, version 2.6.2.3
	acaInfo     = []byte{0x10, 0x02, 0x06, 0x02, 0x02} // the ACA says 2.6.2.2
	emptyBuffer = []byte{0x00, 0x00}
)

// gsc returns the 7-byte AID A0 00 00 00 79 hi lo.
func gsc(hi, lo byte) []byte { return append(append([]byte(nil), ridGSC...), hi, lo) }

// fci is libcacard's SELECT answer: 6F <n+4> 84 <n> AID A5 00 (§4.1).
func fci(aid []byte) []byte {
	out := []byte{0x6F, byte(len(aid) + 4), 0x84, byte(len(aid))}
	out = append(out, aid...)
	return append(out, 0xA5, 0x00)
}

// appletKind selects which of libcacard's handlers an applet uses (§3.1).
type appletKind uint8

const (
	kindRead        appletKind = iota // CCC, empty, placeholder, ACF: READ BUFFER, UPDATE 69 00
	kindPassthrough                   // Person Instance / Personnel: like kindRead (soft cards hold no data)
	kindACA                           // GET ACR; no buffers
	kindPKI                           // READ BUFFER, SIGN; UPDATE 69 85
)

// prop is one top-level GET PROPERTIES element, already encoded.
type prop struct {
	tag byte
	enc []byte
}

// bufApplet is a CAC applet with properties and T/V buffers: everything
// but the GP and Microsoft applets.
type bufApplet struct {
	c     *Card
	kind  appletKind
	aid   []byte
	fci   []byte
	coids [][2]byte
	// props are the short (P1=01) properties; long is the P1=40 form.
	props []prop
	short []byte
	long  []byte
	// t and v are the T- and V-buffer files, each with its 2-byte LE
	// length prefix (§5.2).
	t, v []byte
}

func (a *bufApplet) AID() []byte       { return a.aid }
func (a *bufApplet) Select(int) []byte { return a.fci }

func (a *bufApplet) Handle(_ context.Context, _ int, cmd apdu.Command) (apdu.Response, bool, error) {
	if a.kind == kindACA {
		if cmd.INS == insGetACR {
			return a.c.getACR(cmd), true, nil
		}
		return a.common(cmd)
	}
	switch cmd.INS {
	case insReadBuffer:
		return a.readBuffer(cmd), true, nil
	case insUpdateBuffer:
		return apdu.Status(apdu.SWCommandNotAllowed), true, nil
	}
	return a.common(cmd)
}

// common is cac_common_process_apdu: GET PROPERTIES, SELECT by COID, and
// 6D 00 for everything the generic path would not take (§3.1).
func (a *bufApplet) common(cmd apdu.Command) (apdu.Response, bool, error) {
	switch cmd.INS {
	case insGetProperties:
		return a.getProperties(cmd), true, nil
	case insSelect:
		if cmd.P1 != 0x02 {
			return apdu.Response{}, false, nil // P1=04 and errors: generic path
		}
		if len(cmd.Data) != 2 {
			return apdu.Status(apdu.SWDataInvalid), true, nil
		}
		// The selected object is not remembered: every COID of an
		// applet shows the same buffers (§4.1).
		for _, id := range a.coids {
			if id[0] == cmd.Data[0] && id[1] == cmd.Data[1] {
				return apdu.Status(apdu.SWOK), true, nil
			}
		}
		return apdu.Status(apdu.SWFileNotFound), true, nil
	case insGetResponse, insVerify:
		return apdu.Response{}, false, nil
	case insGetChallenge:
		if !a.c.strict {
			r, err := a.c.challenge(cmd)
			return r, true, err
		}
	}
	return apdu.Status(apdu.SWINSNotSupported), true, nil
}

// getProperties implements GET PROPERTIES (§4.2) with Rule B sizing: an
// Le larger than the answer gives 6C LL; equal or smaller goes on to
// Rule A in the engine.
func (a *bufApplet) getProperties(cmd apdu.Command) apdu.Response {
	if cmd.P2 != 0 {
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	var data []byte
	switch cmd.P1 {
	case 0x01:
		if len(cmd.Data) != 0 {
			return apdu.Status(apdu.SWDataInvalid)
		}
		data = a.short
	case 0x02:
		if len(cmd.Data) == 0 {
			return apdu.Status(apdu.SWDataInvalid)
		}
		// Only top-level short properties, in request order; a tag
		// asked twice is returned twice.
		for _, tag := range cmd.Data {
			found := false
			for _, p := range a.props {
				if p.tag == tag {
					data = append(data, p.enc...)
					found = true
					break
				}
			}
			if !found {
				return apdu.Status(apdu.SWReferencedDataNotFound)
			}
		}
	case 0x40:
		// Undocumented "long" properties; libcacard ignores Lc here.
		data = a.long
	default: // including 00, the GSC-IS 2.0 format
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	if cmd.Ne > len(data) {
		return apdu.Status(apdu.SWWrongLe.WithLen(len(data)))
	}
	return apdu.OK(data)
}

// readBuffer implements READ BUFFER (§4.3): data = type, count; P1P2 =
// offset into the file including its length prefix.
func (a *bufApplet) readBuffer(cmd apdu.Command) apdu.Response {
	if len(cmd.Data) != 2 {
		return apdu.Status(apdu.SWDataInvalid)
	}
	var buf []byte
	switch cmd.Data[0] {
	case 0x01:
		buf = a.t
	case 0x02:
		buf = a.v
	default:
		return apdu.Status(apdu.SWDataInvalid)
	}
	off := int(cmd.P1)<<8 | int(cmd.P2)
	if off > len(buf) {
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	n := min(int(cmd.Data[1]), len(buf)-off)
	return apdu.OK(buf[off : off+n])
}

// el encodes one SimpleTLV element whose value parts are concatenated.
// Property values are all short, so the one-byte length form applies.
func el(tag byte, parts ...[]byte) []byte {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	out := make([]byte, 0, 2+n)
	out = append(out, tag, byte(n))
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// setProps fills props/short/long; extra are the P1=40-only elements.
func (a *bufApplet) setProps(props []prop, extra ...[]byte) {
	a.props = props
	a.short = nil
	for _, p := range props {
		a.short = append(a.short, p.enc...)
	}
	a.long = append([]byte(nil), a.short...)
	for _, e := range extra {
		a.long = append(a.long, e...)
	}
}

// longExtras are the undocumented 39 and 3A (ACA AID) elements PKI and CCC
// add for P1=40 (§4.2).
var longExtras = [][]byte{el(0x39, []byte{0x00}), el(0x3A, aidACA)}

// stdProps returns applet info, number of objects and the object list.
func stdProps(info []byte, objs ...[]byte) []prop {
	ps := []prop{
		{0x01, el(0x01, info)},
		{0x40, el(0x40, []byte{byte(len(objs))})},
	}
	for _, o := range objs {
		ps = append(ps, prop{o[0], o})
	}
	return ps
}

// bufferProps is the 42 element: tag-type byte, then T and V file
// lengths LE, prefixes included (§4.2).
func bufferProps(tagType byte, tlen, vlen int) []byte {
	return el(0x42, []byte{tagType, byte(tlen), byte(tlen >> 8), byte(vlen), byte(vlen >> 8)})
}

// emptyObject is the 50 object libcacard advertises for applets whose
// buffers are empty: it claims 0x60 bytes each anyway (§4.2).
func emptyObject(coid [2]byte, tagType byte) []byte {
	return el(0x50, el(0x41, coid[:]), el(0x42, []byte{tagType, 0x60, 0x00, 0x60, 0x00}), el(0x26, []byte{0x01}))
}

// file prefixes b with its 2-byte little-endian length (§5.2).
func file(b []byte) []byte {
	out := make([]byte, 2, 2+len(b))
	out[0], out[1] = byte(len(b)), byte(len(b)>>8)
	return append(out, b...)
}

// splitFile encodes elems as T and V files.
func splitFile(elems ...tlv.Simple) (t, v []byte, err error) {
	tb, vb, err := tlv.SplitSimple(elems...)
	if err != nil {
		return nil, nil, err
	}
	if len(tb) > 0xFFFF || len(vb) > 0xFFFF {
		return nil, nil, errFileTooLarge
	}
	return file(tb), file(vb), nil
}

// newStaticApplets builds every applet but the PKI ones (§3). firstSum is
// SHA-256 of the first certificate's DER.
func newStaticApplets(c *Card, npki int, firstSum [32]byte) ([]card.Applet, error) {
	var out []card.Applet
	add := func(a *bufApplet) {
		a.c = c
		a.fci = fci(a.aid)
		out = append(out, a)
	}

	aca := &bufApplet{kind: kindACA, aid: aidACA, coids: [][2]byte{{0x03, 0x00}}}
	aca.props = []prop{{0x01, el(0x01, acaInfo)}}
	aca.short = aca.props[0].enc
	aca.long = acaLongProps
	add(aca)

	ccc := &bufApplet{kind: kindRead, aid: aidCCC, coids: [][2]byte{{0xDB, 0x00}}}
	var err error
	if ccc.t, ccc.v, err = c.cccFiles(npki, firstSum); err != nil {
		return nil, err
	}
	ccc.setProps(stdProps(appletInfo,
		el(0x50, el(0x41, []byte{0xDB, 0x00}), bufferProps(0x00, len(ccc.t), len(ccc.v)))),
		longExtras...)
	add(ccc)

	// Applets without objects.
	for _, lo := range []byte{0xF0, 0xF1, 0xF2} {
		a := &bufApplet{kind: kindRead, aid: gsc(0x02, lo), t: emptyBuffer, v: emptyBuffer}
		a.setProps(stdProps(appletInfo))
		add(a)
	}
	// Empty generic containers and the PKI placeholders: tag type 01.
	for _, id := range [][2]byte{{0x02, 0xFB}, {0x02, 0xFE}, {0x02, 0xFD}} {
		a := &bufApplet{kind: kindRead, aid: gsc(id[0], id[1]), coids: [][2]byte{id}, t: emptyBuffer, v: emptyBuffer}
		a.setProps(stdProps(appletInfo, emptyObject(id, 0x01)))
		add(a)
	}
	// Passthrough applets: soft cards have no data objects to map.
	for _, id := range [][2]byte{{0x02, 0x00}, {0x02, 0x01}} {
		a := &bufApplet{kind: kindPassthrough, aid: gsc(id[0], id[1]), coids: [][2]byte{id}, t: emptyBuffer, v: emptyBuffer}
		a.setProps(stdProps(appletInfo, emptyObject(id, 0x00)))
		add(a)
	}
	for _, id := range [][2]byte{{0x12, 0x01}, {0x12, 0x02}} {
		a := &bufApplet{kind: kindRead, aid: gsc(id[0], id[1]), coids: [][2]byte{id}, t: emptyBuffer, v: emptyBuffer}
		a.setProps(stdProps(appletInfo, emptyObject(id, 0x01)))
		add(a)
	}
	// Access Control File with its four SP 800-73 objects.
	acfIDs := [][2]byte{{0x30, 0x00}, {0x60, 0x10}, {0x60, 0x30}, {0x90, 0x00}}
	acf := &bufApplet{kind: kindRead, aid: aidACF, coids: acfIDs, t: emptyBuffer, v: emptyBuffer}
	var objs [][]byte
	for _, id := range acfIDs {
		objs = append(objs, emptyObject(id, 0x01))
	}
	acf.setProps(stdProps(appletInfo, objs...))
	add(acf)

	out = append(out, &gpApplet{c: c, cplc: cplc(firstSum)}, &msftApplet{c: c, fci: fci(aidMSFT)})
	return out, nil
}

// acaLongProps is the ACA's P1=40 answer, constant in libcacard (§4.2).
var acaLongProps = []byte{
	0x01, 0x05, 0x10, 0x02, 0x06, 0x02, 0x02,
	0x23, 0x0C, 0x20, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x58,
	0x2A, 0x02, 0x02, 0x00,
	0x2B, 0x05, 0xA0, 0x00, 0x00, 0x00, 0x79,
	0x22, 0x10, 0x00, 0x00, 0x00, 0xDA, 0x01, 0xB4, 0x03, 0x30, 0x00, 0x00, 0x00, 0x70, 0x00, 0x51, 0x02, 0x9D,
	0x2C, 0x01, 0x00,
	0x20, 0x02, 0x08, 0x01,
	0x21, 0x01, 0x0F,
	0x32, 0x04, 0x03, 0x03, 0x03, 0x03,
	0x30, 0x01, 0x08,
	0x31, 0x04, 0x06, 0x08, 0x00, 0x00,
	0x24, 0x01, 0xFF,
	0x25, 0x02, 0x01, 0x00,
	0x26, 0x01, 0x01,
}

// strictCardID is the 14-byte card ID every libcacard card carries in its
// CCC (§5.4).
var strictCardID = []byte{0x40, 0x70, 0x50, 0x72, 0x36, 0x0E, 0x00, 0x00, 0x58, 0xBD, 0x00, 0x2C, 0x19, 0xB5}

// cccFiles builds the CCC T and V files (§5.4).
func (c *Card) cccFiles(npki int, firstSum [32]byte) (t, v []byte, err error) {
	cardID := strictCardID
	if !c.strict {
		// Default mode: a per-card ID. OpenSC makes the PKCS#11 serial
		// from the end of it and keys its file cache on that serial,
		// so every byte comes from the first certificate
		// (DIFFERENCES.md).
		cardID = firstSum[:14]
	}
	// F0: GSC RID, manufacturer 03, card type 02 (JavaCard), card ID.
	f0 := append(append(append([]byte(nil), ridGSC...), 0x03, 0x02), cardID...)
	elems := []tlv.Simple{{Tag: 0xF0, Value: f0}, {Tag: 0xF1, Value: []byte{0x21}}, {Tag: 0xF2, Value: []byte{0x21}}}
	url := func(rid []byte, typ byte, oid, app [2]byte) []byte {
		u := make([]byte, 0, 16)
		u = append(u, rid...)
		u = append(u, typ, oid[0], oid[1], app[0], app[1])
		return append(u, 0, 0, 0, 0, 0, 0)
	}
	nist := []byte{0xA0, 0x00, 0x00, 0x01, 0x16}
	for _, id := range [][2]byte{{0x02, 0xFB}, {0x02, 0xFE}, {0x02, 0xFD}, {0x02, 0x00}, {0x02, 0x01}} {
		elems = append(elems, tlv.Simple{Tag: 0xF3, Value: url(ridGSC, 0x01, id, id)})
	}
	for _, id := range [][2]byte{{0x30, 0x00}, {0x60, 0x10}, {0x60, 0x30}, {0x90, 0x00}} {
		elems = append(elems, tlv.Simple{Tag: 0xF3, Value: url(nist, 0x01, id, [2]byte{0x30, 0x00})})
	}
	for _, id := range [][2]byte{{0x12, 0x01}, {0x12, 0x02}} {
		elems = append(elems, tlv.Simple{Tag: 0xF3, Value: url(ridGSC, 0x01, id, id)})
	}
	for i := range npki {
		id := [2]byte{0x01, byte(i)}
		elems = append(elems, tlv.Simple{Tag: 0xF3, Value: url(ridGSC, 0x04, id, id)})
	}
	acr := make([]byte, 17)
	acr[0] = 0x07
	copy(acr[1:], aidACA)
	elems = append(elems,
		tlv.Simple{Tag: 0xF4, Value: []byte{0x00}},
		tlv.Simple{Tag: 0xF5, Value: []byte{0x10}},
		tlv.Simple{Tag: 0xF6, Value: acr},
		tlv.Simple{Tag: 0xF7}, tlv.Simple{Tag: 0xFA}, tlv.Simple{Tag: 0xFB},
		tlv.Simple{Tag: 0xFC}, tlv.Simple{Tag: 0xFD}, tlv.Simple{Tag: 0xFE},
	)
	t, v, err = splitFile(elems...)
	if err != nil {
		return nil, nil, fmt.Errorf("CCC: %w", err)
	}
	if !c.strict && qemu54Risk(len(t)-2) {
		// With three certificates the T-buffer holds 52 bytes, and its
		// read answers 52 bytes + 90 00: the 54-byte response QEMU 7.2's
		// usb-ccid cannot deliver (peers.md appendix). Writing the last,
		// empty element's length in the 3-byte form adds two bytes.
		// Parsers never reach it: OpenSC and CoolKey stop when the
		// V-buffer is used up, after F6.
		t = append(t[:len(t)-1], 0xFF, 0x00, 0x00)
		t[0], t[1] = byte(len(t)-2), byte((len(t)-2)>>8)
	}
	return t, v, nil
}

// qemu54Risk reports whether reading a buffer of n bytes in the chunks
// OpenSC (240 bytes) and CoolKey (255 bytes) use ends with a 52-byte
// chunk. Its answer, 52 bytes + 90 00, is a 54-byte R-APDU: a 64-byte
// CCID DataBlock after which QEMU 7.2's usb-ccid sends a zero-length
// packet that the guest takes for the next response, losing sync for
// good (peers.md appendix "QEMU 7.2 usb-ccid loses sync on a 54-byte
// response"). CoolKey does not follow a 61xx split of that answer, so the
// transport's workaround cannot help it: the card must not produce it.
func qemu54Risk(n int) bool { return n%240 == 52 || n%255 == 52 }
