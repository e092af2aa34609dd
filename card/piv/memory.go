package piv

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"fmt"
	"sync"

	"github.com/vscard/vscard/token"
)

// MemoryStore is a Store held in memory, for tests and imports. Nothing
// survives the process.
type MemoryStore struct {
	mu      sync.Mutex
	objects map[uint32][]byte
	keys    map[byte]token.Key
	pin     *token.MemoryPIN
	puk     *token.MemoryPIN
	mgmAlg  byte
	mgmKey  []byte
}

var _ Store = (*MemoryStore)(nil)

// NewMemoryStore returns an in-memory Store with the given PIN, PUK (3
// tries each) and card management key.
func NewMemoryStore(pin, puk string, mgmAlg byte, mgmKey []byte) *MemoryStore {
	return &MemoryStore{
		objects: make(map[uint32][]byte),
		keys:    make(map[byte]token.Key),
		pin:     token.NewMemoryPIN(pin, 3),
		puk:     token.NewMemoryPIN(puk, 3),
		mgmAlg:  mgmAlg,
		mgmKey:  append([]byte(nil), mgmKey...),
	}
}

// Object implements Store.
func (m *MemoryStore) Object(tag uint32) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.objects[tag]
	if !ok {
		return nil, fmt.Errorf("piv: object %X: %w", tag, ErrNotFound)
	}
	return append([]byte(nil), v...), nil
}

// PutObject implements Store.
func (m *MemoryStore) PutObject(tag uint32, value []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(value) == 0 {
		delete(m.objects, tag)
		return nil
	}
	m.objects[tag] = append([]byte(nil), value...)
	return nil
}

// Key implements Store.
func (m *MemoryStore) Key(ref byte) (token.Key, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[ref]
	if !ok {
		return nil, fmt.Errorf("piv: key %02X: %w", ref, ErrNotFound)
	}
	return k, nil
}

// SetKey implements Store. RSA keys become token.RSAKey and EC keys
// token.ECKey, so they do raw RSA and ECDH.
func (m *MemoryStore) SetKey(ref byte, key crypto.Signer) error {
	var k token.Key
	switch key := key.(type) {
	case *rsa.PrivateKey:
		k = token.NewRSAKey(key)
	case *ecdsa.PrivateKey:
		k = token.NewECKey(key)
	default:
		return fmt.Errorf("piv: key %02X: unsupported key type %T", ref, key)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.keys[ref] = k
	return nil
}

// PIN implements Store.
func (m *MemoryStore) PIN() token.SettablePIN { return m.pin }

// PUK implements Store.
func (m *MemoryStore) PUK() token.SettablePIN { return m.puk }

// ManagementKey implements Store.
func (m *MemoryStore) ManagementKey() (byte, []byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mgmAlg, append([]byte(nil), m.mgmKey...), nil
}

// SetManagementKey implements Store.
func (m *MemoryStore) SetManagementKey(alg byte, key []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mgmAlg, m.mgmKey = alg, append([]byte(nil), key...)
	return nil
}
