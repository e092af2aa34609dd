package store

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"
)

// File names inside a card directory.
const (
	ManifestFile = "card.json"
	StateFile    = "state.json"
)

// formatVersion is the manifest and state format this package writes and
// reads. A change that old code would misread bumps it.
const formatVersion = 1

// Limits that keep a hostile or damaged card from costing unbounded memory
// or time.
const (
	maxManifestSize = 64 << 10
	maxStateSize    = 4 << 10
	maxPEMSize      = 1 << 20
	// maxCredentials: CAC has PKI applets for up to 16 certificates
	// (OpenSC labels "CAC Cert 4"…"16", cac.md §8.3).
	maxCredentials = 16
	maxIterations  = 50_000_000
	minIterations  = 1000
)

// Card types, the manifest's "type".
const (
	TypeCAC = "cac"
	TypePIV = "piv"
	typeCAC = TypeCAC
)

// PIN hash algorithm names stored in the manifest.
const algPBKDF2SHA256 = "pbkdf2-sha256"

type manifest struct {
	Version     int            `json:"version"`
	Type        string         `json:"type"`
	CN          string         `json:"cn"`
	ID          string         `json:"id"` // hex
	Created     time.Time      `json:"created"`
	Credentials []manifestCred `json:"credentials"`
	CA          *manifestCA    `json:"ca,omitempty"`
	PIN         manifestPIN    `json:"pin"`
}

type manifestCred struct {
	Label string `json:"label"`
	Cert  string `json:"cert"`
	Key   string `json:"key"`
}

type manifestCA struct {
	Cert string `json:"cert"`
	DER  string `json:"der,omitempty"`
	Key  string `json:"key,omitempty"`
}

type manifestPIN struct {
	Alg        string `json:"alg"`
	Iterations int    `json:"iterations"`
	Salt       []byte `json:"salt"` // base64 in JSON
	Hash       []byte `json:"hash"`
	MaxTries   int    `json:"max_tries"`
}

type state struct {
	Version   int `json:"version"`
	TriesLeft int `json:"tries_left"`
	// PIN is the hash of a PIN that can change (a PIV card's PIN and
	// PUK); a CAC card's state.json has none, its hash is in card.json.
	PIN *manifestPIN `json:"pin,omitempty"`
}

// decodeManifest parses and validates card.json. Every problem is reported
// with what is wrong; the caller adds the path.
func decodeManifest(b []byte) (*manifest, error) {
	if len(b) > maxManifestSize {
		return nil, fmt.Errorf("larger than %d bytes", maxManifestSize)
	}
	// Peek at the version first so a newer format gets "unknown version"
	// rather than a confusing field error.
	var v struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("not valid JSON: %w", err)
	}
	if v.Version != formatVersion {
		return nil, fmt.Errorf("unknown format version %d (this vscard reads version %d; a newer vscard may have made it)", v.Version, formatVersion)
	}
	var m manifest
	d := json.NewDecoder(bytes.NewReader(b))
	if err := d.Decode(&m); err != nil {
		return nil, fmt.Errorf("not valid JSON: %w", err)
	}
	if d.More() {
		return nil, errors.New("trailing data after the JSON object")
	}
	if err := checkType(m.Type, TypeCAC); err != nil {
		return nil, err
	}
	if n := len(m.Credentials); n == 0 || n > maxCredentials {
		return nil, fmt.Errorf("%d credentials; a card holds 1 to %d", n, maxCredentials)
	}
	seen := map[string]bool{ManifestFile: true, StateFile: true}
	name := func(what, f string) error {
		if err := checkFileName(f); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if seen[f] {
			return fmt.Errorf("%s: file %q used twice", what, f)
		}
		seen[f] = true
		return nil
	}
	for i, c := range m.Credentials {
		if c.Label == "" {
			return nil, fmt.Errorf("credential %d has no label", i+1)
		}
		if err := name(fmt.Sprintf("credential %q cert", c.Label), c.Cert); err != nil {
			return nil, err
		}
		if err := name(fmt.Sprintf("credential %q key", c.Label), c.Key); err != nil {
			return nil, err
		}
	}
	if m.CA != nil {
		if err := name("ca cert", m.CA.Cert); err != nil {
			return nil, err
		}
		if m.CA.DER != "" {
			if err := name("ca der", m.CA.DER); err != nil {
				return nil, err
			}
		}
		if m.CA.Key != "" {
			if err := name("ca key", m.CA.Key); err != nil {
				return nil, err
			}
		}
	}
	if err := checkPINParams(m.PIN); err != nil {
		return nil, err
	}
	return &m, nil
}

// checkType accepts a manifest of the wanted card type, and names the
// other known type so a PIV card given to CAC code (or the reverse) says
// what it is rather than "damaged".
func checkType(got, want string) error {
	switch {
	case got == want:
		return nil
	case got == TypeCAC || got == TypePIV:
		return fmt.Errorf("%w: it is a %s card, not a %s card", ErrWrongType, strings.ToUpper(got), strings.ToUpper(want))
	}
	return fmt.Errorf("unknown card type %q (want %q)", got, want)
}

// ErrWrongType is wrapped by Open's error for a PIV card, and OpenPIV's
// for a CAC card: use Type to choose.
var ErrWrongType = errors.New("wrong card type")

// checkPINParams validates stored PIN hash parameters.
func checkPINParams(p manifestPIN) error {
	if p.Alg != algPBKDF2SHA256 {
		return fmt.Errorf("unknown PIN hash algorithm %q", p.Alg)
	}
	if p.Iterations < minIterations || p.Iterations > maxIterations {
		return fmt.Errorf("PIN hash iterations %d out of range [%d, %d]", p.Iterations, minIterations, maxIterations)
	}
	if len(p.Salt) < 16 || len(p.Salt) > 64 {
		return fmt.Errorf("PIN salt is %d bytes; want 16 to 64", len(p.Salt))
	}
	if len(p.Hash) != pinHashLen {
		return fmt.Errorf("PIN hash is %d bytes; want %d", len(p.Hash), pinHashLen)
	}
	if p.MaxTries < 1 || p.MaxTries > maxTriesLimit {
		return fmt.Errorf("max_tries %d out of range [1, %d]", p.MaxTries, maxTriesLimit)
	}
	return nil
}

// checkFileName accepts a plain file name inside the card directory, so a
// tampered manifest cannot make Open read (or a key land) elsewhere.
func checkFileName(f string) error {
	switch {
	case f == "":
		return errors.New("empty file name")
	case f != filepath.Base(f) || strings.ContainsAny(f, `/\`) || f == "." || f == "..":
		return fmt.Errorf("file name %q is not a plain name inside the card directory", f)
	case strings.HasPrefix(f, "."):
		return fmt.Errorf("file name %q starts with a dot", f)
	}
	return nil
}

// decodeState parses a PIN state file and checks the counter against
// maxTries. maxTries 0 means the file must hold its own hash parameters
// (PIV's pin.json, puk.json), whose max_tries applies; otherwise it must
// not (CAC's state.json, whose hash is in the manifest).
func decodeState(b []byte, maxTries int) (state, error) {
	var s state
	if len(b) > maxStateSize {
		return s, fmt.Errorf("larger than %d bytes", maxStateSize)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&s); err != nil {
		return s, fmt.Errorf("not valid JSON: %w", err)
	}
	if d.More() {
		return s, errors.New("trailing data after the JSON object")
	}
	if s.Version != formatVersion {
		return s, fmt.Errorf("unknown format version %d (want %d)", s.Version, formatVersion)
	}
	switch {
	case maxTries == 0 && s.PIN == nil:
		return s, errors.New("no PIN hash (\"pin\") in it")
	case maxTries != 0 && s.PIN != nil:
		return s, errors.New("unexpected PIN hash (\"pin\") in it; the card's hash is in card.json")
	case s.PIN != nil:
		if err := checkPINParams(*s.PIN); err != nil {
			return s, err
		}
		maxTries = s.PIN.MaxTries
	}
	if s.TriesLeft < 0 || s.TriesLeft > maxTries {
		return s, fmt.Errorf("tries_left %d out of range [0, %d]", s.TriesLeft, maxTries)
	}
	return s, nil
}

func encodeJSON(v any) ([]byte, error) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}
