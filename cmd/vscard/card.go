package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/vscard/vscard/internal/secret"
	"github.com/vscard/vscard/token"
	"github.com/vscard/vscard/token/nss"
	"github.com/vscard/vscard/token/pkcs12"
	"github.com/vscard/vscard/token/store"
)

const cardUsage = `usage: vscard card new DIR [--cn NAME] [--pin PIN] [--key rsa2048|rsa3072|rsa1024] [--pin-tries N]
       vscard card new DIR --type piv [--key rsa2048|rsa3072|p256|p384] [--cn NAME] [--pin PIN] [--puk PUK]
                          [--mgm-key HEX [--mgm-alg 3des|aes128|aes192|aes256]] [--pin-tries N] [--puk-tries N]
       vscard card import DIR (--cert FILE --key FILE | --pem FILE | --p12 FILE)... [--nss DB --certs NICKS]
                          [--password-file FILE] [--ca FILE] [--pin PIN | --pin-file FILE] [--pin-tries N]
       vscard card import DIR --type piv (--slot REF=FILE[,FILE...])... [--ca FILE] [--password-file FILE]
                          [--pin PIN | --pin-file FILE] [--puk PUK] [--mgm-key HEX [--mgm-alg ALG]]
       vscard card show DIR
       vscard card export-ca DIR [--out FILE] [--der]

PIN "-" reads the PIN from the first line of standard input (keeps it out of
the shell history and the process list).`

// runCard dispatches "vscard card SUBCOMMAND".
func runCard(ctx context.Context, env *environ, args []string) error {
	if len(args) == 0 {
		fmt.Fprintln(env.stderr, cardUsage)
		return fmt.Errorf("%w: missing subcommand (new, import, show or export-ca)", errUsage)
	}
	switch args[0] {
	case "new":
		return runCardNew(ctx, env, args[1:])
	case "import":
		return runCardImport(ctx, env, args[1:])
	case "show":
		return runCardShow(ctx, env, args[1:])
	case "export-ca":
		return runCardExportCA(ctx, env, args[1:])
	case "-h", "-help", "--help", "help":
		fmt.Fprintln(env.stdout, cardUsage)
		return flag.ErrHelp
	}
	fmt.Fprintln(env.stderr, cardUsage)
	return fmt.Errorf("%w: unknown subcommand %q (want new, import, show or export-ca)", errUsage, args[0])
}

// parseInterspersed parses flags that may come before or after the
// positional arguments: users type "vscard card new ~/cards/john --cn X",
// and flag.Parse stops at the first non-flag. Everything after "--" is
// positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		consumed := len(args) - len(rest)
		if consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

func newFlagSet(env *environ, name, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	fs.Usage = func() {
		fmt.Fprintln(env.stderr, usage)
		fs.PrintDefaults()
	}
	return fs
}

// parseDir parses a card subcommand's flags, which may stand before or
// after the card directory, and returns the one directory given.
func parseDir(fs *flag.FlagSet, args []string) (string, error) {
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return "", usageErr(err)
	}
	switch len(pos) {
	case 0:
		return "", fmt.Errorf("%w: missing card directory DIR", errUsage)
	case 1:
		return pos[0], nil
	}
	return "", fmt.Errorf("%w: one card directory expected, got %q", errUsage, pos)
}

// usageErr turns a flag parse error into a usage error; -h stays ErrHelp.
func usageErr(err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	return fmt.Errorf("%w: %v", errUsage, err)
}

// readPIN returns pin, or the first line of stdin for "-".
func readPIN(env *environ, pin string) (string, error) {
	if pin != "-" {
		return pin, nil
	}
	line, err := bufio.NewReader(io.LimitReader(env.stdin, 256)).ReadString('\n')
	if err != nil && !(errors.Is(err, io.EOF) && line != "") {
		return "", fmt.Errorf("read PIN from standard input: %w", err)
	}
	return strings.TrimRight(line, "\r\n"), nil
}

// checkPINFlag makes a bad --pin a usage error (exit 2), with the store's
// wording.
func checkPINFlag(pin string) error {
	if pin == "" {
		return nil
	}
	if err := store.CheckPIN(pin); err != nil {
		return fmt.Errorf("%w: --pin: %v", errUsage, strings.TrimPrefix(err.Error(), "store: "))
	}
	return nil
}

func runCardNew(_ context.Context, env *environ, args []string) error {
	fs := newFlagSet(env, "card new", "usage: vscard card new DIR [flags]\n\nMakes a CAC card: a CA and identity, signing and encryption certificates.\nWith --type piv, a PIV card: a CA and certificates for 9A, 9C, 9D and 9E.\n\nflags:")
	typ := fs.String("type", store.TypeCAC, "card type: cac or piv")
	cn := fs.String("cn", "John Doe", "holder's common name")
	pin := fs.String("pin", "", "user PIN, 4-8 characters (default: generate 8 digits and print them once; \"-\" reads stdin)")
	key := fs.String("key", "rsa2048", "key type: "+strings.Join(store.KeyTypes(), ", ")+"; PIV: "+strings.Join(store.PIVKeyTypes(), ", "))
	tries := fs.Int("pin-tries", 3, "wrong PINs allowed before the PIN blocks (1-15)")
	pf := addPIVFlags(fs)
	dir, err := parseDir(fs, args)
	if err != nil {
		return err
	}
	if err := checkType(fs, *typ); err != nil {
		return err
	}
	if *pin, err = readPIN(env, *pin); err != nil {
		return err
	}
	if err := checkPINFlag(*pin); err != nil {
		return err
	}
	if *tries < 1 || *tries > 15 {
		return fmt.Errorf("%w: --pin-tries must be 1 to 15, not %d", errUsage, *tries)
	}
	if *typ == store.TypePIV {
		return runCardNewPIV(env, fs, dir, *cn, *pin, *key, *tries, pf)
	}
	if !validKey(*key) {
		return fmt.Errorf("%w: --key %q: use one of %s", errUsage, *key, strings.Join(store.KeyTypes(), ", "))
	}
	c, err := store.Create(dir, store.Options{CN: *cn, PIN: *pin, KeyType: *key, MaxTries: *tries})
	if err != nil {
		return err
	}
	w := env.stdout
	fmt.Fprintf(w, "Created CAC card in %s\n", c.Dir())
	printCredsShort(w, c)
	printCAFiles(w, c)
	if p := c.GeneratedPIN(); p != "" {
		fmt.Fprintf(w, "PIN: %s (shown once; it is stored only as a hash)\n", p)
	} else {
		fmt.Fprintln(w, "PIN: as given (stored only as a hash)")
	}
	fmt.Fprintf(w, "PIN tries: %d\n", c.Info().MaxTries)
	fmt.Fprintf(w, "\nServe it with: vscard serve --card %s --vpcd 127.0.0.1:35963\n", c.Dir())
	return nil
}

func validKey(k string) bool { return slices.Contains(store.KeyTypes(), k) }

// checkType accepts --type cac or piv, and refuses PIV-only flags on a
// CAC card.
func checkType(fs *flag.FlagSet, typ string) error {
	switch typ {
	case store.TypePIV:
		return nil
	case store.TypeCAC:
		if set := pivOnly(fs, pivFlagNames...); len(set) > 0 {
			return fmt.Errorf("%w: %s: only for PIV cards (add --type piv)", errUsage, strings.Join(set, ", "))
		}
		return nil
	}
	return fmt.Errorf("%w: --type %q: want cac or piv", errUsage, typ)
}

// inputFile is one --cert, --key, --pem or --p12 argument.
type inputFile struct {
	path          string
	asCert, asKey bool
	p12           bool
}

// inputFlag is a repeatable flag appending to a list shared by --cert,
// --key, --pem and --p12, so certificates keep their command-line order
// whichever flag brought them.
type inputFlag struct {
	list          *[]inputFile
	asCert, asKey bool
	p12           bool
}

func (f inputFlag) String() string { return "" }
func (f inputFlag) Set(v string) error {
	*f.list = append(*f.list, inputFile{v, f.asCert, f.asKey, f.p12})
	return nil
}

// Environment variables for the secrets of card import (see
// internal/secret for the order: file flag, then variable, then prompt).
const (
	envPassword = "VSCARD_PASSWORD"
	envPIN      = "VSCARD_PIN"
)

// terminalFor returns where to prompt for secrets: env.stdin itself when it
// can read secrets (tests inject one), else the process's terminal, or nil
// when stdin is not one.
func terminalFor(env *environ) secret.Terminal {
	if t, ok := env.stdin.(secret.Terminal); ok {
		return t
	}
	return secret.Stdin(env.stdin, env.stderr)
}

// readSmallFile reads a certificate, key or PKCS#12 file. They are small;
// 1 MiB bounds a wrong file.
func readSmallFile(f string) ([]byte, error) {
	fh, err := os.Open(f)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, 1<<20+1))
	if err != nil {
		return nil, err
	}
	if len(b) > 1<<20 {
		return nil, fmt.Errorf("%s: larger than 1 MiB; is it a certificate?", f)
	}
	return b, nil
}

// keyPEM encodes a private key as PKCS#8 PEM, the form store.Import
// reads.
func keyPEM(k crypto.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// hasKey reports whether one of keys is the private half of c.
func hasKey(c *x509.Certificate, keys []crypto.PrivateKey) bool {
	pub, ok := c.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok {
		return false
	}
	for _, k := range keys {
		if s, ok := k.(crypto.Signer); ok && pub.Equal(s.Public()) {
			return true
		}
	}
	return false
}

// importSources gathers what runCardImport feeds to store.Import.
type importSources struct {
	env     *environ
	pwFile  string
	opts    *store.ImportOptions
	chain   []*x509.Certificate // PKCS#12 certificates without their key
	tried   []string            // passwords that opened an earlier file
	pwGiven bool
}

func (s *importSources) passwordSource(what string) secret.Source {
	return secret.Source{What: what, File: s.pwFile, FileFlag: "--password-file", EnvVar: envPassword, Terminal: terminalFor(s.env)}
}

// addP12 decodes one PKCS#12 file. Without a password from file or
// environment it first tries the passwords that opened earlier files and
// the empty password (`openssl pkcs12 -export -passout pass:` makes
// those), and prompts only if they fail.
func (s *importSources) addP12(path string) error {
	data, err := readSmallFile(path)
	if err != nil {
		return err
	}
	src := s.passwordSource("PKCS#12 password for " + path)
	var b *pkcs12.Bundle
	if !src.Given() {
		for _, pw := range append([]string{""}, s.tried...) {
			if b, err = pkcs12.Decode(data, pw); !errors.Is(err, pkcs12.ErrWrongPassword) {
				break
			}
		}
	}
	if b == nil && (err == nil || errors.Is(err, pkcs12.ErrWrongPassword)) {
		pw, perr := src.Get()
		if perr != nil {
			return perr
		}
		if b, err = pkcs12.Decode(data, pw); err == nil {
			s.tried = append(s.tried, pw)
		}
	}
	if errors.Is(err, pkcs12.ErrWrongPassword) {
		return fmt.Errorf("wrong PKCS#12 password for %s", path)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if len(b.Keys) == 0 {
		return fmt.Errorf("%s: no private key in the PKCS#12 file", path)
	}
	for _, k := range b.Keys {
		kp, err := keyPEM(k)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		s.opts.Keys = append(s.opts.Keys, kp)
	}
	// The certificates with a key become credentials, in file order;
	// the others (the chain) are candidates for the CA.
	for _, c := range b.Certs {
		if hasKey(c, b.Keys) {
			s.opts.Certs = append(s.opts.Certs, certPEM(c))
		} else {
			s.chain = append(s.chain, c)
		}
	}
	return nil
}

// addNSS takes the certificates nicknames from an NSS database, with
// their keys decrypted by the database password.
func (s *importSources) addNSS(dir string, nicknames []string) error {
	db, err := nss.Open(dir, nil)
	if err != nil {
		return err
	}
	defer db.Close()
	tok, err := db.Token(nicknames)
	if err != nil {
		return err
	}
	var pw string
	if db.NeedsPassword() {
		if pw, err = s.passwordSource("NSS database password for " + dir).Get(); err != nil {
			return err
		}
	}
	if err := tok.Unlock([]byte(pw)); err != nil {
		if errors.Is(err, token.ErrPINIncorrect) {
			return fmt.Errorf("wrong NSS database password for %s", dir)
		}
		return err
	}
	keys, err := tok.PrivateKeys()
	if err != nil {
		return err
	}
	for i, cr := range tok.Credentials() {
		kp, err := keyPEM(keys[i])
		if err != nil {
			return fmt.Errorf("%s: %s: %w", dir, cr.Label, err)
		}
		s.opts.Certs = append(s.opts.Certs, certPEM(cr.Cert))
		s.opts.Keys = append(s.opts.Keys, kp)
	}
	return nil
}

// chainCA picks the CA from PKCS#12 chain certificates when --ca was not
// given: the one that issued the first credential, so `card export-ca`
// has something to export.
func chainCA(first []byte, chain []*x509.Certificate) *x509.Certificate {
	blk, _ := pem.Decode(first)
	if blk == nil {
		return nil
	}
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil
	}
	// Not CheckSignatureFrom: `certutil -S -x` (the QEMU recipe) makes a
	// CA without basicConstraints, which it would refuse.
	for _, c := range chain {
		if bytes.Equal(leaf.RawIssuer, c.RawSubject) && c.CheckSignature(leaf.SignatureAlgorithm, leaf.RawTBSCertificate, leaf.Signature) == nil {
			return c
		}
	}
	return nil
}

const importUsage = `usage: vscard card import DIR SOURCE... [flags]

Makes a card from existing certificates and keys. The certificates keep
their order (the first is the identity certificate); each gets the key
that matches it, so --key files may come in any order. Sources:

  --cert FILE --key FILE   PEM certificate and key (PKCS#1, PKCS#8 or SEC1)
  --pem FILE               PEM file holding certificate(s) and key(s)
  --p12 FILE               PKCS#12 file (openssl pkcs12 -export, NSS pk12util -o)
  --nss sql:DIR --certs NICK1,NICK2,...
                           certificates and keys from an NSS database

Passwords (PKCS#12, NSS database) come from --password-file FILE, else the
VSCARD_PASSWORD environment variable, else a prompt on the terminal. The
new card's PIN comes from --pin, --pin-file FILE, VSCARD_PIN or a prompt;
with none of them (and no terminal) a PIN is generated and printed once.

flags:`

func runCardImport(_ context.Context, env *environ, args []string) error {
	fs := newFlagSet(env, "card import", importUsage)
	var inputs []inputFile
	fs.Var(inputFlag{list: &inputs, asCert: true}, "cert", "PEM certificate file (repeatable)")
	fs.Var(inputFlag{list: &inputs, asKey: true}, "key", "PEM private key file: PKCS#1, PKCS#8 or SEC1 (repeatable)")
	fs.Var(inputFlag{list: &inputs, asCert: true, asKey: true}, "pem", "PEM file holding certificate(s) and key(s) (repeatable)")
	fs.Var(inputFlag{list: &inputs, p12: true}, "p12", "PKCS#12 file with a key and its certificate (repeatable)")
	nssDir := fs.String("nss", "", "NSS database (sql:DIR or DIR) to take --certs from")
	nicks := fs.String("certs", "", "comma-separated certificate nicknames in the --nss database, in card order")
	pwFile := fs.String("password-file", "", "file whose first line is the PKCS#12 / NSS database password")
	ca := fs.String("ca", "", "CA certificate file (PEM or DER), exported as ca.pem/ca.der (default: the issuer found in a --p12 chain)")
	pin := fs.String("pin", "", "user PIN, 4-8 characters (\"-\" reads stdin; see also --pin-file)")
	pinFile := fs.String("pin-file", "", "file whose first line is the new card's PIN")
	tries := fs.Int("pin-tries", 3, "wrong PINs allowed before the PIN blocks (1-15)")
	typ := fs.String("type", store.TypeCAC, "card type: cac or piv")
	var slots []slotArg
	fs.Var(slotFlag{&slots}, "slot", "PIV: REF=FILE[,FILE...]: key reference (9a, 9c, 9d, 9e, 82-95) and its PKCS#12 (.p12/.pfx) or PEM files (repeatable)")
	pf := addPIVFlags(fs)
	dir, err := parseDir(fs, args)
	if err != nil {
		return err
	}
	if err := checkType(fs, *typ); err != nil {
		return err
	}
	if *typ == store.TypePIV && (len(inputs) > 0 || *nssDir != "") {
		return fmt.Errorf("%w: a PIV card takes its certificates and keys with --slot REF=FILE[,FILE...], not --cert/--key/--pem/--p12/--nss", errUsage)
	}
	if (*nssDir == "") != (*nicks == "") {
		return fmt.Errorf("%w: --nss DB and --certs NICK1,NICK2,... go together", errUsage)
	}
	if *typ != store.TypePIV && *nssDir == "" && !slices.ContainsFunc(inputs, func(f inputFile) bool { return f.asCert || f.p12 }) {
		return fmt.Errorf("%w: give the certificates with --cert FILE --key FILE, --pem FILE, --p12 FILE or --nss DB --certs NICKS", errUsage)
	}
	if *pin != "" && *pinFile != "" {
		return fmt.Errorf("%w: give --pin or --pin-file, not both", errUsage)
	}
	if *pin, err = readPIN(env, *pin); err != nil {
		return err
	}
	if err := checkPINFlag(*pin); err != nil {
		return err
	}
	if *tries < 1 || *tries > 15 {
		return fmt.Errorf("%w: --pin-tries must be 1 to 15, not %d", errUsage, *tries)
	}
	// Fail before any password prompt if DIR is taken.
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("card directory %s already exists; choose another DIR or remove it", dir)
	}
	if *typ == store.TypePIV {
		return runCardImportPIV(env, fs, dir, slots, *pwFile, *ca, *pin, *pinFile, *tries, pf)
	}
	opts := store.ImportOptions{MaxTries: *tries}
	src := &importSources{env: env, pwFile: *pwFile, opts: &opts}
	// A --pem file goes in both lists: Import takes the certificates from
	// one and the keys from the other.
	for _, in := range inputs {
		if in.p12 {
			if err := src.addP12(in.path); err != nil {
				return err
			}
			continue
		}
		b, err := readSmallFile(in.path)
		if err != nil {
			return err
		}
		if in.asCert {
			opts.Certs = append(opts.Certs, b)
		}
		if in.asKey {
			opts.Keys = append(opts.Keys, b)
		}
	}
	if *nssDir != "" {
		var names []string
		for n := range strings.SplitSeq(*nicks, ",") {
			if n = strings.TrimSpace(n); n != "" {
				names = append(names, n)
			}
		}
		if err := src.addNSS(*nssDir, names); err != nil {
			return err
		}
	}
	var chainNote string
	if *ca != "" {
		if opts.CA, err = readSmallFile(*ca); err != nil {
			return err
		}
	} else if len(opts.Certs) > 0 {
		if c := chainCA(opts.Certs[0], src.chain); c != nil {
			opts.CA = c.Raw
			chainNote = "taken from the PKCS#12 chain: the issuer of the first certificate"
		}
	}
	if opts.PIN, err = resolveImportPIN(env, *pin, *pinFile); err != nil {
		return err
	}
	c, err := store.Import(dir, opts)
	if err != nil {
		return err
	}
	w := env.stdout
	fmt.Fprintf(w, "Imported card in %s\n", c.Dir())
	printCredsShort(w, c)
	printCAFiles(w, c)
	if chainNote != "" {
		fmt.Fprintf(w, "  (%s)\n", chainNote)
	}
	for _, warn := range c.Warnings() {
		fmt.Fprintf(w, "warning: %s\n", warn)
	}
	if p := c.GeneratedPIN(); p != "" {
		fmt.Fprintf(w, "PIN: %s (shown once; it is stored only as a hash)\n", p)
	} else {
		fmt.Fprintln(w, "PIN: as given (stored only as a hash)")
	}
	fmt.Fprintf(w, "PIN tries: %d\n", c.Info().MaxTries)
	return nil
}

// resolveImportPIN returns the new card's PIN: --pin, else --pin-file,
// VSCARD_PIN or a prompt; "" (none of them, or an empty answer) makes the
// store generate one.
func resolveImportPIN(env *environ, pin, pinFile string) (string, error) {
	if pin != "" {
		return pin, nil
	}
	psrc := secret.Source{What: "New card PIN (4-8 characters; empty generates one)", File: pinFile, FileFlag: "--pin-file", EnvVar: envPIN, Terminal: terminalFor(env), Confirm: true}
	p, err := psrc.Get()
	if err != nil && !errors.Is(err, secret.ErrNotGiven) {
		return "", err
	}
	if p != "" {
		if err := store.CheckPIN(p); err != nil {
			return "", fmt.Errorf("%w: PIN: %v", errUsage, strings.TrimPrefix(err.Error(), "store: "))
		}
	}
	return p, nil
}

func runCardExportCA(_ context.Context, env *environ, args []string) error {
	fs := newFlagSet(env, "card export-ca", "usage: vscard card export-ca DIR [--out FILE] [--der]\n\nWrites the card's CA certificate, for a guest's trust store.\n\nflags:")
	out := fs.String("out", "", "write to FILE instead of standard output")
	der := fs.Bool("der", false, "write DER instead of PEM")
	dir, err := parseDir(fs, args)
	if err != nil {
		return err
	}
	ca, err := cardCA(dir)
	if err != nil {
		return err
	}
	if ca == nil {
		return fmt.Errorf("card %s has no CA certificate (it was imported without --ca); re-import with --ca FILE", dir)
	}
	b := certPEM(ca)
	if *der {
		b = ca.Raw
	}
	if *out == "" {
		_, err := env.stdout.Write(b)
		return err
	}
	// A CA certificate is public: world-readable like ca.pem in the card.
	if err := os.WriteFile(*out, b, 0o644); err != nil {
		return fmt.Errorf("export CA: %w", err)
	}
	return nil
}

// cardCA returns the CA certificate stored with a card of either type.
func cardCA(dir string) (*x509.Certificate, error) {
	if t, err := store.Type(dir); err == nil && t == store.TypePIV {
		c, err := store.OpenPIV(dir, store.PIVOpenOptions{})
		if err != nil {
			return nil, err
		}
		return c.CA(), nil
	}
	c, err := store.Open(dir)
	if err != nil {
		return nil, err
	}
	return c.CA(), nil
}

func printCredsShort(w io.Writer, c *store.Card) {
	for i, cr := range c.Credentials() {
		fmt.Fprintf(w, "  %d. %-10s %s  serial %s  %s\n", i+1, cr.Label, cr.Cert.Subject, serialHex(cr.Cert), store.KeyDescription(cr.Cert.PublicKey))
	}
}

func printCAFiles(w io.Writer, c *store.Card) {
	ca := c.CA()
	if ca == nil {
		return
	}
	fmt.Fprintf(w, "CA: %s  serial %s\n", ca.Subject, serialHex(ca))
	for _, f := range c.CAFiles() {
		fmt.Fprintf(w, "  %s\n", f)
	}
}

func serialHex(c *x509.Certificate) string {
	return fmt.Sprintf("%x", c.SerialNumber)
}

func runCardShow(_ context.Context, env *environ, args []string) error {
	fs := newFlagSet(env, "card show", "usage: vscard card show DIR\n\nPrints a card's certificates and PIN state (PIV: slots, PIN and PUK state; never secrets).")
	dir, err := parseDir(fs, args)
	if err != nil {
		return err
	}
	if t, err := store.Type(dir); err == nil && t == store.TypePIV {
		return showPIV(env, dir)
	}
	c, err := store.Open(dir)
	if err != nil {
		return err
	}
	w := env.stdout
	info := c.Info()
	fmt.Fprintf(w, "Card: %s\n", c.Dir())
	fmt.Fprintf(w, "Type: %s (format %d)\n", strings.ToUpper(info.Type), info.Version)
	fmt.Fprintf(w, "Name: %s\n", info.CN)
	fmt.Fprintf(w, "Created: %s\n", info.Created.Format(time.RFC3339))
	if creds := c.Credentials(); len(creds) > 0 {
		fmt.Fprintf(w, "Serial: %s (as OpenSC shows it when vscard serve runs in default mode)\n", openSCSerial(creds[0].Cert))
	}
	left, max := c.PIN().TriesLeft()
	if left == 0 {
		fmt.Fprintf(w, "PIN: set, blocked (0 of %d tries left)\n", max)
	} else {
		fmt.Fprintf(w, "PIN: set, %d of %d tries left\n", left, max)
	}
	now := time.Now()
	fmt.Fprintln(w, "Certificates:")
	for i, cr := range c.Credentials() {
		fmt.Fprintf(w, "  %d. %s\n", i+1, cr.Label)
		printCert(w, cr.Cert, now)
	}
	if ca := c.CA(); ca != nil {
		fmt.Fprintln(w, "CA:")
		printCert(w, ca, now)
		fmt.Fprintf(w, "     files:    %s\n", strings.Join(c.CAFiles(), ", "))
	}
	for _, warn := range c.Warnings() {
		fmt.Fprintf(w, "warning: %s\n", warn)
	}
	return nil
}

// openSCSerial predicts the PKCS#11 token serial OpenSC shows for the
// card. card/cac (default mode) puts the first 14 bytes of SHA-256 over the
// first certificate into the CCC card ID, and OpenSC's serial is the last 8
// bytes of that ID in hex (cac.md §5.4: 000058bd002c19b5 for libcacard's
// constant ID). Checked against pkcs11-tool -L (OpenSC 0.23) on a served
// card. In --strict mode every card shows libcacard's constant instead.
func openSCSerial(first *x509.Certificate) string {
	sum := sha256.Sum256(first.Raw)
	return hex.EncodeToString(sum[6:14])
}

func printCert(w io.Writer, c *x509.Certificate, now time.Time) {
	fmt.Fprintf(w, "     subject:  %s\n", c.Subject)
	fmt.Fprintf(w, "     issuer:   %s\n", c.Issuer)
	fmt.Fprintf(w, "     serial:   %s\n", serialHex(c))
	fmt.Fprintf(w, "     key:      %s\n", store.KeyDescription(c.PublicKey))
	state := ""
	switch {
	case now.After(c.NotAfter):
		state = "  (EXPIRED)"
	case now.Before(c.NotBefore):
		state = "  (NOT YET VALID)"
	}
	fmt.Fprintf(w, "     valid:    %s to %s%s\n", c.NotBefore.UTC().Format(time.DateOnly), c.NotAfter.UTC().Format(time.DateOnly), state)
	if u := usageNames(c); u != "" {
		fmt.Fprintf(w, "     usage:    %s\n", u)
	}
}

func usageNames(c *x509.Certificate) string {
	var ku []string
	for _, b := range []struct {
		bit  x509.KeyUsage
		name string
	}{
		{x509.KeyUsageDigitalSignature, "digitalSignature"},
		{x509.KeyUsageContentCommitment, "nonRepudiation"},
		{x509.KeyUsageKeyEncipherment, "keyEncipherment"},
		{x509.KeyUsageDataEncipherment, "dataEncipherment"},
		{x509.KeyUsageKeyAgreement, "keyAgreement"},
		{x509.KeyUsageCertSign, "keyCertSign"},
		{x509.KeyUsageCRLSign, "cRLSign"},
	} {
		if c.KeyUsage&b.bit != 0 {
			ku = append(ku, b.name)
		}
	}
	var eku []string
	for _, e := range c.ExtKeyUsage {
		switch e {
		case x509.ExtKeyUsageClientAuth:
			eku = append(eku, "clientAuth")
		case x509.ExtKeyUsageServerAuth:
			eku = append(eku, "serverAuth")
		case x509.ExtKeyUsageEmailProtection:
			eku = append(eku, "emailProtection")
		case x509.ExtKeyUsageCodeSigning:
			eku = append(eku, "codeSigning")
		case x509.ExtKeyUsageAny:
			eku = append(eku, "any")
		default:
			eku = append(eku, fmt.Sprintf("eku(%d)", e))
		}
	}
	for _, o := range c.UnknownExtKeyUsage {
		if o.String() == "1.3.6.1.4.1.311.20.2.2" {
			eku = append(eku, "msSmartcardLogon")
		} else {
			eku = append(eku, o.String())
		}
	}
	s := strings.Join(ku, ", ")
	if len(eku) > 0 {
		if s != "" {
			s += "; "
		}
		s += strings.Join(eku, ", ")
	}
	return s
}
