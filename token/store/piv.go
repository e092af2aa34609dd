package store

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vscard/vscard/token"
)

// PIV card layout (see the package doc for the CAC one). A PIV card is
// written to by the card itself (GENERATE ASYMMETRIC KEY PAIR, PUT DATA,
// CHANGE REFERENCE DATA), so unlike a CAC card its files are not listed
// in the manifest: their names follow from the key reference or tag.
//
//	card.json      manifest (0600): version, type "piv", CN, card ID, CA files
//	pin.json       PIN hash and retry counter (0600), one atomic file
//	puk.json       PUK hash and retry counter (0600)
//	mgm.json       card management key (9B): algorithm and value (0600)
//	key-9a.pem     private key of key reference 9A, PKCS#8 PEM (0600)
//	obj-5fc105     data object 5FC105's value, raw (0600)
//	ca.pem, ca.der, ca-key.pem   the CA, as on a CAC card
const (
	PINFile = "pin.json"
	PUKFile = "puk.json"
	MgmFile = "mgm.json"
)

// Limits for PIV files.
const (
	// maxObjectSize bounds one data object: SP 800-73-4's largest
	// container (the facial image) is 12,704 bytes.
	maxObjectSize = 64 << 10
	maxTag        = 0xFFFFFF
	maxMgmSize    = 1 << 10
)

// PIV management key algorithm identifiers (SP 800-78-4 Table 6-2), as
// card/piv names them. Duplicated here because this package must not
// import card/piv (the dependency goes the other way in tests).
const (
	MgmAlgTDES   byte = 0x03
	MgmAlgAES128 byte = 0x08
	MgmAlgAES192 byte = 0x0A
	MgmAlgAES256 byte = 0x0C
)

// MgmKeyLen returns the key length of a management key algorithm, or false
// for an unknown one.
func MgmKeyLen(alg byte) (int, bool) {
	switch alg {
	case MgmAlgTDES, MgmAlgAES192:
		return 24, true
	case MgmAlgAES128:
		return 16, true
	case MgmAlgAES256:
		return 32, true
	}
	return 0, false
}

// PIVKeyRefs lists the key references a PIV card holds private keys in, in
// the order card show prints them: 9A, 9C, 9D, 9E and the 20 retired key
// management keys 82–95.
func PIVKeyRefs() []byte {
	refs := []byte{0x9A, 0x9C, 0x9D, 0x9E}
	for r := byte(0x82); r <= 0x95; r++ {
		refs = append(refs, r)
	}
	return refs
}

func validKeyRef(ref byte) bool { return slices.Contains(PIVKeyRefs(), ref) }

type pivManifest struct {
	Version int         `json:"version"`
	Type    string      `json:"type"`
	CN      string      `json:"cn"`
	ID      string      `json:"id"` // hex
	Created time.Time   `json:"created"`
	CA      *manifestCA `json:"ca,omitempty"`
}

type mgmFile struct {
	Version int    `json:"version"`
	Alg     int    `json:"alg"`
	Key     string `json:"key"` // hex
}

// decodePIVManifest parses and validates a PIV card.json.
func decodePIVManifest(b []byte) (*pivManifest, error) {
	t, err := decodeType(b)
	if err != nil {
		return nil, err
	}
	if err := checkType(t, TypePIV); err != nil {
		return nil, err
	}
	var m pivManifest
	if err := decodeStrict(b, &m); err != nil {
		return nil, err
	}
	if _, err := hex.DecodeString(m.ID); err != nil || len(m.ID) != 32 {
		return nil, fmt.Errorf("id %q is not 16 bytes of hex", m.ID)
	}
	if m.CA != nil {
		seen := map[string]bool{}
		for what, f := range map[string]string{"ca cert": m.CA.Cert, "ca der": m.CA.DER, "ca key": m.CA.Key} {
			if f == "" && what != "ca cert" {
				continue
			}
			if err := checkFileName(f); err != nil {
				return nil, fmt.Errorf("%s: %w", what, err)
			}
			if isPIVStoreFile(f) || seen[f] {
				return nil, fmt.Errorf("%s: file %q is used for something else", what, f)
			}
			seen[f] = true
		}
	}
	return &m, nil
}

// isPIVStoreFile reports whether name is one the PIV store writes itself.
func isPIVStoreFile(name string) bool {
	switch name {
	case ManifestFile, StateFile, PINFile, PUKFile, MgmFile:
		return true
	}
	return strings.HasPrefix(name, "key-") || strings.HasPrefix(name, "obj-")
}

// decodeType returns the type of a manifest of the supported version.
func decodeType(b []byte) (string, error) {
	if len(b) > maxManifestSize {
		return "", fmt.Errorf("larger than %d bytes", maxManifestSize)
	}
	var v struct {
		Version int    `json:"version"`
		Type    string `json:"type"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return "", fmt.Errorf("not valid JSON: %w", err)
	}
	if v.Version != formatVersion {
		return "", fmt.Errorf("unknown format version %d (this vscard reads version %d; a newer vscard may have made it)", v.Version, formatVersion)
	}
	return v.Type, nil
}

// decodeStrict decodes one JSON object with no unknown fields and nothing
// after it.
func decodeStrict(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return fmt.Errorf("not valid JSON: %w", err)
	}
	if d.More() {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

// decodeMgm parses mgm.json.
func decodeMgm(b []byte) (byte, []byte, error) {
	if len(b) > maxMgmSize {
		return 0, nil, fmt.Errorf("larger than %d bytes", maxMgmSize)
	}
	var m mgmFile
	if err := decodeStrict(b, &m); err != nil {
		return 0, nil, err
	}
	if m.Version != formatVersion {
		return 0, nil, fmt.Errorf("unknown format version %d (want %d)", m.Version, formatVersion)
	}
	if m.Alg < 0 || m.Alg > 0xFF {
		return 0, nil, fmt.Errorf("unknown management key algorithm %d", m.Alg)
	}
	key, err := hex.DecodeString(m.Key)
	if err != nil {
		return 0, nil, fmt.Errorf("key is not hex: %w", err)
	}
	if err := checkMgmKey(byte(m.Alg), key); err != nil {
		return 0, nil, err
	}
	return byte(m.Alg), key, nil
}

func checkMgmKey(alg byte, key []byte) error {
	n, ok := MgmKeyLen(alg)
	if !ok {
		return fmt.Errorf("unknown management key algorithm %02X (want 03 3DES, 08 AES-128, 0A AES-192 or 0C AES-256)", alg)
	}
	if len(key) != n {
		return fmt.Errorf("management key for algorithm %02X is %d bytes, want %d", alg, len(key), n)
	}
	return nil
}

func keyFileName(ref byte) string   { return fmt.Sprintf("key-%02x.pem", ref) }
func objFileName(tag uint32) string { return fmt.Sprintf("obj-%06x", tag) }

// parseObjFileName returns the tag of an obj-XXXXXX file name.
func parseObjFileName(name string) (uint32, bool) {
	h, ok := strings.CutPrefix(name, "obj-")
	if !ok || len(h) != 6 || strings.ToLower(h) != h {
		return 0, false
	}
	v, err := strconv.ParseUint(h, 16, 32)
	if err != nil || v == 0 {
		return 0, false
	}
	return uint32(v), true
}

// PIVCard is a PIV card directory. It implements card/piv's Store
// interface (without importing it): data objects by tag, private keys by
// key reference, the PIN and PUK with persistent retry counters, and the
// card management key. Every change is durable when its method returns
// (temporary file, fsync, rename, fsync of the directory). It is safe for
// concurrent use, and several processes may serve one card: everything
// is re-read from disk (keys are cached while their file is unchanged),
// and PIN checks take the directory's flock.
type PIVCard struct {
	cardFiles
	pin, puk *pin
	notFound error
	log      *slog.Logger

	genPIN, genPUK string
	genMgm         []byte

	mu   sync.Mutex // guards keys
	keys map[byte]cachedKey
}

type cachedKey struct {
	fi  fs.FileInfo
	key token.Key
}

// PIVOpenOptions are the optional settings of OpenPIV.
type PIVOpenOptions struct {
	// Logger receives PIN and PUK failures (never their values). Nil
	// discards.
	Logger *slog.Logger
	// NotFound is the error an absent object or key wraps besides
	// fs.ErrNotExist: cmd/vscard passes piv.ErrNotFound, which this
	// package cannot name without importing card/piv.
	NotFound error
}

// Type returns the card type recorded in dir's manifest: TypeCAC or
// TypePIV. It reads only the manifest; Open or OpenPIV check the rest.
func Type(dir string) (string, error) {
	mpath := filepath.Join(dir, ManifestFile)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("store: no card directory %s; make one with: vscard card new %s", dir, dir)
	}
	if _, err := os.Lstat(mpath); errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("store: %s is not a vscard card: it has no %s", dir, ManifestFile)
	}
	b, err := readLimited(mpath, maxManifestSize)
	if err != nil {
		return "", fmt.Errorf("store: read %s: %w", mpath, err)
	}
	t, err := decodeType(b)
	if err != nil {
		return "", fmt.Errorf("store: %s is damaged: %w; restore it from a backup or make a new card", mpath, err)
	}
	if t != TypeCAC && t != TypePIV {
		return "", fmt.Errorf("store: %s: unknown card type %q (this vscard knows %q and %q)", mpath, t, TypeCAC, TypePIV)
	}
	return t, nil
}

// OpenPIV loads the PIV card in dir, checking permissions like Open and
// reading every file once, so a damaged card fails here rather than at
// the first command.
func OpenPIV(dir string, opts PIVOpenOptions) (*PIVCard, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	nf := opts.NotFound
	if nf == nil {
		nf = fs.ErrNotExist
	}
	if _, err := Type(dir); err != nil {
		return nil, err
	}
	mpath := filepath.Join(dir, ManifestFile)
	if err := checkPrivate(dir, true); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	if err := checkPrivate(mpath, false); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	b, err := readLimited(mpath, maxManifestSize)
	if err != nil {
		return nil, fmt.Errorf("store: read %s: %w", mpath, err)
	}
	m, err := decodePIVManifest(b)
	if err != nil {
		if errors.Is(err, ErrWrongType) {
			return nil, fmt.Errorf("store: %s: %w", dir, err)
		}
		return nil, fmt.Errorf("store: %s is damaged: %w; restore it from a backup or make a new card", mpath, err)
	}
	id, _ := hex.DecodeString(m.ID)
	c := &PIVCard{
		cardFiles: cardFiles{dir: dir, info: Info{Version: m.Version, Type: m.Type, CN: m.CN, ID: id, Created: m.Created}},
		pin:       &pin{dir: dir, file: PINFile, what: "PIN", log: log},
		puk:       &pin{dir: dir, file: PUKFile, what: "PUK", log: log},
		notFound:  nf,
		log:       log,
		keys:      map[byte]cachedKey{},
	}
	for _, p := range []*pin{c.pin, c.puk} {
		if err := checkPrivate(p.statePath(), false); err != nil {
			return nil, p.stateError(err)
		}
		s, err := p.readState()
		if err != nil {
			return nil, err
		}
		if p == c.pin {
			c.info.MaxTries = s.PIN.MaxTries
		}
	}
	if _, _, err := c.ManagementKey(); err != nil {
		return nil, err
	}
	if err := c.loadCA(m.CA); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	for _, e := range ents {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, "key-"):
			ref, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(name, "key-"), ".pem"), 16, 8)
			if err != nil || keyFileName(byte(ref)) != name || !validKeyRef(byte(ref)) {
				return nil, fmt.Errorf("store: %s: not a key file this vscard writes (key-XX.pem for 9a, 9c, 9d, 9e, 82-95); remove it", filepath.Join(dir, name))
			}
			if _, err := c.Key(byte(ref)); err != nil {
				return nil, err
			}
		case strings.HasPrefix(name, "obj-"):
			tag, ok := parseObjFileName(name)
			if !ok {
				return nil, fmt.Errorf("store: %s: not an object file this vscard writes (obj-XXXXXX, the tag in lower-case hex); remove it", filepath.Join(dir, name))
			}
			if _, err := c.Object(tag); err != nil {
				return nil, err
			}
		}
	}
	return c, nil
}

// GeneratedSecrets returns the PIN, PUK and management key that CreatePIV
// or ImportPIV generated because none was given ("" or nil for one that
// was given), so the caller can show them once. Any other PIVCard
// returns nothing: the store keeps only hashes of the PIN and PUK.
func (c *PIVCard) GeneratedSecrets() (pin, puk string, mgmKey []byte) {
	return c.genPIN, c.genPUK, c.genMgm
}

// Object implements piv.Store.
func (c *PIVCard) Object(tag uint32) ([]byte, error) {
	if tag == 0 || tag > maxTag {
		return nil, c.errNotFound(fmt.Sprintf("object tag %X", tag))
	}
	path := filepath.Join(c.dir, objFileName(tag))
	if err := checkPrivate(path, false); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, c.errNotFound(fmt.Sprintf("object %06X", tag))
		}
		return nil, fmt.Errorf("store: object %06X: %w", tag, err)
	}
	b, err := readLimited(path, maxObjectSize)
	if err != nil {
		return nil, fmt.Errorf("store: object %06X in %s: %w; restore it from a backup", tag, path, err)
	}
	return b, nil
}

// errNotFound is an absent object's or key's error: it wraps both
// fs.ErrNotExist and PIVOpenOptions.NotFound.
func (c *PIVCard) errNotFound(what string) error {
	if c.notFound == fs.ErrNotExist {
		return fmt.Errorf("store: %s: %w", what, fs.ErrNotExist)
	}
	return fmt.Errorf("store: %s: %w (%w)", what, c.notFound, fs.ErrNotExist)
}

// PutObject implements piv.Store. An empty value deletes the object.
func (c *PIVCard) PutObject(tag uint32, value []byte) error {
	if tag == 0 || tag > maxTag {
		return fmt.Errorf("store: object tag %X out of range", tag)
	}
	if len(value) > maxObjectSize {
		return fmt.Errorf("store: object %06X is %d bytes; at most %d are stored", tag, len(value), maxObjectSize)
	}
	name := objFileName(tag)
	if len(value) == 0 {
		err := os.Remove(filepath.Join(c.dir, name))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err == nil {
			err = syncDir(c.dir)
		}
		if err != nil {
			return fmt.Errorf("store: delete object %06X: %w", tag, err)
		}
		return nil
	}
	if err := writeAtomic(c.dir, name, value); err != nil {
		return fmt.Errorf("store: save object %06X: %w", tag, err)
	}
	return nil
}

// Key implements piv.Store: RSA keys are *token.RSAKey (token.RawRSA), EC
// keys *token.ECKey (token.ECDH). A parsed key is reused while its file
// is the same file (a replacement is a new inode, written by rename).
func (c *PIVCard) Key(ref byte) (token.Key, error) {
	if !validKeyRef(ref) {
		return nil, c.errNotFound(fmt.Sprintf("key reference %02X", ref))
	}
	path := filepath.Join(c.dir, keyFileName(ref))
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, c.errNotFound(fmt.Sprintf("key %02X", ref))
	}
	if err != nil {
		return nil, fmt.Errorf("store: key %02X: %w", ref, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if ck, ok := c.keys[ref]; ok && os.SameFile(ck.fi, fi) && ck.fi.ModTime().Equal(fi.ModTime()) && ck.fi.Size() == fi.Size() {
		return ck.key, nil
	}
	k, err := loadKey(c.dir, keyFileName(ref))
	if err != nil {
		return nil, err
	}
	if err := checkPIVKey(k); err != nil {
		return nil, fmt.Errorf("store: private key %s: %w; restore it from a backup", path, err)
	}
	tk := wrapPIVKey(k)
	c.keys[ref] = cachedKey{fi: fi, key: tk}
	return tk, nil
}

// SetKey implements piv.Store. It accepts the key types a PIV card has:
// RSA 1024, 2048, 3072 and 4096, ECDSA P-256 and P-384.
func (c *PIVCard) SetKey(ref byte, key crypto.Signer) error {
	if !validKeyRef(ref) {
		return fmt.Errorf("store: key reference %02X holds no private key (want 9A, 9C, 9D, 9E or 82-95)", ref)
	}
	k, err := pivSigner(key)
	if err != nil {
		return fmt.Errorf("store: key %02X: %w", ref, err)
	}
	if err := checkPIVKey(k); err != nil {
		return fmt.Errorf("store: key %02X: %w", ref, err)
	}
	b, err := marshalKeyPEM(k)
	if err != nil {
		return fmt.Errorf("store: encode key %02X: %w", ref, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	name := keyFileName(ref)
	if err := writeAtomic(c.dir, name, b); err != nil {
		return fmt.Errorf("store: save key %02X: %w", ref, err)
	}
	if fi, err := os.Lstat(filepath.Join(c.dir, name)); err == nil {
		c.keys[ref] = cachedKey{fi: fi, key: wrapPIVKey(k)}
	} else {
		delete(c.keys, ref)
	}
	return nil
}

// pivSigner unwraps the token key types into the crypto keys they hold,
// so a key read from one card can be stored in another.
func pivSigner(k crypto.Signer) (crypto.Signer, error) {
	switch k := k.(type) {
	case *token.ECKey:
		return k.PrivateKey, nil
	case *token.RSAKey:
		return signer(k.PrivateKey)
	case *rsa.PrivateKey, *ecdsa.PrivateKey:
		return signer(k)
	}
	return nil, fmt.Errorf("unsupported key type %T; a PIV card holds RSA or ECDSA keys", k)
}

// checkPIVKey accepts the algorithms of SP 800-78-4 that card/piv serves.
func checkPIVKey(k crypto.Signer) error {
	switch k := k.(type) {
	case *rsa.PrivateKey:
		switch n := k.N.BitLen(); n {
		case 1024, 2048, 3072, 4096:
			return nil
		default:
			return fmt.Errorf("RSA-%d key; a PIV card holds RSA-1024, 2048, 3072 or 4096", n)
		}
	case *ecdsa.PrivateKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return nil
		}
		return fmt.Errorf("EC key on %s; a PIV card holds P-256 or P-384", k.Curve.Params().Name)
	}
	return fmt.Errorf("unsupported key type %T", k)
}

func wrapPIVKey(k crypto.Signer) token.Key {
	switch k := k.(type) {
	case *rsa.PrivateKey:
		return token.NewRSAKey(k)
	case *ecdsa.PrivateKey:
		return token.NewECKey(k)
	}
	return k
}

// PIN implements piv.Store (key reference 80).
func (c *PIVCard) PIN() token.SettablePIN { return c.pin }

// PUK implements piv.Store (key reference 81).
func (c *PIVCard) PUK() token.SettablePIN { return c.puk }

// ManagementKey implements piv.Store.
func (c *PIVCard) ManagementKey() (byte, []byte, error) {
	path := filepath.Join(c.dir, MgmFile)
	if err := checkPrivate(path, false); err != nil {
		if errors.Is(err, errPermissions) {
			return 0, nil, fmt.Errorf("store: %w", err)
		}
		return 0, nil, fmt.Errorf("store: management key %s: %w; restore it from a backup", path, err)
	}
	b, err := readLimited(path, maxMgmSize)
	if err != nil {
		return 0, nil, fmt.Errorf("store: management key %s: %w; restore it from a backup", path, err)
	}
	alg, key, err := decodeMgm(b)
	if err != nil {
		return 0, nil, fmt.Errorf("store: management key %s is damaged: %w; restore it from a backup", path, err)
	}
	return alg, key, nil
}

// SetManagementKey implements piv.Store.
func (c *PIVCard) SetManagementKey(alg byte, key []byte) error {
	if err := checkMgmKey(alg, key); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	b, err := encodeMgm(alg, key)
	if err != nil {
		return err
	}
	if err := writeAtomic(c.dir, MgmFile, b); err != nil {
		return fmt.Errorf("store: save management key: %w", err)
	}
	return nil
}

func encodeMgm(alg byte, key []byte) ([]byte, error) {
	b, err := encodeJSON(mgmFile{Version: formatVersion, Alg: int(alg), Key: hex.EncodeToString(key)})
	if err != nil {
		return nil, fmt.Errorf("store: encode management key: %w", err)
	}
	return b, nil
}

// Slots returns the key references that hold a private key, in
// PIVKeyRefs order.
func (c *PIVCard) Slots() []byte {
	var refs []byte
	for _, r := range PIVKeyRefs() {
		if _, err := os.Lstat(filepath.Join(c.dir, keyFileName(r))); err == nil {
			refs = append(refs, r)
		}
	}
	return refs
}

// Objects returns the tags of the stored data objects, ascending.
func (c *PIVCard) Objects() ([]uint32, error) {
	ents, err := os.ReadDir(c.dir)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	var tags []uint32
	for _, e := range ents {
		if t, ok := parseObjFileName(e.Name()); ok {
			tags = append(tags, t)
		}
	}
	slices.Sort(tags)
	return tags, nil
}
