package cac

import (
	"bytes"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/tlv"
)

// The ACA's GET ACR tables (§4.5). The data are libcacard 2.8's; the
// encoders reproduce its output, including the SimpleTLV forms that copy
// raw C struct bytes instead of the fields GSC-IS defines there.

type accessMethod struct{ provider, keyRef byte }

type acrEntry struct {
	acrid, acrType, appletID byte
	methods                  []accessMethod
}

// acrTable is the ACR table (GSC-IS Table 5-15 form).
var acrTable = []acrEntry{
	{0x00, 0x00, 0x00, nil},
	{0x01, 0x01, 0x00, nil},
	{0x02, 0x00, 0x1F, nil},
	{0x06, 0x06, 0x00, []accessMethod{{0x1E, 0x00}}},
	{0x04, 0x04, 0x1F, []accessMethod{{0x1F, 0x21}}},
	{0x08, 0x03, 0x00, []accessMethod{{0x1D, 0x01}, {0x1E, 0x01}}},
	{0x09, 0x02, 0x00, []accessMethod{{0x1D, 0x01}}},
	{0x0A, 0x03, 0x00, []accessMethod{{0x1D, 0x03}, {0x1E, 0x01}}},
	{0x0B, 0x02, 0x00, []accessMethod{{0x1D, 0x00}}},
	{0x10, 0x00, 0x1E, nil},
	{0x11, 0x00, 0x1D, nil},
}

// structBytes is what libcacard's SimpleTLV form puts in an A0 entry: the
// first 2n+3 bytes of its C struct (acrid, type, applet id, a padding
// byte, then a little-endian 32-bit count), not the access methods.
func (e acrEntry) structBytes() []byte {
	raw := []byte{e.acrid, e.acrType, e.appletID, 0x00, byte(len(e.methods)), 0, 0, 0}
	return raw[:2*len(e.methods)+3]
}

// Instruction config bits of the Applet/Object ACR table.
const (
	cfgP1    = 0x01
	cfgP2    = 0x02
	cfgData1 = 0x04
)

type acrIns struct{ code, acrid, config, p1, p2, data1 byte }

type acrObject struct {
	id  [2]byte
	ins []acrIns
}

type acrApplet struct {
	id      byte
	objects []acrObject
}

// cardObject is the FF FF object most applets list: EXTERNAL
// AUTHENTICATE, GET CHALLENGE and VERIFY rules.
var cardObject = acrObject{[2]byte{0xFF, 0xFF}, []acrIns{
	{code: insExternalAuth, acrid: 0x11, config: cfgP1, p1: 0x00},
	{code: insGetChallenge, acrid: 0x11},
	{code: insVerify, acrid: 0x10},
}}

func bufObject(id [2]byte, update byte, personal bool, read byte) acrObject {
	o := acrObject{id: id, ins: []acrIns{{code: insUpdateBuffer, acrid: update}}}
	if personal {
		o.ins = append(o.ins, acrIns{code: insReadBuffer, acrid: 0x00, config: cfgData1, data1: 0x01},
			acrIns{code: insReadBuffer, acrid: read})
	} else {
		o.ins = append(o.ins, acrIns{code: insReadBuffer, acrid: 0x00})
	}
	return o
}

var emptyACRApplet = []acrObject{{[2]byte{0xFF, 0xFF}, []acrIns{
	{code: insUpdateBuffer, acrid: 0x04},
	{code: insReadBuffer, acrid: 0x00},
	{code: insExternalAuth, acrid: 0x11, config: cfgP1, p1: 0x00},
	{code: insGetChallenge, acrid: 0x11},
	{code: insVerify, acrid: 0x10},
}}}

// staticACRApplets follow the PKI applets in the Applet/Object ACR table.
// The CCC appears as F4 although the service table calls it 4F: that
// inconsistency is libcacard's.
var staticACRApplets = []acrApplet{
	{0x1F, []acrObject{{[2]byte{0xFF, 0xFF}, []acrIns{{code: insVerify, acrid: 0x00}}}}},
	{0xF4, []acrObject{bufObject([2]byte{0xDB, 0x00}, 0x04, false, 0), cardObject}},
	{0x4B, []acrObject{bufObject([2]byte{0x02, 0xFB}, 0x06, false, 0), cardObject}},
	{0x41, []acrObject{bufObject([2]byte{0x02, 0x00}, 0x09, true, 0x08), cardObject}},
	{0x42, []acrObject{bufObject([2]byte{0x02, 0x01}, 0x0B, true, 0x0A), cardObject}},
	{0x40, []acrObject{
		{[2]byte{0x30, 0x00}, []acrIns{{code: insUpdateBuffer, acrid: 0x04}, {code: insReadBuffer, acrid: 0x00}, {code: insReadBinary, acrid: 0x00}}},
		bufObject([2]byte{0x60, 0x10}, 0x04, true, 0x06),
		bufObject([2]byte{0x60, 0x30}, 0x04, true, 0x06),
		bufObject([2]byte{0x90, 0x00}, 0x04, false, 0),
		cardObject,
	}},
	{0x4E, []acrObject{bufObject([2]byte{0x02, 0xFE}, 0x04, false, 0), cardObject}},
	{0x4D, []acrObject{bufObject([2]byte{0x02, 0xFD}, 0x06, true, 0x06), cardObject}},
	{0x50, emptyACRApplet},
	{0x51, emptyACRApplet},
	{0x52, emptyACRApplet},
	{0x44, []acrObject{bufObject([2]byte{0x12, 0x01}, 0x06, true, 0x06), cardObject}},
	{0x45, []acrObject{bufObject([2]byte{0x12, 0x02}, 0x06, true, 0x06), cardObject}},
}

func pkiACRApplet(n int) acrApplet {
	return acrApplet{byte(0x61 + n), []acrObject{
		{[2]byte{0x01, byte(n)}, []acrIns{
			{code: insUpdateBuffer, acrid: 0x04},
			{code: insReadBuffer, acrid: 0x00},
			{code: insSignDecrypt, acrid: 0x06},
		}},
		{[2]byte{0xFF, 0xFF}, []acrIns{{code: insVerify, acrid: 0x10}}},
	}}
}

func (c *Card) acrApplets() []acrApplet {
	out := make([]acrApplet, 0, len(c.pkis)+len(staticACRApplets))
	for i := range c.pkis {
		out = append(out, pkiACRApplet(i))
	}
	return append(out, staticACRApplets...)
}

// encode appends the object's spec encoding: COID, then per instruction
// code, config, the configured P1/P2/data byte, and the ACRID.
func (o acrObject) encode(dst []byte) []byte {
	dst = append(dst, o.id[0], o.id[1])
	for _, in := range o.ins {
		dst = append(dst, in.code, in.config)
		if in.config&cfgP1 != 0 {
			dst = append(dst, in.p1)
		}
		if in.config&cfgP2 != 0 {
			dst = append(dst, in.p2)
		}
		if in.config&cfgData1 != 0 {
			dst = append(dst, in.data1)
		}
		dst = append(dst, in.acrid)
	}
	return dst
}

// encodeTLV is the SimpleTLV 80 entry value: id, object count, then an
// 82 element per object.
func (a acrApplet) encodeTLV() []byte {
	out := []byte{a.id, byte(len(a.objects))}
	for _, o := range a.objects {
		enc := o.encode(nil)
		out = append(out, 0x82, byte(len(enc)))
		out = append(out, enc...)
	}
	return out
}

type serviceEntry struct {
	id  byte
	aid []byte
}

var staticServices = []serviceEntry{
	{0x40, aidACF}, {0x4F, aidCCC}, {0x4B, gsc(0x02, 0xFB)}, {0x41, gsc(0x02, 0x00)},
	{0x42, gsc(0x02, 0x01)}, {0x4E, gsc(0x02, 0xFE)}, {0x4D, gsc(0x02, 0xFD)},
	{0x50, gsc(0x02, 0xF2)}, {0x51, gsc(0x02, 0xF0)}, {0x52, gsc(0x02, 0xF1)},
	{0x44, gsc(0x12, 0x01)}, {0x45, gsc(0x12, 0x02)},
}

func (c *Card) services() []serviceEntry {
	out := make([]serviceEntry, 0, len(c.pkis)+len(staticServices))
	for i := range c.pkis {
		out = append(out, serviceEntry{byte(0x61 + i), gsc(0x01, byte(i))})
	}
	return append(out, staticServices...)
}

// structAID is what the SimpleTLV service and AMP tables carry instead of
// an AID: the struct's first 7 bytes, id, 3 padding bytes, and the
// little-endian AID length.
func structAID(id byte, aidLen int) []byte {
	return []byte{id, 0, 0, 0, byte(aidLen), 0, 0}
}

// ampExtended is the P1=60 Access Method Provider table, constant.
var ampExtended = []byte{
	0x1F, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x79, 0x03, 0x00, 0x12, 0x00, 0x00, 0x00,
	0x1E, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x79, 0x03, 0x00, 0x10, 0x01, 0x00, 0x00,
	0x1D, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x79, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00,
}

// appendTLV appends a SimpleTLV element; values here are all shorter than
// MaxSimpleLen by construction.
func appendTLV(dst []byte, tag byte, v []byte) []byte {
	out, err := tlv.AppendSimple(dst, tag, v)
	if err != nil {
		return dst
	}
	return out
}

// getACR implements GET ACR (§4.5) on the ACA.
func (c *Card) getACR(cmd apdu.Command) apdu.Response {
	if cmd.P2 != 0 {
		return apdu.Status(apdu.SWIncorrectP1P2)
	}
	var lc int
	switch cmd.P1 {
	case 0x00, 0x40, 0x41, 0x10, 0x50, 0x51, 0x52, 0x20, 0x60, 0x21, 0x61:
		lc = 0
	case 0x01:
		lc = 1 // ACRID
	case 0x11:
		lc = 7 // applet AID
	case 0x12:
		lc = 2 // COID
	default:
		return apdu.Status(apdu.SWCommandNotAllowed)
	}
	if len(cmd.Data) != lc {
		return apdu.Status(apdu.SWDataInvalid)
	}
	info := el(0x01, acaInfo)
	out := append([]byte(nil), info...)
	switch cmd.P1 {
	case 0x00, 0x01:
		if cmd.P1 == 0x00 {
			out = appendTLV(out, 0xA1, []byte{byte(len(acrTable))})
		}
		found := false
		for _, e := range acrTable {
			if cmd.P1 == 0x01 && e.acrid != cmd.Data[0] {
				continue
			}
			found = true
			out = appendTLV(out, 0xA0, e.structBytes())
		}
		if !found {
			return apdu.Status(apdu.SWReferencedDataNotFound)
		}
	case 0x40, 0x41:
		// Extended form; P1=41 ignores its ACRID, as libcacard does.
		out = out[:0]
		for _, e := range acrTable {
			if len(e.methods) == 2 {
				out = append(out, 0x08)
			} else {
				out = append(out, 0x06)
			}
			out = append(out, e.acrid, e.acrType, e.appletID)
			for _, m := range e.methods {
				out = append(out, m.provider, m.keyRef)
			}
			if len(e.methods) == 0 {
				out = append(out, 0x00, 0x00)
			}
			out = append(out, 0x00)
		}
	case 0x10:
		apps := c.acrApplets()
		out = appendTLV(out, 0x81, []byte{byte(len(apps))})
		for _, a := range apps {
			out = appendTLV(out, 0x80, a.encodeTLV())
		}
	case 0x11:
		var id byte
		for _, s := range c.services() {
			if bytes.Equal(s.aid, cmd.Data) {
				id = s.id
				break
			}
		}
		if id == 0 {
			return apdu.Status(apdu.SWReferencedDataNotFound)
		}
		// The CCC's service id 4F matches no applet entry (F4), so
		// its answer is the applet information alone.
		for _, a := range c.acrApplets() {
			if a.id == id {
				out = appendTLV(out, 0x80, a.encodeTLV())
			}
		}
	case 0x12:
		found := false
	search:
		for _, a := range c.acrApplets() {
			for _, o := range a.objects {
				if o.id[0] == cmd.Data[0] && o.id[1] == cmd.Data[1] {
					out = appendTLV(out, 0x82, o.encode(nil))
					found = true
					break search
				}
			}
		}
		if !found {
			return apdu.Status(apdu.SWWrongData)
		}
	case 0x50, 0x51, 0x52:
		// Extended form: length bytes instead of tags; 51 and 52
		// answer like 50.
		out = out[:0]
		for _, a := range c.acrApplets() {
			start := len(out)
			out = append(out, 0, a.id, byte(len(a.objects)))
			for _, o := range a.objects {
				ostart := len(out)
				out = o.encode(append(out, 0))
				out[ostart] = byte(len(out) - ostart - 1)
			}
			out[start] = byte(len(out) - start - 1)
		}
	case 0x20:
		// libcacard's loop is off by one: it emits entries 1 and 2
		// (1E, 1D) and a zeroed third, never 1F.
		out = appendTLV(out, 0x91, []byte{0x03})
		for _, e := range []struct {
			id byte
			n  int
		}{{0x1E, 7}, {0x1D, 7}, {0x00, 0}} {
			v := append([]byte{e.id}, 0x92, byte(e.n))
			v = append(v, structAID(e.id, e.n)[:e.n]...)
			out = appendTLV(out, 0x90, v)
		}
	case 0x60:
		out = ampExtended
	case 0x21:
		svc := c.services()
		out = appendTLV(out, 0x94, []byte{byte(len(svc))})
		for _, s := range svc {
			v := append([]byte{s.id}, 0x92, byte(len(s.aid)))
			v = append(v, structAID(s.id, len(s.aid))...)
			out = appendTLV(out, 0x93, v)
		}
	case 0x61:
		out = out[:0]
		for _, s := range c.services() {
			out = append(out, s.id, 0x00, byte(len(s.aid)))
			out = append(out, s.aid...)
		}
	}
	return apdu.OK(out)
}
