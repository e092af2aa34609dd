package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vscard/vscard/internal/emuopts"
	"github.com/vscard/vscard/token"
	"github.com/vscard/vscard/token/nss"
	"github.com/vscard/vscard/token/store"
)

// errTokens is for libcacard's mapping of hardware PKCS#11 tokens into
// emulated CAC cards (use_hw=yes/removable with hw_type=CAC, nssemul):
// vscard forwards physical cards as they are (passthru) or serves
// certificates from a card store or an NSS database, and does not rebuild a
// CAC card out of another token. Messages name the option so the user
// knows which part of the command line is the problem.
var errTokens = errors.New("mirroring hardware PKCS#11 tokens as emulated CAC cards is out of scope for vscard's vscclient; " +
	"to forward a physical card use -e passthru (use_hw=yes hw_type=PASSTHRU), and to serve certificates use " +
	"-e 'db=\"DIR\" use_hw=no soft=(,Reader,CAC,,id-cert,signing-cert,encryption-cert)' with a vscard card store or an NSS database DIR")

// errPassthru tells selectCard's caller to forward the first PC/SC reader
// instead of serving a soft card.
var errPassthru = errors.New("passthru")

// softCard is what the -e options select: one reader with a card made from
// a card store or an NSS database.
type softCard struct {
	reader string
	dir    string
	tok    token.Token
	labels []string  // labels of the selected credentials, in card order
	closer io.Closer // the NSS database, nil for a card store
}

// selectCard checks the parsed options against what this vscclient can
// serve and opens the card store or NSS database.
func selectCard(o *emuopts.Options, log *slog.Logger) (*softCard, error) {
	if o.UseHW == emuopts.HWYes && o.HWType == emuopts.TypePassthru {
		if len(o.Soft) > 0 {
			// libcacard: passthru is incompatible with soft cards.
			return nil, errors.New("passthru (use_hw=yes hw_type=PASSTHRU) forwards a physical card; it does not go with soft=(...)")
		}
		return nil, errPassthru
	}
	if o.UseHWGiven && o.UseHW != emuopts.HWNo {
		return nil, fmt.Errorf("use_hw=%s hw_type=%s: %w", o.UseHW, o.HWType, errTokens)
	}
	if len(o.Soft) == 0 {
		return nil, fmt.Errorf("no soft=(...) card given (libcacard's default use_hw=yes maps hardware PKCS#11 tokens): %w", errTokens)
	}
	if len(o.Soft) > 1 {
		// QEMU's passthru answers every ReaderAdd with reader 0, so only one
		// reader per connection can work (protocols.md §2.5).
		log.Warn("only the first soft=(...) reader is served: QEMU's ccid-card-passthru has one reader", "ignored", len(o.Soft)-1)
	}
	sc := o.Soft[0]
	if sc.Type != emuopts.TypeCAC {
		return nil, fmt.Errorf("soft=(...,%s,...): a soft card is a CAC card; to forward a physical card use -e passthru without soft=(...)", sc.Type)
	}
	if isNSSDB(o.DB) {
		return openNSS(o.DB, sc, log)
	}
	dir := strings.TrimPrefix(o.DB, "sql:")
	if err := checkStore(dir); err != nil {
		return nil, err
	}
	st, err := store.OpenWith(dir, store.OpenOptions{Logger: log})
	if err != nil {
		return nil, err
	}
	for _, w := range st.Warnings() {
		log.Warn(w, "card", dir)
	}
	creds, err := pickCredentials(st.Credentials(), sc.Certs)
	if err != nil {
		return nil, fmt.Errorf("db %q: %w", dir, err)
	}
	labels := make([]string, len(creds))
	for i, c := range creds {
		labels[i] = c.Label
	}
	return &softCard{reader: sc.Reader, dir: dir, tok: &selected{creds: creds, pin: st.PIN()}, labels: labels}, nil
}

// nssFiles are the files of an NSS database directory: sql (cert9, key4)
// and the old dbm format (cert8, key3), which token/nss refuses with a
// "convert with certutil" message.
var nssFiles = []string{"cert9.db", "key4.db", "cert8.db", "key3.db"}

// isNSSDB tells an NSS database (what libcacard's db= names: "sql:DIR",
// "dbm:DIR" or a plain DIR) from a vscard card store. A card store wins
// when a directory somehow holds both.
func isNSSDB(db string) bool {
	if strings.HasPrefix(db, "dbm:") {
		return true
	}
	dir := strings.TrimPrefix(db, "sql:")
	if _, err := os.Stat(filepath.Join(dir, store.ManifestFile)); err == nil {
		return false
	}
	for _, f := range nssFiles {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return true
		}
	}
	return false
}

// openNSS opens an NSS database read-only with token/nss and makes the
// card from the certificates soft=(...) or -c name, in that order, as
// libcacard does (cac.md §6). The database password is the card PIN; with
// an empty password any PIN works and token/nss logs that the keys are
// effectively unprotected (peers.md §6.2).
func openNSS(path string, sc emuopts.Soft, log *slog.Logger) (*softCard, error) {
	var names []string
	seen := make(map[string]bool)
	for _, n := range sc.Certs {
		// vscclient's -c leaves an empty name at the end (protocols.md §2.1).
		if n == "" {
			continue
		}
		if seen[n] {
			return nil, fmt.Errorf("db %q: certificate %q named twice; name each certificate once", path, n)
		}
		seen[n] = true
		names = append(names, n)
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("db %q: no certificate nicknames given in soft=(...) or -c", path)
	}
	db, err := nss.Open(path, &nss.Options{Logger: log})
	if err != nil {
		return nil, fmt.Errorf("db %q: %w", path, err)
	}
	tok, err := db.Token(names)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("db %q: %w", path, err)
	}
	creds := tok.Credentials()
	labels := make([]string, len(creds))
	for i, c := range creds {
		labels[i] = c.Label
	}
	return &softCard{reader: sc.Reader, dir: path, tok: tok, labels: labels, closer: db}, nil
}

// checkStore tells a card store from nothing.
func checkStore(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, store.ManifestFile)); err == nil {
		return nil
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return fmt.Errorf("db %q: no such directory; give an NSS database (certutil -N -d sql:DIR) or a card store made by 'vscard card new DIR'", dir)
	}
	return fmt.Errorf("db %q is neither an NSS database (no cert9.db) nor a vscard card store (no %s); make one with 'certutil -N -d sql:DIR' or 'vscard card new DIR'", dir, store.ManifestFile)
}

// roleAliases maps the certificate nicknames used with libcacard (QEMU's
// docs: id-cert, signing-cert, encryption-cert; short forms) to the position
// of the credential in a card store: 'vscard card new' stores identity,
// signing and encryption in that order, labelled id, signing, encryption.
var roleAliases = map[string]int{
	"id": 0, "id-cert": 0, "identity": 0, "identity-cert": 0,
	"sign": 1, "signing": 1, "signing-cert": 1, "signature": 1,
	"enc": 2, "encryption": 2, "encryption-cert": 2, "encrypt": 2,
}

// pickCredentials selects and orders the store's credentials by the
// certificate names of soft=(...) or -c. A name matches, in this order:
// a store label exactly (id, signing, encryption for 'vscard card new';
// cert1, cert2, ... for 'vscard card import'); a libcacard-style nickname of
// roleAliases; certN, the N-th credential (libcacard's tests use cert1..3).
// Empty names are skipped, as vscclient's -c leaves one at the end
// (protocols.md §2.1). Unlike libcacard, which skips unknown nicknames
// silently, an unknown name is an error listing the labels there are.
func pickCredentials(all []token.Credential, names []string) ([]token.Credential, error) {
	var out []token.Credential
	used := make(map[int]string)
	for _, name := range names {
		if name == "" {
			continue
		}
		i := findCredential(all, name)
		if i < 0 {
			labels := make([]string, len(all))
			for j, c := range all {
				labels[j] = c.Label
			}
			return nil, fmt.Errorf("no certificate %q; the card has %s (also accepted: id-cert, signing-cert, encryption-cert, cert1..cert%d)",
				name, strings.Join(labels, ", "), len(all))
		}
		if prev, ok := used[i]; ok {
			return nil, fmt.Errorf("certificate %q is the same as %q; name each certificate once", name, prev)
		}
		used[i] = name
		out = append(out, all[i])
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate names given in soft=(...) or -c")
	}
	return out, nil
}

func findCredential(all []token.Credential, name string) int {
	for i, c := range all {
		if strings.EqualFold(c.Label, name) {
			return i
		}
	}
	if i, ok := roleAliases[strings.ToLower(name)]; ok && i < len(all) {
		return i
	}
	if n, ok := strings.CutPrefix(strings.ToLower(name), "cert"); ok {
		if k, err := strconv.Atoi(n); err == nil && k >= 1 && k <= len(all) {
			return k - 1
		}
	}
	return -1
}

// selected is the card store's token with a chosen subset of credentials;
// it shares the store's PIN and its retry counter.
type selected struct {
	creds []token.Credential
	pin   token.PIN
}

func (s *selected) Credentials() []token.Credential { return s.creds }
func (s *selected) PIN() token.PIN                  { return s.pin }
