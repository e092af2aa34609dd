// Package emuopts parses libcacard's emulator option string, the argument of
// vscclient's -e flag and what QEMU's ccid-card-emulated and spice-gtk build
// internally (vcard_emul_options; cac.md §7, protocols.md §2.2).
//
// # Grammar
//
// Items are separated by whitespace and/or commas:
//
//	soft=(<slot>,<reader>,<type>,<params>,<cert1>[,<certN>...])   repeatable
//	use_hw=<value>      0/N/n/F... → no; removable... → removable; else yes
//	hw_type=<CAC|PASSTHRU>
//	hw_params=<string>  up to the next whitespace, once
//	db="<path>"         quoted, up to the next '"' or newline, once
//	nssemul             use_hw=yes hw_type=CAC
//	passthru            use_hw=yes hw_type=PASSTHRU
//
// Anything else is an "Unknown smartcard specification", and the whole string
// is rejected, as libcacard rejects it. Every error message starts with the
// sentence libcacard prints for the same mistake ("Error: invalid smartcard
// type 'PIV'.", "Error: redefinition of db= is not allowed.", ...) and adds
// what was wrong in parentheses.
//
// # Differences from libcacard
//
// libcacard compares hw_type= against the entire rest of the string, so it only
// works as the last item (protocols.md §2.2); this parser reads the value up to
// the next separator, so every string libcacard accepts parses the same here,
// and a few it rejects (hw_type= followed by more items) are accepted.
package emuopts

import (
	"errors"
	"fmt"
	"strings"
)

// DefaultDB is the NSS database libcacard opens when db= is absent. (Its usage
// text says sql:/etc/pki/nssdb, but the code uses the plain path: cac.md §7.)
const DefaultDB = "/etc/pki/nssdb"

// HWMode is the use_hw= setting: which PKCS#11 slots become readers.
type HWMode int

const (
	// HWYes maps slots that are removable and report hardware (the default).
	HWYes HWMode = iota
	// HWNo maps no hardware slots: soft cards only.
	HWNo
	// HWRemovable maps every removable slot, hardware or not.
	HWRemovable
)

func (m HWMode) String() string {
	switch m {
	case HWNo:
		return "no"
	case HWRemovable:
		return "removable"
	}
	return "yes"
}

// Card types libcacard knows (vcard_emul_type_from_string, case-insensitive).
const (
	TypeCAC      = "CAC"
	TypePassthru = "PASSTHRU"
)

// Soft is one soft=(...) item: a virtual reader holding a card made from
// certificates of the database.
type Soft struct {
	Slot   string   // NSS token name; empty is the internal key slot
	Reader string   // reader name shown to the guest
	Type   string   // TypeCAC or TypePassthru, as normalised upper case
	Params string   // card type parameters, passed through unused
	Certs  []string // certificate nicknames in card order; may hold "" (see Parse)
}

// Options is a parsed option string. The zero value is not the default; use
// Parse("") for libcacard's defaults.
type Options struct {
	DB         string // database path as written, "sql:" prefix kept
	DBGiven    bool   // db= was present
	UseHW      HWMode
	UseHWGiven bool   // use_hw=, nssemul or passthru was present
	HWType     string // TypeCAC (default) or TypePassthru
	HWParams   string
	Soft       []Soft
}

// Limits keep a hostile string from making the parser allocate without bound;
// libcacard itself caps the certificates of a soft card at 100 (vscclient's
// -c limit) and has no reader limit, but QEMU's passthru has one reader only.
const (
	MaxSoft  = 16
	MaxCerts = 100
)

// ErrSyntax matches every parse error (errors.Is).
var ErrSyntax = errors.New("emuopts: invalid emulator options")

// syntaxError reads like libcacard's message: "Error: <sentence>".
type syntaxError string

func (e syntaxError) Error() string        { return "Error: " + string(e) }
func (e syntaxError) Is(target error) bool { return target == ErrSyntax }

// syntaxErr starts each message with libcacard's own sentence (its
// vcard_emul_options prints "Error: <sentence>" and fails), then adds what
// vscard knows about the mistake in parentheses.
func syntaxErr(format string, a ...any) error {
	return syntaxError(fmt.Sprintf(format, a...))
}

// isSpace is C's isspace in the "C" locale, which libcacard's strip() uses.
func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}

func isSep(c byte) bool { return isSpace(c) || c == ',' }

func stripSpace(s string) string {
	i := 0
	for i < len(s) && isSpace(s[i]) {
		i++
	}
	return s[i:]
}

// Parse parses an option string. Empty cert names, which vscclient's -c
// produces with its trailing comma (protocols.md §2.1), are kept in
// Soft.Certs; libcacard simply finds no certificate by that name.
func Parse(s string) (*Options, error) {
	o := &Options{DB: DefaultDB, HWType: TypeCAC}
	hwParamsGiven := false
	rest := s
	for {
		for len(rest) > 0 && isSep(rest[0]) {
			rest = rest[1:]
		}
		if rest == "" {
			break
		}
		var err error
		switch {
		case strings.HasPrefix(rest, "soft="):
			if len(o.Soft) >= MaxSoft {
				return nil, syntaxErr("more than %d soft= readers", MaxSoft)
			}
			var sc Soft
			sc, rest, err = parseSoft(rest[len("soft="):])
			if err != nil {
				return nil, err
			}
			o.Soft = append(o.Soft, sc)
		case strings.HasPrefix(rest, "use_hw="):
			var v string
			v, rest = word(rest[len("use_hw="):])
			o.UseHW, o.UseHWGiven = parseUseHW(v), true
		case strings.HasPrefix(rest, "hw_type="):
			var v string
			v, rest = word(rest[len("hw_type="):])
			if o.HWType, err = cardType(v); err != nil {
				return nil, err
			}
		case strings.HasPrefix(rest, "hw_params="):
			if hwParamsGiven {
				return nil, syntaxErr("redefinition of hw_params= is not allowed.")
			}
			hwParamsGiven = true
			// Runs to the next whitespace only: a comma is part of the value.
			i := 0
			r := rest[len("hw_params="):]
			for i < len(r) && !isSpace(r[i]) {
				i++
			}
			o.HWParams, rest = r[:i], r[i:]
		case strings.HasPrefix(rest, "db="):
			if o.DBGiven {
				return nil, syntaxErr("redefinition of db= is not allowed.")
			}
			r := stripSpace(rest[len("db="):])
			if !strings.HasPrefix(r, `"`) {
				return nil, syntaxErr("you must quote the file path. (db=\"<path>\")")
			}
			r = r[1:]
			end := strings.IndexAny(r, "\"\n")
			if end < 0 {
				return nil, syntaxErr("invalid db argument. (no closing quote after db=\"%s)", r)
			}
			o.DB, o.DBGiven = r[:end], true
			rest = r[end+1:]
		case hasWord(rest, "nssemul"):
			o.UseHW, o.UseHWGiven, o.HWType = HWYes, true, TypeCAC
			rest = rest[len("nssemul"):]
		case hasWord(rest, "passthru"):
			o.UseHW, o.UseHWGiven, o.HWType = HWYes, true, TypePassthru
			rest = rest[len("passthru"):]
		default:
			w, _ := word(rest)
			return nil, syntaxErr("Unknown smartcard specification. (%q)", w)
		}
	}
	return o, nil
}

// hasWord reports whether s starts with the keyword w followed by a
// separator or the end, so "passthrux" is an unknown token, not an alias.
func hasWord(s, w string) bool {
	return strings.HasPrefix(s, w) && (len(s) == len(w) || isSep(s[len(w)]))
}

// word splits off the value up to the next separator.
func word(s string) (string, string) {
	i := 0
	for i < len(s) && !isSep(s[i]) {
		i++
	}
	return s[:i], s[i:]
}

// parseUseHW follows libcacard: only the first character decides "no", and
// only upper-case F does (so "false" means yes: cac.md §7).
func parseUseHW(v string) HWMode {
	switch {
	case v != "" && strings.IndexByte("0NnF", v[0]) >= 0:
		return HWNo
	case strings.HasPrefix(v, "removable"):
		return HWRemovable
	}
	return HWYes
}

func cardType(v string) (string, error) {
	switch strings.ToUpper(v) {
	case TypeCAC:
		return TypeCAC, nil
	case TypePassthru:
		return TypePassthru, nil
	}
	return "", syntaxErr("invalid smartcard type '%s'. (want CAC or PASSTHRU)", v)
}

// parseSoft parses "(slot,reader,type,params,cert...)" and returns the rest
// of the string after ')'. Whitespace after '(' and after each comma is
// skipped, as libcacard's strip() does; a token runs to the next ',' or ')'.
func parseSoft(s string) (Soft, string, error) {
	var sc Soft
	s = stripSpace(s)
	if !strings.HasPrefix(s, "(") {
		return sc, "", syntaxErr("invalid soft specification. (soft= must be followed by '(': soft=(slot,reader,type,params,cert1,...))")
	}
	s = s[1:]
	// next returns the token up to ',' or ')' and the delimiter.
	next := func(what string) (string, byte, error) {
		s = stripSpace(s)
		i := strings.IndexAny(s, ",)")
		if i < 0 {
			return "", 0, syntaxErr("soft=(...): missing ')' after %s", what)
		}
		tok, d := s[:i], s[i]
		s = s[i+1:]
		return tok, d, nil
	}
	fields := []*string{&sc.Slot, &sc.Reader, &sc.Type, &sc.Params}
	names := []string{"slot", "reader name", "card type", "type parameters"}
	for i, f := range fields {
		tok, d, err := next(names[i])
		if err != nil {
			return sc, "", err
		}
		*f = tok
		if d == ')' {
			return sc, "", syntaxErr("missing cert specification. (soft=(...) ends after the %s: want (slot,reader,type,params,cert1,...))", names[i])
		}
	}
	t, err := cardType(sc.Type)
	if err != nil {
		return sc, "", err
	}
	sc.Type = t
	for {
		if len(sc.Certs) >= MaxCerts {
			return sc, "", syntaxErr("soft=(...): more than %d certificates", MaxCerts)
		}
		tok, d, err := next("the certificate names")
		if err != nil {
			return sc, "", err
		}
		sc.Certs = append(sc.Certs, tok)
		if d == ')' {
			return sc, s, nil
		}
	}
}

// String formats o as an option string that Parse reads back to an equal
// Options (for values Parse can produce).
func (o *Options) String() string {
	var parts []string
	if o.DBGiven {
		parts = append(parts, `db="`+o.DB+`"`)
	}
	if o.UseHWGiven {
		parts = append(parts, "use_hw="+o.UseHW.String())
	}
	if o.HWType != "" && o.HWType != TypeCAC {
		parts = append(parts, "hw_type="+o.HWType)
	}
	if o.HWParams != "" {
		parts = append(parts, "hw_params="+o.HWParams)
	}
	for _, sc := range o.Soft {
		parts = append(parts, "soft=("+strings.Join(append([]string{sc.Slot, sc.Reader, sc.Type, sc.Params}, sc.Certs...), ",")+")")
	}
	return strings.Join(parts, " ")
}
