package store

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/vscard/vscard/token"
)

// Card is a card loaded from, or just written to, a card directory. It
// implements token.Token. It is safe for concurrent use.
type Card struct {
	cardFiles
	creds    []token.Credential
	pin      *pin
	genPIN   string
	warnings []string
}

var _ token.Token = (*Card)(nil)

// Info describes a card as its manifest records it.
type Info struct {
	Version  int       // manifest format version
	Type     string    // card type: "cac"
	CN       string    // the holder's name given at creation, or the first certificate's CN
	ID       []byte    // 16 random bytes chosen at creation, unique per card
	Created  time.Time // when the card was made
	MaxTries int       // PIN tries allowed before it blocks
}

// Credentials implements token.Token: identity first, then signing and
// encryption for a card from Create, or the import order.
func (c *Card) Credentials() []token.Credential { return c.creds }

// PIN implements token.Token. A store card always has a PIN.
func (c *Card) PIN() token.PIN { return c.pin }

// cardFiles is what CAC and PIV card directories have in common: the
// directory, the manifest's description and the CA stored with the card.
type cardFiles struct {
	dir     string
	info    Info
	ca      *x509.Certificate
	caFiles []string
}

// Dir returns the card directory.
func (c *cardFiles) Dir() string { return c.dir }

// Info returns what the manifest records about the card; for a PIV card
// MaxTries is the PIN's.
func (c *cardFiles) Info() Info {
	i := c.info
	i.ID = append([]byte(nil), c.info.ID...)
	return i
}

// CA returns the CA certificate stored with the card, or nil.
func (c *cardFiles) CA() *x509.Certificate { return c.ca }

// CAFiles returns the paths of the exported CA certificate files (ca.pem,
// ca.der), for import into a guest.
func (c *cardFiles) CAFiles() []string { return append([]string(nil), c.caFiles...) }

// loadCA loads the manifest's CA entry, if any, and checks that its key
// file (made by Create) is private.
func (c *cardFiles) loadCA(m *manifestCA) error {
	if m == nil {
		return nil
	}
	var err error
	if c.ca, err = loadCert(c.dir, m.Cert); err != nil {
		return err
	}
	c.caFiles = append(c.caFiles, filepath.Join(c.dir, m.Cert))
	if m.DER != "" {
		c.caFiles = append(c.caFiles, filepath.Join(c.dir, m.DER))
	}
	if m.Key != "" {
		if err := checkPrivate(filepath.Join(c.dir, m.Key), false); err != nil {
			return fmt.Errorf("store: %w", err)
		}
	}
	return nil
}

// GeneratedPIN returns the PIN that Create generated because Options.PIN
// was empty, so the caller can show it once. It is "" on any other Card:
// the store keeps only a hash.
func (c *Card) GeneratedPIN() string { return c.genPIN }

// Warnings lists what may keep the card from working although it is valid,
// e.g. an EC key on a CAC card.
func (c *Card) Warnings() []string { return append([]string(nil), c.warnings...) }

// OpenOptions are the optional settings for OpenWith.
type OpenOptions struct {
	// Logger receives PIN failures and counter read errors (never the
	// PIN). Nil discards.
	Logger *slog.Logger
}

// Open loads the card in dir. See the package doc for what it checks.
func Open(dir string) (*Card, error) { return OpenWith(dir, OpenOptions{}) }

// OpenWith is Open with options.
func OpenWith(dir string, opts OpenOptions) (*Card, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if _, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("store: no card directory %s; make one with: vscard card new %s", dir, dir)
		}
		return nil, fmt.Errorf("store: %w", err)
	}
	mpath := filepath.Join(dir, ManifestFile)
	if _, err := os.Lstat(mpath); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("store: %s is not a vscard card: it has no %s", dir, ManifestFile)
	}
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
	m, err := decodeManifest(b)
	if err != nil {
		return nil, fmt.Errorf("store: %s is damaged: %w; restore it from a backup or make a new card", mpath, err)
	}
	id, err := hex.DecodeString(m.ID)
	if err != nil {
		return nil, fmt.Errorf("store: %s is damaged: id: %w; restore it from a backup or make a new card", mpath, err)
	}

	c := &Card{
		cardFiles: cardFiles{dir: dir, info: Info{
			Version: m.Version, Type: m.Type, CN: m.CN, ID: id,
			Created: m.Created, MaxTries: m.PIN.MaxTries,
		}},
		pin: &pin{dir: dir, file: StateFile, what: "PIN", params: m.PIN, log: log},
	}
	for _, mc := range m.Credentials {
		cert, err := loadCert(dir, mc.Cert)
		if err != nil {
			return nil, err
		}
		key, err := loadKey(dir, mc.Key)
		if err != nil {
			return nil, err
		}
		if !matches(cert, key) {
			return nil, fmt.Errorf("store: %s does not hold the private key of %s (%s); the card is damaged: restore both files from a backup or make a new card",
				filepath.Join(dir, mc.Key), filepath.Join(dir, mc.Cert), cert.Subject)
		}
		c.creds = append(c.creds, token.Credential{Label: mc.Label, Cert: cert, Key: wrapKey(key)})
	}
	if err := c.loadCA(m.CA); err != nil {
		return nil, err
	}
	c.warnings = warnings(c.creds)
	// Read the counter now, so a damaged state.json fails Open rather than
	// the first VERIFY.
	if err := checkPrivate(c.pin.statePath(), false); err != nil {
		return nil, c.pin.stateError(err)
	}
	if _, err := c.pin.readState(); err != nil {
		return nil, err
	}
	return c, nil
}

func loadCert(dir, name string) (*x509.Certificate, error) {
	path := filepath.Join(dir, name)
	b, err := readLimited(path, maxPEMSize)
	if err != nil {
		return nil, fmt.Errorf("store: read certificate %s: %w; restore it from a backup or make a new card", path, err)
	}
	certs, err := parseCertPEM(b)
	if err != nil {
		return nil, fmt.Errorf("store: certificate %s: %w; restore it from a backup or make a new card", path, err)
	}
	if len(certs) != 1 {
		return nil, fmt.Errorf("store: certificate %s holds %d certificates, want 1; restore it from a backup or make a new card", path, len(certs))
	}
	return certs[0], nil
}

func loadKey(dir, name string) (crypto.Signer, error) {
	path := filepath.Join(dir, name)
	if err := checkPrivate(path, false); err != nil {
		if errors.Is(err, errPermissions) {
			return nil, fmt.Errorf("store: %w", err)
		}
		return nil, fmt.Errorf("store: private key %s: %w; restore it from a backup or make a new card", path, err)
	}
	b, err := readLimited(path, maxPEMSize)
	if err != nil {
		return nil, fmt.Errorf("store: read private key %s: %w; restore it from a backup or make a new card", path, err)
	}
	keys, err := parseKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("store: private key %s: %w", path, err)
	}
	if len(keys) != 1 {
		return nil, fmt.Errorf("store: private key %s holds %d keys, want 1; restore it from a backup or make a new card", path, len(keys))
	}
	return keys[0], nil
}

func warnings(creds []token.Credential) []string {
	var w []string
	for _, c := range creds {
		if _, ok := c.Key.(token.RawRSA); !ok {
			w = append(w, fmt.Sprintf("credential %q has a %s key; the CAC card serves only RSA keys, so it will not be usable there",
				c.Label, KeyDescription(c.Cert.PublicKey)))
		}
	}
	return w
}

// file is one file of a card about to be written.
type file struct {
	name string
	data []byte
	mode fs.FileMode
}

// writeCard makes dir holding files plus card.json and state.json.
func writeCard(dir string, m *manifest, files []file) error {
	mb, err := encodeJSON(m)
	if err != nil {
		return fmt.Errorf("store: encode manifest: %w", err)
	}
	sb, err := encodeJSON(state{Version: formatVersion, TriesLeft: m.PIN.MaxTries})
	if err != nil {
		return fmt.Errorf("store: encode state: %w", err)
	}
	files = append(files, file{ManifestFile, mb, secretMode}, file{StateFile, sb, secretMode})
	return buildDir(dir, func(tmp string) error {
		for _, f := range files {
			if err := writeNew(tmp, f.name, f.data, f.mode); err != nil {
				return fmt.Errorf("store: write %s: %w", f.name, err)
			}
		}
		return nil
	})
}

// buildDir makes dir by running fill on a temporary sibling directory
// (0700) and renaming it into place, so a crash never leaves a
// half-written card under dir.
func buildDir(dir string, fill func(tmp string) error) error {
	if err := checkNew(dir); err != nil {
		return err
	}
	parent := filepath.Dir(filepath.Clean(dir))
	// New parents are private too: ~/cards holds only cards.
	if err := os.MkdirAll(parent, dirMode); err != nil {
		return fmt.Errorf("store: make %s: %w", parent, err)
	}
	// MkdirTemp creates the directory 0700.
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(dir)+".new-*")
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	if err := fill(tmp); err != nil {
		return err
	}
	if err := syncDir(tmp); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	// Renaming onto an existing empty directory would succeed on Linux;
	// re-check to narrow that window (a racing creator is not expected).
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("store: card directory %s already exists; choose another DIR or remove it", dir)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	ok = true
	if err := syncDir(parent); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}

// checkNew refuses an existing dir: a card is never overwritten (its keys
// may be enrolled somewhere), and there is no --force; remove it by hand.
func checkNew(dir string) error {
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("store: card directory %s already exists; choose another DIR or remove it", dir)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}

func randomID(rnd io.Reader) (string, error) {
	id := make([]byte, 16)
	if _, err := io.ReadFull(rnd, id); err != nil {
		return "", fmt.Errorf("store: card ID: %w", err)
	}
	return hex.EncodeToString(id), nil
}

func randReader(r io.Reader) io.Reader {
	if r == nil {
		return rand.Reader
	}
	return r
}
