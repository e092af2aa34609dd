package card

import (
	"errors"
	"fmt"
	"strings"
)

// The answer-to-reset is decoded per ISO/IEC 7816-3:2006 §8.2 (character
// frame and interface bytes) and ISO/IEC 7816-4:2013 §12.1.1 (historical
// bytes). The model follows the standard's own: TS and T0, then groups of
// interface bytes TAi/TBi/TCi/TDi, each TDi announcing which of the next
// group's bytes follow and the protocol T they qualify; then K historical
// bytes and, unless only T=0 is offered, the check byte TCK.

// MaxATRLen is the longest ATR ISO/IEC 7816-3 §8.2.1 allows: TS plus at
// most 32 characters.
const MaxATRLen = 33

// Errors ParseATR wraps, so callers can tell a damaged ATR from a
// truncated one with errors.Is.
var (
	ErrATRTruncated  = errors.New("truncated")
	ErrATRTooLong    = errors.New("too long")
	ErrATRConvention = errors.New("bad TS")
	ErrATRChecksum   = errors.New("TCK mismatch")
)

// Convention is the character coding TS announces.
type Convention uint8

const (
	// Direct convention (TS = 3B): high level is 1, LSB first.
	Direct Convention = iota
	// Inverse convention (TS = 3F): low level is 1, MSB first. Readers
	// hand the decoded bytes on, so TS reads 3F.
	Inverse
)

func (c Convention) String() string {
	if c == Inverse {
		return "inverse"
	}
	return "direct"
}

// Group is one group of interface bytes, TAi to TDi.
type Group struct {
	// Index is i: 1 for TA1..TD1.
	Index int
	// T is the protocol this group's bytes qualify: -1 for group 1 (global
	// bytes), else the T announced by TD(i-1). T=15 means global bytes.
	T int
	// Present bits: TA, TB, TC, TD in the order of T0/TD's Y nibble.
	HasTA, HasTB, HasTC, HasTD bool
	TA, TB, TC, TD             byte
}

// ClockStop is what the first TA for T=15 says about stopping the clock
// (ISO/IEC 7816-3 §8.3, table 10).
type ClockStop uint8

const (
	ClockStopUnsupported ClockStop = iota
	ClockStopLow
	ClockStopHigh
	ClockStopNoPreference
)

func (c ClockStop) String() string {
	return [...]string{"not supported", "state L", "state H", "no preference"}[c&3]
}

// ATR is a decoded answer-to-reset. Parameters that the ATR leaves out hold
// the standard's defaults, and the Has* fields say which ones were given.
type ATR struct {
	Raw        []byte // the whole ATR, TS to TCK
	Convention Convention
	T0         byte
	Groups     []Group // Groups[0] is TA1..TD1; empty when T0 announces none
	Historical []byte
	HasTCK     bool
	TCK        byte

	// Protocols are the transmission protocols offered, in ATR order,
	// without repeats and without T=15 (which only marks global bytes).
	// [0] when there is no TD1.
	Protocols []int

	// TA1 (§8.3): clock rate conversion factor Fi with f(max), and baud
	// rate adjustment factor Di. Defaults Fi=372, Di=1, f(max)=5 MHz. Zero
	// Fi or Di means the ATR gave a reserved (RFU) value.
	HasTA1 bool
	Fi     int
	FMaxHz int
	Di     int

	// TC1: extra guard time N in ETUs (255: minimum guard time).
	N int

	// TA2 (§7.1): specific mode. ModeProtocol is the protocol of the
	// specific mode; CanChangeMode is bit 8 clear (the card can switch to
	// negotiable mode); ImplicitFD is bit 5 set (Fi/Di are implicit, not
	// TA1's).
	SpecificMode  bool
	ModeProtocol  int
	CanChangeMode bool
	ImplicitFD    bool

	// TC2 (§10.2): waiting time integer WI for T=0, default 10.
	HasWI bool
	WI    int

	// The first TA, TB and TC for T=1 (§11.4): IFSC (default 32), BWI
	// (default 4) and CWI (default 13), and the error detection code
	// (CRC when EDCIsCRC, else the default LRC).
	HasIFSC, HasBWTCWT, HasEDC bool
	IFSC, BWI, CWI             int
	EDCIsCRC                   bool

	// The first TA for T=15 (§8.3): clock stop indicator and the classes
	// of operating conditions (bit 1 = class A 5 V, 2 = B 3 V, 3 = C 1.8 V).
	HasT15TA  bool
	ClockStop ClockStop
	Classes   byte
	// The first TB for T=15: SPU, standard or proprietary use of C6.
	HasT15TB bool
	SPU      byte
}

// Fi and f(max) by TA1's high nibble, Di by its low nibble (ISO/IEC 7816-3
// tables 7 and 8). 0 marks a reserved value.
var (
	fiTable   = [16]int{372, 372, 558, 744, 1116, 1488, 1860, 0, 0, 512, 768, 1024, 1536, 2048, 0, 0}
	fmaxTable = [16]int{4e6, 5e6, 6e6, 8e6, 12e6, 16e6, 20e6, 0, 0, 5e6, 7.5e6, 10e6, 15e6, 20e6, 0, 0}
	diTable   = [16]int{0, 1, 2, 4, 8, 16, 32, 64, 12, 20, 0, 0, 0, 0, 0, 0}
)

// ParseATR decodes an ATR. The bytes must be exactly one ATR: a trailing
// byte is an error, as is a missing one. On error the returned ATR holds
// what was decoded before the problem (for diagnostics); the error wraps one
// of the ErrATR* values. ParseATR does not keep b.
func ParseATR(b []byte) (ATR, error) {
	a := ATR{Fi: 372, Di: 1, FMaxHz: 5e6, WI: 10, IFSC: 32, BWI: 4, CWI: 13}
	if len(b) > MaxATRLen {
		return a, fmt.Errorf("card: ATR: %w: %d bytes, at most %d", ErrATRTooLong, len(b), MaxATRLen)
	}
	a.Raw = append([]byte(nil), b...)
	if len(b) < 2 {
		return a, fmt.Errorf("card: ATR: %w: %d bytes, need TS and T0", ErrATRTruncated, len(b))
	}
	switch b[0] {
	case 0x3B:
		a.Convention = Direct
	case 0x3F:
		a.Convention = Inverse
	default:
		return a, fmt.Errorf("card: ATR: %w: TS is %02X, want 3B (direct) or 3F (inverse convention)", ErrATRConvention, b[0])
	}
	a.T0 = b[1]
	k := int(b[1] & 0x0F)
	y := b[1] >> 4
	pos := 2
	next := func(name string, i int) (byte, error) {
		if pos >= len(b) {
			return 0, fmt.Errorf("card: ATR: %w: %s%d announced but the ATR ends after %d bytes", ErrATRTruncated, name, i, len(b))
		}
		v := b[pos]
		pos++
		return v, nil
	}
	t := -1 // the T qualifying the next group; -1 = group 1's global bytes
	for i := 1; y != 0; i++ {
		g := Group{Index: i, T: t}
		var err error
		for _, f := range []struct {
			bit  byte
			name string
			has  *bool
			v    *byte
		}{
			{1, "TA", &g.HasTA, &g.TA}, {2, "TB", &g.HasTB, &g.TB},
			{4, "TC", &g.HasTC, &g.TC}, {8, "TD", &g.HasTD, &g.TD},
		} {
			if y&f.bit == 0 {
				continue
			}
			*f.has = true
			if *f.v, err = next(f.name, i); err != nil {
				a.Groups = append(a.Groups, g)
				return a, err
			}
		}
		a.Groups = append(a.Groups, g)
		y = 0
		if g.HasTD {
			y = g.TD >> 4
			t = int(g.TD & 0x0F)
		}
	}
	a.interpret()

	// TCK is present unless only T=0 is indicated (ISO/IEC 7816-3 §8.2.5):
	// any TDi naming a T other than 0, T=15 included, makes it mandatory.
	for _, g := range a.Groups {
		if g.HasTD && g.TD&0x0F != 0 {
			a.HasTCK = true
		}
	}
	if len(b)-pos < k {
		a.Historical = append([]byte(nil), b[pos:]...)
		return a, fmt.Errorf("card: ATR: %w: T0 announces %d historical bytes, only %d follow", ErrATRTruncated, k, len(b)-pos)
	}
	a.Historical = append([]byte(nil), b[pos:pos+k]...)
	pos += k
	want := pos
	if a.HasTCK {
		want++
		if len(b) < want {
			return a, fmt.Errorf("card: ATR: %w: TCK missing (required because a protocol other than T=0 is offered)", ErrATRTruncated)
		}
		a.TCK = b[pos]
		// The XOR of T0 to TCK inclusive is zero (§8.2.5).
		var x byte
		for _, c := range b[1:want] {
			x ^= c
		}
		if x != 0 {
			return a, fmt.Errorf("card: ATR: %w: TCK is %02X, want %02X", ErrATRChecksum, a.TCK, a.TCK^x)
		}
	}
	if len(b) > want {
		return a, fmt.Errorf("card: ATR: %w: %d bytes after the last announced one (% X)", ErrATRTooLong, len(b)-want, b[want:])
	}
	return a, nil
}

// interpret fills the decoded parameters from the interface bytes.
func (a *ATR) interpret() {
	seenT1 := [3]bool{}  // first TA, TB, TC for T=1
	seenT15 := [2]bool{} // first TA, TB for T=15
	addProto := func(t int) {
		if t == 15 {
			return
		}
		for _, p := range a.Protocols {
			if p == t {
				return
			}
		}
		a.Protocols = append(a.Protocols, t)
	}
	for _, g := range a.Groups {
		switch {
		case g.Index == 1:
			if g.HasTA {
				a.HasTA1 = true
				a.Fi = fiTable[g.TA>>4]
				a.FMaxHz = fmaxTable[g.TA>>4]
				a.Di = diTable[g.TA&0x0F]
			}
			if g.HasTC {
				a.N = int(g.TC)
			}
		case g.Index == 2:
			// TA2 is global (specific mode); TB2 is deprecated; TC2 is
			// specific to T=0 whatever TD1 says (§10.2).
			if g.HasTA {
				a.SpecificMode = true
				a.ModeProtocol = int(g.TA & 0x0F)
				a.CanChangeMode = g.TA&0x80 == 0
				a.ImplicitFD = g.TA&0x10 != 0
			}
			if g.HasTC {
				a.HasWI = true
				a.WI = int(g.TC)
			}
		case g.T == 1:
			if g.HasTA && !seenT1[0] {
				seenT1[0] = true
				a.HasIFSC = true
				a.IFSC = int(g.TA)
			}
			if g.HasTB && !seenT1[1] {
				seenT1[1] = true
				a.HasBWTCWT = true
				a.BWI = int(g.TB >> 4)
				a.CWI = int(g.TB & 0x0F)
			}
			if g.HasTC && !seenT1[2] {
				seenT1[2] = true
				a.HasEDC = true
				a.EDCIsCRC = g.TC&1 != 0
			}
		case g.T == 15:
			if g.HasTA && !seenT15[0] {
				seenT15[0] = true
				a.HasT15TA = true
				a.ClockStop = ClockStop(g.TA >> 6)
				a.Classes = g.TA & 0x3F
			}
			if g.HasTB && !seenT15[1] {
				seenT15[1] = true
				a.HasT15TB = true
				a.SPU = g.TB
			}
		}
		if g.HasTD {
			addProto(int(g.TD & 0x0F))
		}
	}
	if len(a.Groups) == 0 || !a.Groups[0].HasTD {
		// No TD1: only T=0 is offered (§8.2.3).
		a.Protocols = []int{0}
	} else if len(a.Protocols) == 0 {
		// Only T=15 was named: no transmission protocol besides the
		// implicit T=0.
		a.Protocols = []int{0}
	}
}

// HistoricalBytes is the decoding of the historical bytes (ISO/IEC 7816-4
// §12.1.1). Format names how the category indicator says to read them.
type HistoricalBytes struct {
	Category byte
	Format   HistoricalFormat
	Objects  []CompactTLV // compact-TLV data objects (categories 00 and 80)
	Status   []byte       // status indicator: LCS, SW1 SW2 or LCS SW1 SW2
	DIRRef   byte         // category 10: the DIR data reference
	// Err is why bytes announced as compact-TLV do not decode; Objects
	// then holds those that did.
	Err error
}

// HistoricalFormat is the structure the category indicator announces.
type HistoricalFormat uint8

const (
	HistNone         HistoricalFormat = iota // no historical bytes
	HistCompactTLV                           // 00: compact-TLV, then a 3-byte status indicator
	HistCompactTLV80                         // 80: compact-TLV, status (if any) as tag 8
	HistDIRRef                               // 10: a DIR data reference follows
	HistRFU                                  // 81..8F: reserved for future use
	HistProprietary                          // anything else
)

func (f HistoricalFormat) String() string {
	return [...]string{"none", "compact-TLV followed by a status indicator",
		"compact-TLV", "DIR data reference", "reserved for future use (RFU)",
		"proprietary (not ISO/IEC 7816-4)"}[f]
}

// CompactTLV is one compact-TLV data object: tag and length share one
// byte, a nibble each.
type CompactTLV struct {
	Tag   byte // 0..15
	Value []byte
}

// compactTags names the compact-TLV tags of ISO/IEC 7816-4 §12.1.1.
var compactTags = [16]string{
	1:  "country code",
	2:  "issuer identification number",
	3:  "card service data",
	4:  "initial access data",
	5:  "card issuer's data",
	6:  "pre-issuing data",
	7:  "card capabilities",
	8:  "status indicator",
	15: "application identifier",
}

// ParseHistorical decodes historical bytes by their category indicator.
// It never fails: bytes that do not decode are reported in Err.
func ParseHistorical(h []byte) HistoricalBytes {
	var hb HistoricalBytes
	if len(h) == 0 {
		return hb
	}
	hb.Category = h[0]
	switch c := h[0]; {
	case c == 0x00:
		hb.Format = HistCompactTLV
		if len(h) < 4 {
			hb.Err = fmt.Errorf("category 00 needs a 3-byte status indicator, have %d bytes after it", len(h)-1)
			return hb
		}
		hb.Status = append([]byte(nil), h[len(h)-3:]...)
		hb.Objects, hb.Err = splitCompact(h[1 : len(h)-3])
	case c == 0x80:
		hb.Format = HistCompactTLV80
		hb.Objects, hb.Err = splitCompact(h[1:])
		for _, o := range hb.Objects {
			if o.Tag == 8 {
				hb.Status = o.Value
			}
		}
	case c == 0x10:
		hb.Format = HistDIRRef
		if len(h) != 2 {
			hb.Err = fmt.Errorf("category 10 takes one DIR reference byte, have %d", len(h)-1)
			return hb
		}
		hb.DIRRef = h[1]
	case c > 0x80 && c <= 0x8F:
		hb.Format = HistRFU
	default:
		hb.Format = HistProprietary
	}
	return hb
}

func splitCompact(b []byte) ([]CompactTLV, error) {
	var out []CompactTLV
	for len(b) > 0 {
		tag, n := b[0]>>4, int(b[0]&0x0F)
		if 1+n > len(b) {
			return out, fmt.Errorf("compact-TLV %02X announces %d bytes, %d left", b[0], n, len(b)-1)
		}
		out = append(out, CompactTLV{Tag: tag, Value: append([]byte(nil), b[1:1+n]...)})
		b = b[1+n:]
	}
	return out, nil
}

// String is the ATR in hex, bytes separated by spaces.
func (a ATR) String() string { return fmt.Sprintf("% X", a.Raw) }

// Describe explains the ATR byte by byte, one item per line, in the manner
// of pcsc-tools' ATR_analysis.
func (a ATR) Describe() string {
	var w strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&w, format+"\n", args...) }
	p("ATR: % X (%d bytes)", a.Raw, len(a.Raw))
	if len(a.Raw) == 0 {
		return w.String()
	}
	p("  TS  = %02X  %s convention", a.Raw[0], a.Convention)
	if len(a.Raw) < 2 {
		return w.String()
	}
	p("  T0  = %02X  Y1=%s, K=%d historical bytes", a.T0, yList(a.T0>>4, 1), a.T0&0x0F)
	for _, g := range a.Groups {
		if g.HasTA {
			p("  TA%-2d= %02X  %s", g.Index, g.TA, a.describeTA(g))
		}
		if g.HasTB {
			p("  TB%-2d= %02X  %s", g.Index, g.TB, describeTB(g))
		}
		if g.HasTC {
			p("  TC%-2d= %02X  %s", g.Index, g.TC, describeTC(g))
		}
		if g.HasTD {
			p("  TD%-2d= %02X  Y%d=%s, protocol T=%d%s", g.Index, g.TD, g.Index+1,
				yList(g.TD>>4, g.Index+1), g.TD&0x0F, tNote(int(g.TD&0x0F)))
		}
	}
	protos := make([]string, len(a.Protocols))
	for i, t := range a.Protocols {
		protos[i] = fmt.Sprintf("T=%d", t)
	}
	note := ""
	if len(a.Groups) == 0 || !a.Groups[0].HasTD {
		note = " (no TD1: T=0 only)"
	}
	p("  Protocols: %s%s", strings.Join(protos, ", "), note)
	if len(a.Historical) == 0 {
		p("  Historical bytes: none")
	} else {
		p("  Historical bytes (%d): % X  %q", len(a.Historical), a.Historical, printable(a.Historical))
		hb := ParseHistorical(a.Historical)
		p("    Category indicator %02X: %s", hb.Category, hb.Format)
		for _, o := range hb.Objects {
			name := compactTags[o.Tag]
			if name == "" {
				name = "unknown tag"
			}
			p("    Tag %X, length %d: %s: % X%s", o.Tag, len(o.Value), name, o.Value, describeCompact(o))
		}
		if hb.Format == HistCompactTLV && hb.Status != nil {
			p("    Status indicator: %s", describeStatus(hb.Status))
		}
		if hb.Format == HistDIRRef && hb.Err == nil {
			p("    DIR data reference: %02X", hb.DIRRef)
		}
		if hb.Err != nil {
			p("    Not decodable: %v", hb.Err)
		}
	}
	switch {
	case a.HasTCK && len(a.Raw) > 0:
		var x byte
		for _, c := range a.Raw[1:] {
			x ^= c
		}
		if x == 0 {
			p("  TCK = %02X  (correct checksum)", a.TCK)
		} else {
			p("  TCK = %02X  (wrong checksum: want %02X)", a.TCK, a.TCK^x)
		}
	default:
		p("  TCK: absent (only T=0 offered)")
	}
	return w.String()
}

func tNote(t int) string {
	switch t {
	case 15:
		return " (global interface bytes follow)"
	case 0, 1:
		return ""
	default:
		return " (RFU)"
	}
}

// yList names the interface bytes a Y nibble announces for group i.
func yList(y byte, i int) string {
	var s []string
	for j, n := range []string{"TA", "TB", "TC", "TD"} {
		if y&(1<<j) != 0 {
			s = append(s, fmt.Sprintf("%s%d", n, i))
		}
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, " ")
}

func (a ATR) describeTA(g Group) string {
	switch {
	case g.Index == 1:
		fi, di := fiTable[g.TA>>4], diTable[g.TA&0x0F]
		fis, dis, fm := "RFU", "RFU", "RFU"
		if fi != 0 {
			fis = fmt.Sprint(fi)
			fm = fmt.Sprintf("%g MHz", float64(fmaxTable[g.TA>>4])/1e6)
		}
		if di != 0 {
			dis = fmt.Sprint(di)
		}
		s := fmt.Sprintf("Fi=%s, Di=%s, f(max)=%s", fis, dis, fm)
		if fi != 0 && di != 0 {
			s += fmt.Sprintf(": %g cycles/ETU, %d bit/s at 4 MHz", float64(fi)/float64(di), int(4e6*float64(di)/float64(fi)))
		}
		return s
	case g.Index == 2:
		s := fmt.Sprintf("specific mode, protocol T=%d", g.TA&0x0F)
		if g.TA&0x80 == 0 {
			s += ", can change to negotiable mode"
		} else {
			s += ", cannot change to negotiable mode"
		}
		if g.TA&0x10 != 0 {
			s += ", Fi/Di implicit (not TA1's)"
		} else {
			s += ", Fi/Di from TA1"
		}
		return s
	case g.T == 1:
		if g.TA == 0 || g.TA == 0xFF {
			return fmt.Sprintf("IFSC=%d (invalid: 1..254)", g.TA)
		}
		return fmt.Sprintf("IFSC=%d", g.TA)
	case g.T == 15:
		return fmt.Sprintf("clock stop: %s, classes: %s", ClockStop(g.TA>>6), classes(g.TA&0x3F))
	}
	return fmt.Sprintf("specific to T=%d", g.T)
}

func classes(u byte) string {
	var s []string
	for i, c := range []string{"A (5 V)", "B (3 V)", "C (1.8 V)"} {
		if u&(1<<i) != 0 {
			s = append(s, c)
		}
	}
	if u>>3 != 0 {
		s = append(s, fmt.Sprintf("RFU bits %02X", u&^7))
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

func describeTB(g Group) string {
	switch {
	case g.Index == 1 || g.Index == 2:
		if g.TB == 0 {
			return "no VPP (deprecated byte)"
		}
		return "VPP programming parameters (deprecated byte)"
	case g.T == 1:
		return fmt.Sprintf("BWI=%d, CWI=%d", g.TB>>4, g.TB&0x0F)
	case g.T == 15:
		return fmt.Sprintf("SPU: contact C6 %s", map[bool]string{true: "for proprietary use", false: "for standard use"}[g.TB&0x80 != 0])
	}
	return fmt.Sprintf("specific to T=%d", g.T)
}

func describeTC(g Group) string {
	switch {
	case g.Index == 1:
		if g.TC == 0xFF {
			return "N=255: minimum guard time (12 ETU for T=0, 11 for T=1)"
		}
		return fmt.Sprintf("extra guard time N=%d ETU", g.TC)
	case g.Index == 2:
		return fmt.Sprintf("WI=%d: work waiting time 960*%d*Fi/f (T=0)", g.TC, g.TC)
	case g.T == 1:
		if g.TC&1 != 0 {
			return "error detection: CRC"
		}
		return "error detection: LRC"
	}
	return fmt.Sprintf("specific to T=%d", g.T)
}

func describeCompact(o CompactTLV) string {
	switch o.Tag {
	case 7:
		if len(o.Value) == 0 {
			return ""
		}
		var s []string
		sel := o.Value[0]
		for i, n := range []string{"record identifier", "record number", "short EF id", "implicit DF",
			"DF by file id", "DF by path", "DF by partial name", "DF by full name"} {
			if sel&(1<<i) != 0 {
				s = append(s, n)
			}
		}
		out := " (selection: " + strings.Join(s, ", ")
		if len(o.Value) >= 3 {
			c := o.Value[2]
			if c&0x80 != 0 {
				out += "; command chaining"
			}
			if c&0x40 != 0 {
				out += "; extended Lc/Le"
			}
			// Bits 5-4: logical channel numbers assigned by the card
			// (bit 5) and/or the interface device (bit 4); bits 3-1:
			// maximum number of channels minus one (7816-4 table 88).
			switch c & 0x18 {
			case 0:
				out += "; no logical channels"
			default:
				var by []string
				if c&0x10 != 0 {
					by = append(by, "card")
				}
				if c&0x08 != 0 {
					by = append(by, "host")
				}
				out += fmt.Sprintf("; up to %d logical channels, assigned by %s", int(c&7)+1, strings.Join(by, " and "))
			}
		}
		return out + ")"
	case 8:
		return " (" + describeStatus(o.Value) + ")"
	case 1, 2, 5, 6:
		if p := printable(o.Value); isText(o.Value) {
			return fmt.Sprintf(" %q", p)
		}
	}
	return ""
}

func describeStatus(s []byte) string {
	switch len(s) {
	case 1:
		return fmt.Sprintf("life cycle status %02X", s[0])
	case 2:
		return fmt.Sprintf("SW %02X %02X", s[0], s[1])
	case 3:
		return fmt.Sprintf("life cycle status %02X, SW %02X %02X", s[0], s[1], s[2])
	}
	return fmt.Sprintf("% X (unexpected length %d)", s, len(s))
}

// printable maps bytes to ASCII, with '.' for the rest, as hex dumps do.
func printable(b []byte) string {
	r := make([]byte, len(b))
	for i, c := range b {
		if c >= 0x20 && c < 0x7F {
			r[i] = c
		} else {
			r[i] = '.'
		}
	}
	return string(r)
}

func isText(b []byte) bool {
	for _, c := range b {
		if c < 0x20 || c >= 0x7F {
			return false
		}
	}
	return len(b) > 0
}
