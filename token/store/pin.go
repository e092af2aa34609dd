package store

import (
	"bytes"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"

	"github.com/vscard/vscard/token"
)

const (
	// defaultIterations: about 50 ms per check on one current core
	// (measured 53 ms for 200,000 on the project's build machine).
	defaultIterations = 200_000
	pinHashLen        = 32
	pinSaltLen        = 16
	// PIN length limits: CAC PINs are at most 8 bytes (OpenSC pads to 8
	// with FF, min length 4; cac.md §8.3).
	minPINLen = 4
	maxPINLen = 8
	// defaultMaxTries is what a CAC-like card allows.
	defaultMaxTries = 3
	maxTriesLimit   = 15 // fits a 63 Cx status word
)

// CheckPIN reports whether pin is acceptable for a card: 4 to 8 printable
// ASCII characters. FF (the padding byte) and NUL (which libcacard treats as
// the end of the PIN, cac.md §4.7) can thus never be part of a PIN.
func CheckPIN(pin string) error {
	if n := len(pin); n < minPINLen || n > maxPINLen {
		return fmt.Errorf("store: PIN must be %d to %d characters, not %d", minPINLen, maxPINLen, n)
	}
	for i := 0; i < len(pin); i++ {
		if c := pin[i]; c < 0x20 || c > 0x7e {
			return fmt.Errorf("store: PIN must be printable ASCII (character %d is not)", i+1)
		}
	}
	return nil
}

// GeneratePIN returns 8 random decimal digits.
func GeneratePIN(rnd io.Reader) (string, error) {
	if rnd == nil {
		rnd = rand.Reader
	}
	var out [maxPINLen]byte
	var b [1]byte
	for i := 0; i < len(out); {
		if _, err := io.ReadFull(rnd, b[:]); err != nil {
			return "", fmt.Errorf("store: generate PIN: %w", err)
		}
		// Rejection sampling keeps the digits uniform (250 = 25*10).
		if b[0] >= 250 {
			continue
		}
		out[i] = '0' + b[0]%10
		i++
	}
	return string(out[:]), nil
}

func hashPIN(pin []byte, salt []byte, iter int) ([]byte, error) {
	return pbkdf2.Key(sha256.New, string(pin), salt, iter, pinHashLen)
}

func newPINParams(pin string, iter, maxTries int, rnd io.Reader) (manifestPIN, error) {
	if iter == 0 {
		iter = defaultIterations
	}
	salt := make([]byte, pinSaltLen)
	if _, err := io.ReadFull(rnd, salt); err != nil {
		return manifestPIN{}, fmt.Errorf("store: PIN salt: %w", err)
	}
	h, err := hashPIN([]byte(pin), salt, iter)
	if err != nil {
		return manifestPIN{}, fmt.Errorf("store: hash PIN: %w", err)
	}
	return manifestPIN{Alg: algPBKDF2SHA256, Iterations: iter, Salt: salt, Hash: h, MaxTries: maxTries}, nil
}

// pin implements token.PIN with a counter persisted in a state file:
// state.json for a CAC card, whose hash lives in the manifest, and
// pin.json / puk.json for a PIV card, which hold the hash beside the
// counter (state.PIN) so that Set can replace both in one atomic rename.
type pin struct {
	dir    string
	file   string      // state file name inside dir
	what   string      // "PIN" or "PUK", for messages
	params manifestPIN // the manifest's hash; unused when the state file holds one
	log    *slog.Logger

	// beforeCompare, if set, runs after the counter is persisted and
	// before the PIN is compared (tests check the order with it).
	beforeCompare func()
	// slowHashes counts PBKDF2 computations (tests check the fast path).
	slowHashes int

	mu   sync.Mutex
	fast fastCheck
}

// fastCheck lets Verify skip the deliberately slow PBKDF2 once this
// process has seen the right PIN: a PIV key with the "PIN always" policy
// (9C) needs a VERIFY before every signature, and 50 ms of hashing each
// time would make every such signature 50 ms slower. After a match Verify
// keeps HMAC-SHA256(k, PIN) under a random per-process key k, bound to
// the stored hash it matched; a later Verify against the same stored hash
// compares HMACs in constant time. The counter is still decremented and
// made durable first, so the fast path changes only speed, never the
// count. A stored hash that changed (Set, or another process changing
// the PIN) makes the check fall back to PBKDF2. What this keeps in memory
// is no more than the process already holds: the card's private keys.
type fastCheck struct {
	key  []byte // nil until the first match
	tag  []byte
	hash []byte // the stored PBKDF2 hash the tag was made against
}

func (f *fastCheck) mac(pin []byte) []byte {
	m := hmac.New(sha256.New, f.key)
	m.Write(pin)
	return m.Sum(nil)
}

// match reports whether the fast check applies to stored and, if it
// does, whether pin is the PIN it was made from.
func (f *fastCheck) match(stored, pin []byte) (applies, ok bool) {
	if f.key == nil || !bytes.Equal(f.hash, stored) {
		return false, false
	}
	return true, hmac.Equal(f.mac(pin), f.tag)
}

// remember records pin as the one matching stored.
func (f *fastCheck) remember(stored, pin []byte) {
	if f.key == nil {
		f.key = make([]byte, 32)
		if _, err := rand.Read(f.key); err != nil {
			f.key = nil // no fast path without a key; Verify stays correct
			return
		}
	}
	f.tag = f.mac(pin)
	f.hash = bytes.Clone(stored)
}

var _ token.SettablePIN = (*pin)(nil)

func (p *pin) statePath() string { return filepath.Join(p.dir, p.file) }

// inline reports whether the hash lives in the state file (PIV).
func (p *pin) inline() bool { return p.params.Alg == "" }

func (p *pin) readState() (state, error) {
	b, err := readLimited(p.statePath(), maxStateSize)
	if err != nil {
		return state{}, p.stateError(err)
	}
	max := p.params.MaxTries
	if p.inline() {
		max = 0 // the file's own max_tries applies
	}
	s, err := decodeState(b, max)
	if err != nil {
		return state{}, p.stateError(err)
	}
	return s, nil
}

// hashParams returns the hash parameters in force for state s.
func (p *pin) hashParams(s state) manifestPIN {
	if s.PIN != nil {
		return *s.PIN
	}
	return p.params
}

func (p *pin) stateError(err error) error {
	what := p.what
	if what == "" {
		what = "PIN"
	}
	if !p.inline() {
		return fmt.Errorf("store: %s retry counter %s: %w; it is never reset automatically: restore it from a backup, or if you own this card write {\"version\":1,\"tries_left\":N} to it (that unblocks the %s)", what, p.statePath(), err, what)
	}
	// A PIV state file also holds the hash, so it cannot be rewritten
	// from nothing.
	return fmt.Errorf("store: %s retry counter %s: %w; it is never reset automatically: restore it from a backup, or if you own this card set \"tries_left\" in it to N (that unblocks the %s)", what, p.statePath(), err, what)
}

func (p *pin) writeState(s state) error {
	s.Version = formatVersion
	b, err := encodeJSON(s)
	if err != nil {
		return err
	}
	if err := writeAtomic(p.dir, p.file, b); err != nil {
		return fmt.Errorf("store: save %s retry counter %s: %w", p.what, p.statePath(), err)
	}
	return nil
}

// Verify implements token.PIN. Trailing FF bytes (the CAC and PIV
// padding) are removed before the check. The counter is decremented and
// made durable before the comparison, and restored after a match, so that
// killing the process at any moment never yields an uncounted guess.
func (p *pin) Verify(given []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	unlock, err := lockDir(p.dir)
	if err != nil {
		return 0, fmt.Errorf("store: lock card %s: %w", p.dir, err)
	}
	defer unlock()

	// Re-read under the lock: another process may have counted tries
	// (or, on a PIV card, changed the PIN).
	s, err := p.readState()
	if err != nil {
		return 0, err
	}
	params := p.hashParams(s)
	if s.TriesLeft <= 0 {
		return 0, token.ErrPINBlocked
	}
	left := s.TriesLeft - 1
	s.TriesLeft = left
	if err := p.writeState(s); err != nil {
		return 0, err
	}

	if p.beforeCompare != nil {
		p.beforeCompare()
	}
	given = bytes.TrimRight(given, "\xff")
	ok := false
	if applies, match := p.fast.match(params.Hash, given); applies {
		ok = match
	} else if len(given) >= minPINLen && len(given) <= maxPINLen {
		p.slowHashes++
		h, err := hashPIN(given, params.Salt, params.Iterations)
		if err != nil {
			return left, fmt.Errorf("store: hash %s: %w", p.what, err)
		}
		ok = subtle.ConstantTimeCompare(h, params.Hash) == 1
		if ok {
			p.fast.remember(params.Hash, given)
		}
	} else {
		// Still spend the hashing time, so the length is not revealed
		// by timing.
		p.slowHashes++
		_, _ = hashPIN([]byte("\x00"), params.Salt, params.Iterations)
	}
	if !ok {
		p.log.Info(p.what+" verification failed", "card", p.dir, "tries_left", left)
		return left, fmt.Errorf("%w: %d tries left", token.ErrPINIncorrect, left)
	}
	s.TriesLeft = params.MaxTries
	if err := p.writeState(s); err != nil {
		return left, err
	}
	return params.MaxTries, nil
}

// Set implements token.SettablePIN for a PIN whose hash lives in its state
// file (a PIV card's PIN and PUK): a new salt and hash, and the counter at
// its maximum, written in one atomic rename. Trailing FF padding is
// removed as in Verify. A CAC card's PIN, hashed in the manifest, cannot
// be changed.
func (p *pin) Set(value []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.inline() {
		return fmt.Errorf("store: the %s of card %s cannot be changed", p.what, p.dir)
	}
	value = bytes.TrimRight(value, "\xff")
	if n := len(value); n < minPINLen || n > maxPINLen {
		return fmt.Errorf("store: %s must be %d to %d bytes, not %d", p.what, minPINLen, maxPINLen, n)
	}
	unlock, err := lockDir(p.dir)
	if err != nil {
		return fmt.Errorf("store: lock card %s: %w", p.dir, err)
	}
	defer unlock()
	s, err := p.readState()
	if err != nil {
		return err
	}
	old := p.hashParams(s)
	np, err := newPINParams(string(value), old.Iterations, old.MaxTries, rand.Reader)
	if err != nil {
		return err
	}
	return p.writeState(state{TriesLeft: np.MaxTries, PIN: &np})
}

// TriesLeft implements token.PIN. It re-reads the counter so another
// process's tries show; if the counter cannot be read it reports 0 (the
// card behaves as blocked) and logs why.
func (p *pin) TriesLeft() (int, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, err := p.readState()
	if err != nil {
		p.log.Error("read "+p.what+" retry counter", "err", err)
		return 0, p.params.MaxTries
	}
	return s.TriesLeft, p.hashParams(s).MaxTries
}
