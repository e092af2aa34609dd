package token

import (
	"crypto/subtle"
	"fmt"
	"sync"
)

// Memory is a Token held entirely in memory. Its retry counter is not
// persisted; use token/store for a card whose counter survives restarts.
type Memory struct {
	creds []Credential
	pin   *MemoryPIN
}

// NewMemory returns a token with the given credentials. A nil pin means
// the token needs no PIN.
func NewMemory(creds []Credential, pin *MemoryPIN) *Memory {
	return &Memory{creds: creds, pin: pin}
}

// Credentials implements Token.
func (m *Memory) Credentials() []Credential { return m.creds }

// PIN implements Token.
func (m *Memory) PIN() PIN {
	if m.pin == nil {
		return nil
	}
	return m.pin
}

// MemoryPIN is a PIN compared in constant time, with an in-memory counter.
type MemoryPIN struct {
	mu    sync.Mutex
	pin   []byte
	max   int
	tries int
}

// NewMemoryPIN returns a PIN allowing max consecutive wrong tries.
func NewMemoryPIN(pin string, max int) *MemoryPIN {
	if max <= 0 {
		max = 3
	}
	return &MemoryPIN{pin: []byte(pin), max: max, tries: max}
}

// Verify implements PIN.
func (p *MemoryPIN) Verify(pin []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tries <= 0 {
		return 0, ErrPINBlocked
	}
	if subtle.ConstantTimeCompare(pin, p.pin) == 1 {
		p.tries = p.max
		return p.tries, nil
	}
	p.tries--
	return p.tries, fmt.Errorf("%w: %d tries left", ErrPINIncorrect, p.tries)
}

// TriesLeft implements PIN.
func (p *MemoryPIN) TriesLeft() (int, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tries, p.max
}
