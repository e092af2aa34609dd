package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/vscard/vscard/token/store"
)

const cardUsage = `usage: vscard card new DIR [--cn NAME] [--pin PIN] [--key rsa2048|rsa3072|rsa1024] [--pin-tries N]
       vscard card import DIR (--cert FILE --key FILE | --pem FILE)... [--ca FILE] [--pin PIN] [--pin-tries N]
       vscard card show DIR

PIN "-" reads the PIN from the first line of standard input (keeps it out of
the shell history and the process list).`

// runCard dispatches "vscard card SUBCOMMAND".
func runCard(ctx context.Context, env *environ, args []string) error {
	if len(args) == 0 {
		fmt.Fprintln(env.stderr, cardUsage)
		return fmt.Errorf("%w: missing subcommand (new, import or show)", errUsage)
	}
	switch args[0] {
	case "new":
		return runCardNew(ctx, env, args[1:])
	case "import":
		return runCardImport(ctx, env, args[1:])
	case "show":
		return runCardShow(ctx, env, args[1:])
	case "-h", "-help", "--help", "help":
		fmt.Fprintln(env.stdout, cardUsage)
		return flag.ErrHelp
	}
	fmt.Fprintln(env.stderr, cardUsage)
	return fmt.Errorf("%w: unknown subcommand %q (want new, import or show)", errUsage, args[0])
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

// oneDir checks for exactly one positional argument, the card directory.
func oneDir(pos []string) (string, error) {
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
	fs := newFlagSet(env, "card new", "usage: vscard card new DIR [flags]\n\nMakes a CAC card: a CA and identity, signing and encryption certificates.\n\nflags:")
	cn := fs.String("cn", "John Doe", "holder's common name")
	pin := fs.String("pin", "", "user PIN, 4-8 characters (default: generate 8 digits and print them once; \"-\" reads stdin)")
	key := fs.String("key", "rsa2048", "key type: "+strings.Join(store.KeyTypes(), ", "))
	tries := fs.Int("pin-tries", 3, "wrong PINs allowed before the PIN blocks (1-15)")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return usageErr(err)
	}
	dir, err := oneDir(pos)
	if err != nil {
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

// inputFile is one --cert, --key or --pem argument.
type inputFile struct {
	path          string
	asCert, asKey bool
}

// inputFlag is a repeatable flag appending to a list shared by --cert,
// --key and --pem, so certificates keep their command-line order whichever
// flag brought them.
type inputFlag struct {
	list          *[]inputFile
	asCert, asKey bool
}

func (f inputFlag) String() string { return "" }
func (f inputFlag) Set(v string) error {
	*f.list = append(*f.list, inputFile{v, f.asCert, f.asKey})
	return nil
}

func runCardImport(_ context.Context, env *environ, args []string) error {
	fs := newFlagSet(env, "card import", "usage: vscard card import DIR (--cert FILE --key FILE | --pem FILE)... [flags]\n\nMakes a card from PEM certificates and keys. The certificates keep their\norder (the first is the identity certificate); each gets the key that\nmatches it, so --key files may come in any order.\n\nflags:")
	var inputs []inputFile
	fs.Var(inputFlag{&inputs, true, false}, "cert", "PEM certificate file (repeatable)")
	fs.Var(inputFlag{&inputs, false, true}, "key", "PEM private key file: PKCS#1, PKCS#8 or SEC1 (repeatable)")
	fs.Var(inputFlag{&inputs, true, true}, "pem", "PEM file holding certificate(s) and key(s) (repeatable)")
	ca := fs.String("ca", "", "CA certificate file (PEM or DER), exported as ca.pem/ca.der")
	pin := fs.String("pin", "", "user PIN, 4-8 characters (default: generate and print once; \"-\" reads stdin)")
	tries := fs.Int("pin-tries", 3, "wrong PINs allowed before the PIN blocks (1-15)")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return usageErr(err)
	}
	dir, err := oneDir(pos)
	if err != nil {
		return err
	}
	if !slices.ContainsFunc(inputs, func(f inputFile) bool { return f.asCert }) {
		return fmt.Errorf("%w: give the certificates with --cert FILE --key FILE or --pem FILE", errUsage)
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
	opts := store.ImportOptions{PIN: *pin, MaxTries: *tries}
	read := func(f string) ([]byte, error) {
		// Certificates and keys are small; 1 MiB bounds a wrong file.
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
	// A --pem file goes in both lists: Import takes the certificates from
	// one and the keys from the other.
	for _, in := range inputs {
		b, err := read(in.path)
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
	if *ca != "" {
		if opts.CA, err = read(*ca); err != nil {
			return err
		}
	}
	c, err := store.Import(dir, opts)
	if err != nil {
		return err
	}
	w := env.stdout
	fmt.Fprintf(w, "Imported card in %s\n", c.Dir())
	printCredsShort(w, c)
	printCAFiles(w, c)
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
	fs := newFlagSet(env, "card show", "usage: vscard card show DIR\n\nPrints a card's certificates and PIN state.")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return usageErr(err)
	}
	dir, err := oneDir(pos)
	if err != nil {
		return err
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
