package store

import (
	"bytes"
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

// pin implements token.PIN with a counter persisted in state.json.
type pin struct {
	dir    string
	params manifestPIN
	log    *slog.Logger

	// beforeCompare, if set, runs after the counter is persisted and
	// before the PIN is compared (tests check the order with it).
	beforeCompare func()

	mu sync.Mutex
}

var _ token.PIN = (*pin)(nil)

func (p *pin) statePath() string { return filepath.Join(p.dir, StateFile) }

func (p *pin) readState() (state, error) {
	b, err := readLimited(p.statePath(), maxStateSize)
	if err != nil {
		return state{}, stateError(p.statePath(), err)
	}
	s, err := decodeState(b, p.params.MaxTries)
	if err != nil {
		return state{}, stateError(p.statePath(), err)
	}
	return s, nil
}

func stateError(path string, err error) error {
	return fmt.Errorf("store: PIN retry counter %s: %w; it is never reset automatically: restore it from a backup, or if you own this card write {\"version\":1,\"tries_left\":N} to it (that unblocks the PIN)", path, err)
}

func (p *pin) writeState(tries int) error {
	b, err := encodeJSON(state{Version: formatVersion, TriesLeft: tries})
	if err != nil {
		return err
	}
	if err := writeAtomic(p.dir, StateFile, b); err != nil {
		return fmt.Errorf("store: save PIN retry counter %s: %w", p.statePath(), err)
	}
	return nil
}

// Verify implements token.PIN. Trailing FF bytes (the CAC padding) are
// removed before the check. The counter is decremented and made durable
// before the comparison, and restored after a match, so that killing the
// process at any moment never yields an uncounted guess.
func (p *pin) Verify(given []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	unlock, err := lockDir(p.dir)
	if err != nil {
		return 0, fmt.Errorf("store: lock card %s: %w", p.dir, err)
	}
	defer unlock()

	// Re-read under the lock: another process may have counted tries.
	s, err := p.readState()
	if err != nil {
		return 0, err
	}
	if s.TriesLeft <= 0 {
		return 0, token.ErrPINBlocked
	}
	left := s.TriesLeft - 1
	if err := p.writeState(left); err != nil {
		return 0, err
	}

	if p.beforeCompare != nil {
		p.beforeCompare()
	}
	given = bytes.TrimRight(given, "\xff")
	ok := false
	if len(given) >= minPINLen && len(given) <= maxPINLen {
		h, err := hashPIN(given, p.params.Salt, p.params.Iterations)
		if err != nil {
			return left, fmt.Errorf("store: hash PIN: %w", err)
		}
		ok = subtle.ConstantTimeCompare(h, p.params.Hash) == 1
	} else {
		// Still spend the hashing time, so the length is not revealed
		// by timing.
		_, _ = hashPIN([]byte("\x00"), p.params.Salt, p.params.Iterations)
	}
	if !ok {
		p.log.Info("PIN verification failed", "card", p.dir, "tries_left", left)
		return left, fmt.Errorf("%w: %d tries left", token.ErrPINIncorrect, left)
	}
	if err := p.writeState(p.params.MaxTries); err != nil {
		return left, err
	}
	return p.params.MaxTries, nil
}

// TriesLeft implements token.PIN. It re-reads the counter so another
// process's tries show; if the counter cannot be read it reports 0 (the
// card behaves as blocked) and logs why.
func (p *pin) TriesLeft() (int, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s, err := p.readState()
	if err != nil {
		p.log.Error("read PIN retry counter", "err", err)
		return 0, p.params.MaxTries
	}
	return s.TriesLeft, p.params.MaxTries
}
