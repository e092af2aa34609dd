package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"strings"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/card"
)

const atrUsage = `usage: vscard atr [--json] HEX...

Decodes an answer-to-reset (ISO/IEC 7816-3): convention, interface bytes
TAi/TBi/TCi/TDi with their meaning (Fi/Di, guard time, waiting times, T=1
IFSC/BWI/CWI/EDC, T=15 clock stop and classes), the protocols offered, the
historical bytes (compact-TLV objects when the category byte says so) and
the TCK check. The ATR may be split over several arguments and may use
spaces or colons: "3B 95 13 81 01 80 73 FF 01 00 0B", 3b:95:13:..., 3B9513...
'vscard readers' prints the ATR of each card in a reader.

Exit status: 0 decoded, 1 not a valid ATR (the reason is printed), 2 usage.

flags:
`

// runATR implements "vscard atr".
func runATR(_ context.Context, env *environ, args []string) error {
	fs := flag.NewFlagSet("atr", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	asJSON := fs.Bool("json", false, "print the decoding as JSON")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), atrUsage)
		fs.PrintDefaults()
	}
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return fmt.Errorf("%w: no ATR given; e.g. vscard atr 3B 95 13 81 01 80 73 FF 01 00 0B", errUsage)
	}
	raw, err := apdu.ParseHex(strings.Join(rest, ""))
	if err != nil {
		return fmt.Errorf("%w: ATR %q is not hex: %v", errUsage, strings.Join(rest, " "), err)
	}
	a, err := card.ParseATR(raw)
	if err != nil {
		return fmt.Errorf("invalid ATR % X: %w", raw, err)
	}
	if *asJSON {
		enc := json.NewEncoder(env.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(atrJSON(a))
	}
	fmt.Fprint(env.stdout, a.Describe())
	return nil
}

// parseArgs is parseInterspersed (card.go) with the error classified: a
// help request passes through, anything else is a usage error.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	rest, err := parseInterspersed(fs, args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	return rest, nil
}

// hexString is upper-case hex without separators, the JSON form of bytes.
type hexString []byte

func (h hexString) MarshalJSON() ([]byte, error) {
	return json.Marshal(fmt.Sprintf("%X", []byte(h)))
}

type atrGroupJSON struct {
	Index int       `json:"i"`
	T     *int      `json:"t,omitempty"` // protocol qualified; absent for group 1
	TA    hexString `json:"ta,omitempty"`
	TB    hexString `json:"tb,omitempty"`
	TC    hexString `json:"tc,omitempty"`
	TD    hexString `json:"td,omitempty"`
}

type compactJSON struct {
	Tag   int       `json:"tag"`
	Value hexString `json:"value"`
}

type atrOutJSON struct {
	ATR        hexString      `json:"atr"`
	Convention string         `json:"convention"`
	T0         hexString      `json:"t0"`
	Groups     []atrGroupJSON `json:"interface"`
	Protocols  []int          `json:"protocols"`
	Fi         int            `json:"fi"`
	Di         int            `json:"di"`
	FMaxHz     int            `json:"fmax_hz"`
	N          int            `json:"extra_guard_time"`
	WI         int            `json:"wi"`
	Specific   *struct {
		Protocol      int  `json:"protocol"`
		CanChangeMode bool `json:"can_change_mode"`
		ImplicitFD    bool `json:"implicit_fd"`
	} `json:"specific_mode,omitempty"`
	T1 *struct {
		IFSC int    `json:"ifsc"`
		BWI  int    `json:"bwi"`
		CWI  int    `json:"cwi"`
		EDC  string `json:"edc"`
	} `json:"t1,omitempty"`
	T15 *struct {
		ClockStop string    `json:"clock_stop"`
		Classes   hexString `json:"classes"`
	} `json:"t15,omitempty"`
	Historical struct {
		Bytes    hexString     `json:"bytes"`
		ASCII    string        `json:"ascii"`
		Category hexString     `json:"category,omitempty"`
		Format   string        `json:"format"`
		Objects  []compactJSON `json:"objects,omitempty"`
		Status   hexString     `json:"status,omitempty"`
		Error    string        `json:"error,omitempty"`
	} `json:"historical"`
	TCK hexString `json:"tck,omitempty"`
}

func atrJSON(a card.ATR) atrOutJSON {
	o := atrOutJSON{
		ATR: a.Raw, Convention: a.Convention.String(), T0: []byte{a.T0},
		Protocols: a.Protocols, Fi: a.Fi, Di: a.Di, FMaxHz: a.FMaxHz, N: a.N, WI: a.WI,
	}
	for _, g := range a.Groups {
		gj := atrGroupJSON{Index: g.Index}
		if g.Index > 1 {
			t := g.T
			gj.T = &t
		}
		for _, b := range []struct {
			has bool
			v   byte
			dst *hexString
		}{{g.HasTA, g.TA, &gj.TA}, {g.HasTB, g.TB, &gj.TB}, {g.HasTC, g.TC, &gj.TC}, {g.HasTD, g.TD, &gj.TD}} {
			if b.has {
				*b.dst = hexString{b.v}
			}
		}
		o.Groups = append(o.Groups, gj)
	}
	if a.SpecificMode {
		o.Specific = &struct {
			Protocol      int  `json:"protocol"`
			CanChangeMode bool `json:"can_change_mode"`
			ImplicitFD    bool `json:"implicit_fd"`
		}{a.ModeProtocol, a.CanChangeMode, a.ImplicitFD}
	}
	for _, p := range a.Protocols {
		if p == 1 {
			edc := "LRC"
			if a.EDCIsCRC {
				edc = "CRC"
			}
			o.T1 = &struct {
				IFSC int    `json:"ifsc"`
				BWI  int    `json:"bwi"`
				CWI  int    `json:"cwi"`
				EDC  string `json:"edc"`
			}{a.IFSC, a.BWI, a.CWI, edc}
		}
	}
	if a.HasT15TA {
		o.T15 = &struct {
			ClockStop string    `json:"clock_stop"`
			Classes   hexString `json:"classes"`
		}{a.ClockStop.String(), hexString{a.Classes}}
	}
	hb := card.ParseHistorical(a.Historical)
	o.Historical.Bytes = a.Historical
	o.Historical.ASCII = asciiOf(a.Historical)
	o.Historical.Format = hb.Format.String()
	if len(a.Historical) > 0 {
		o.Historical.Category = hexString{hb.Category}
	}
	for _, obj := range hb.Objects {
		o.Historical.Objects = append(o.Historical.Objects, compactJSON{int(obj.Tag), obj.Value})
	}
	o.Historical.Status = hb.Status
	if hb.Err != nil {
		o.Historical.Error = hb.Err.Error()
	}
	if a.HasTCK {
		o.TCK = hexString{a.TCK}
	}
	return o
}

// asciiOf shows bytes as text with '.' for the unprintable, as hex dumps do.
func asciiOf(b []byte) string {
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
