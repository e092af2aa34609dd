package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vscard/vscard/internal/emuopts"
	"github.com/vscard/vscard/token"
	"github.com/vscard/vscard/token/store"
)

// Errors for the sources of cards that later issues add. They name the
// option so the user knows which part of the command line is the problem.
var (
	errNSS      = errors.New("NSS databases are not supported yet (issue 4); make a vscard card store with 'vscard card new DIR' or 'vscard card import' and pass db=\"DIR\"")
	errHardware = errors.New("physical cards are not supported yet (issue 5)")
)

// softCard is what the -e options select: one reader with a card made from
// a card store.
type softCard struct {
	reader string
	dir    string
	tok    token.Token
	labels []string // labels of the selected credentials, in card order
}

// selectCard checks the parsed options against what this vscclient can
// serve and opens the card store.
func selectCard(o *emuopts.Options, log *slog.Logger) (*softCard, error) {
	if o.HWType == emuopts.TypePassthru {
		return nil, fmt.Errorf("passthru / hw_type=PASSTHRU: %w", errHardware)
	}
	if o.UseHWGiven && o.UseHW != emuopts.HWNo {
		return nil, fmt.Errorf("use_hw=%s: %w; use use_hw=no with soft=(...)", o.UseHW, errHardware)
	}
	if len(o.Soft) == 0 {
		return nil, fmt.Errorf("no soft=(...) card given, and mapping hardware tokens (libcacard's default use_hw=yes) is not supported yet (issue 5); "+
			"use -e 'db=\"DIR\" use_hw=no soft=(,Reader,CAC,,id,signing,encryption)' with a card store DIR: %w", errHardware)
	}
	if len(o.Soft) > 1 {
		// QEMU's passthru answers every ReaderAdd with reader 0, so only one
		// reader per connection can work (protocols.md §2.5).
		log.Warn("only the first soft=(...) reader is served: QEMU's ccid-card-passthru has one reader", "ignored", len(o.Soft)-1)
	}
	sc := o.Soft[0]
	if sc.Type != emuopts.TypeCAC {
		return nil, fmt.Errorf("soft=(...,%s,...): %w", sc.Type, errHardware)
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

// checkStore tells a card store from an NSS database and from nothing.
func checkStore(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, store.ManifestFile)); err == nil {
		return nil
	}
	for _, f := range []string{"cert9.db", "key4.db", "cert8.db", "key3.db"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("db %q holds %s: %w", dir, f, errNSS)
		}
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return fmt.Errorf("db %q: no such directory; give a card store made by 'vscard card new DIR'", dir)
	}
	return fmt.Errorf("db %q is not a vscard card store (no %s); make one with 'vscard card new DIR'", dir, store.ManifestFile)
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
