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

// Card types. Only CAC is served today; a PIV card will follow.
const typeCAC = "cac"

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
	if m.Type != typeCAC {
		return nil, fmt.Errorf("unknown card type %q (want %q)", m.Type, typeCAC)
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
	p := m.PIN
	if p.Alg != algPBKDF2SHA256 {
		return nil, fmt.Errorf("unknown PIN hash algorithm %q", p.Alg)
	}
	if p.Iterations < minIterations || p.Iterations > maxIterations {
		return nil, fmt.Errorf("PIN hash iterations %d out of range [%d, %d]", p.Iterations, minIterations, maxIterations)
	}
	if len(p.Salt) < 16 || len(p.Salt) > 64 {
		return nil, fmt.Errorf("PIN salt is %d bytes; want 16 to 64", len(p.Salt))
	}
	if len(p.Hash) != pinHashLen {
		return nil, fmt.Errorf("PIN hash is %d bytes; want %d", len(p.Hash), pinHashLen)
	}
	if p.MaxTries < 1 || p.MaxTries > maxTriesLimit {
		return nil, fmt.Errorf("max_tries %d out of range [1, %d]", p.MaxTries, maxTriesLimit)
	}
	return &m, nil
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

// decodeState parses state.json and checks the counter against maxTries.
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
