package main

import (
	"fmt"
	"log/slog"
	"strings"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/card/cac"
	"github.com/vscard/vscard/card/piv"
	"github.com/vscard/vscard/token/store"
)

// openedCard is a card directory ready to serve, whichever its type.
type openedCard struct {
	card card.Card
	typ  string // store.TypeCAC or store.TypePIV
	desc string // the card line of "list"
	n    int    // certificates (CAC) or keys (PIV), for the log
}

// openCardDir opens a card directory of either type (store.Type reads the
// manifest) and returns the card that serves it: card/cac over a CAC
// store, card/piv over a PIV one. serve, connect and reader all use it.
// strict (libcacard's behaviour) applies to CAC cards only. Warnings
// about a card that loads but may not work are logged.
func openCardDir(dir string, strict bool, log *slog.Logger) (*openedCard, error) {
	typ, err := store.Type(dir)
	if err != nil {
		return nil, err
	}
	switch typ {
	case store.TypePIV:
		if strict {
			log.Warn("--strict applies to CAC cards; ignored for this PIV card", "card", dir)
		}
		st, err := store.OpenPIV(dir, store.PIVOpenOptions{Logger: log, NotFound: piv.ErrNotFound})
		if err != nil {
			return nil, err
		}
		c, err := piv.New(st, piv.Options{Logger: log})
		if err != nil {
			return nil, fmt.Errorf("card %s: %w", dir, err)
		}
		slots := st.Slots()
		names := make([]string, len(slots))
		for i, r := range slots {
			names[i] = fmt.Sprintf("%02x", r)
		}
		return &openedCard{card: c, typ: typ, n: len(slots),
			desc: fmt.Sprintf("%s (PIV, %d keys: %s)", dir, len(slots), strings.Join(names, ", "))}, nil
	default:
		tok, err := store.OpenWith(dir, store.OpenOptions{Logger: log})
		if err != nil {
			return nil, err
		}
		for _, w := range tok.Warnings() {
			log.Warn(w, "card", dir)
		}
		c, err := cac.New(tok, cac.Options{Strict: strict, Logger: log})
		if err != nil {
			return nil, fmt.Errorf("card %s: %w", dir, err)
		}
		return &openedCard{card: c, typ: typ, n: len(tok.Credentials()), desc: describeCard(dir, tok.Credentials())}, nil
	}
}
