package main

import (
	"crypto/x509"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vscard/vscard/card/piv"
	"github.com/vscard/vscard/tlv"
	"github.com/vscard/vscard/token/store"
)

// pivFlags are the options only a PIV card has.
type pivFlags struct {
	puk      *string
	mgmKey   *string
	mgmAlg   *string
	pukTries *int
}

func addPIVFlags(fs *flag.FlagSet) *pivFlags {
	return &pivFlags{
		puk:      fs.String("puk", "", "PIV: PUK, 4-8 characters (default: generate 8 digits and print them once)"),
		mgmKey:   fs.String("mgm-key", "", "PIV: card management key (9B) in hex (default: a random key of --mgm-alg, printed once)"),
		mgmAlg:   fs.String("mgm-alg", "3des", "PIV: management key algorithm: 3des (what Debian 12's yubico-piv-tool 2.2.0 can use), aes128, aes192 or aes256"),
		pukTries: fs.Int("puk-tries", 3, "PIV: wrong PUKs allowed before the PUK blocks (1-15)"),
	}
}

// pivOnly names the PIV flags set on a command line, for the error when
// the card is a CAC card.
func pivOnly(fs *flag.FlagSet, names ...string) []string {
	var set []string
	fs.Visit(func(f *flag.Flag) {
		if slices.Contains(names, f.Name) {
			set = append(set, "--"+f.Name)
		}
	})
	return set
}

var pivFlagNames = []string{"puk", "mgm-key", "mgm-alg", "puk-tries", "slot"}

// mgmAlgs maps --mgm-alg names to PIV algorithm identifiers.
var mgmAlgs = map[string]byte{"3des": piv.AlgTDES, "aes128": piv.AlgAES128, "aes192": piv.AlgAES192, "aes256": piv.AlgAES256}

func mgmAlgName(alg byte) string {
	for n, a := range mgmAlgs {
		if a == alg {
			return strings.ToUpper(strings.Replace(n, "aes", "AES-", 1))
		}
	}
	return fmt.Sprintf("algorithm %02X", alg)
}

// options checks the PIV flags and fills the secrets of o.
func (p *pivFlags) options(fs *flag.FlagSet, o *store.PIVOptions) error {
	if *p.puk != "" {
		if err := store.CheckPIN(*p.puk); err != nil {
			return fmt.Errorf("%w: --puk: %v", errUsage, strings.TrimPrefix(strings.ReplaceAll(err.Error(), "PIN", "PUK"), "store: "))
		}
		o.PUK = *p.puk
	}
	if *p.pukTries < 1 || *p.pukTries > 15 {
		return fmt.Errorf("%w: --puk-tries must be 1 to 15, not %d", errUsage, *p.pukTries)
	}
	o.MaxPUKTries = *p.pukTries
	alg, ok := mgmAlgs[strings.ToLower(*p.mgmAlg)]
	if !ok {
		return fmt.Errorf("%w: --mgm-alg %q: use 3des, aes128, aes192 or aes256", errUsage, *p.mgmAlg)
	}
	// yubico-piv-tool before 2.3 (Debian 12 ships 2.2.0) authenticates
	// with 3DES only, hence the 3DES default; a generated key is random
	// and printed once, so it is as safe as the algorithm allows.
	o.MgmAlg = alg
	if *p.mgmKey == "" {
		return nil
	}
	key, err := hex.DecodeString(strings.NewReplacer(":", "", " ", "").Replace(*p.mgmKey))
	if err != nil {
		return fmt.Errorf("%w: --mgm-key: not hex: %v", errUsage, err)
	}
	if n, _ := store.MgmKeyLen(alg); n != len(key) {
		return fmt.Errorf("%w: --mgm-key is %d bytes; %s takes %d (%d hex digits)", errUsage, len(key), mgmAlgName(alg), n, 2*n)
	}
	o.MgmAlg, o.MgmKey = alg, key
	return nil
}

// personalize is store.PIVOptions.Personalize: piv.Personalize writes the
// CHUID, CCC, Discovery, Key History, Printed Information and the
// certificate objects.
func personalize(st *store.PIVCard, certs map[byte]*x509.Certificate) error {
	return piv.Personalize(st, piv.Personalization{Certs: certs})
}

func runCardNewPIV(env *environ, fs *flag.FlagSet, dir, cn, pin, key string, tries int, pf *pivFlags) error {
	if !slices.Contains(store.PIVKeyTypes(), key) {
		return fmt.Errorf("%w: --key %q: a PIV card takes %s", errUsage, key, strings.Join(store.PIVKeyTypes(), ", "))
	}
	o := store.PIVOptions{CN: cn, KeyType: key, PIN: pin, MaxPINTries: tries, Personalize: personalize}
	if err := pf.options(fs, &o); err != nil {
		return err
	}
	c, err := store.CreatePIV(dir, o)
	if err != nil {
		return err
	}
	w := env.stdout
	fmt.Fprintf(w, "Created PIV card in %s\n", c.Dir())
	printPIVSlotsShort(w, c)
	printCAFilesOf(w, c.CA(), c.CAFiles())
	printPIVSecrets(w, c)
	fmt.Fprintf(w, "\nServe it with: vscard serve --card %s --vpcd 127.0.0.1:35963\n", c.Dir())
	return nil
}

// printPIVSecrets shows generated secrets once; given ones are not echoed.
func printPIVSecrets(w io.Writer, c *store.PIVCard) {
	pin, puk, mgm := c.GeneratedSecrets()
	if pin != "" {
		fmt.Fprintf(w, "PIN: %s (shown once; it is stored only as a hash)\n", pin)
	} else {
		fmt.Fprintln(w, "PIN: as given (stored only as a hash)")
	}
	if puk != "" {
		fmt.Fprintf(w, "PUK: %s (shown once; it is stored only as a hash)\n", puk)
	} else {
		fmt.Fprintln(w, "PUK: as given (stored only as a hash)")
	}
	alg, _, _ := c.ManagementKey()
	if mgm != nil {
		fmt.Fprintf(w, "Management key (%s): %X (shown once; card management tools need it, e.g. yubico-piv-tool -k)\n", mgmAlgName(alg), mgm)
	} else {
		fmt.Fprintf(w, "Management key (%s): as given\n", mgmAlgName(alg))
	}
	pl, pm := c.PIN().TriesLeft()
	ul, um := c.PUK().TriesLeft()
	fmt.Fprintf(w, "PIN tries: %d of %d, PUK tries: %d of %d\n", pl, pm, ul, um)
}

// pivSlotNames are SP 800-73-4's names of the key references.
var pivSlotNames = map[byte]string{
	piv.KeyAuthentication:     "PIV Authentication",
	piv.KeySignature:          "Digital Signature",
	piv.KeyManagement:         "Key Management",
	piv.KeyCardAuthentication: "Card Authentication",
}

func pivSlotName(ref byte) string {
	if n, ok := pivSlotNames[ref]; ok {
		return n
	}
	return fmt.Sprintf("Retired Key Management %d", ref-0x81)
}

// pivCert returns the certificate in ref's object, nil if there is none.
func pivCert(c *store.PIVCard, ref byte) (*x509.Certificate, error) {
	tag, ok := piv.CertTag(ref)
	if !ok {
		return nil, nil
	}
	v, err := c.Object(tag)
	if errors.Is(err, piv.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	der, ok := tlv.FindBER(v, 0x70)
	if !ok {
		return nil, fmt.Errorf("certificate object %06X has no certificate (70)", tag)
	}
	// A compressed certificate (71 01) is what some issuers write; the
	// card never does, and show only describes it.
	if info, ok := tlv.FindBER(v, 0x71); ok && len(info) == 1 && info[0]&1 != 0 {
		return nil, fmt.Errorf("certificate object %06X is compressed", tag)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("certificate object %06X: %w", tag, err)
	}
	return cert, nil
}

// pivSlotRefs lists the references with a key or a certificate.
func pivSlotRefs(c *store.PIVCard) []byte {
	keys := c.Slots()
	var refs []byte
	for _, r := range store.PIVKeyRefs() {
		tag, _ := piv.CertTag(r)
		_, err := c.Object(tag)
		if slices.Contains(keys, r) || err == nil {
			refs = append(refs, r)
		}
	}
	return refs
}

func printPIVSlotsShort(w io.Writer, c *store.PIVCard) {
	for _, r := range pivSlotRefs(c) {
		cert, err := pivCert(c, r)
		desc := "no certificate"
		switch {
		case err != nil:
			desc = err.Error()
		case cert != nil:
			desc = fmt.Sprintf("%s  serial %s  %s", cert.Subject, serialHex(cert), store.KeyDescription(cert.PublicKey))
		}
		fmt.Fprintf(w, "  %02X %-20s %s\n", r, pivSlotName(r), desc)
	}
}

func printCAFilesOf(w io.Writer, ca *x509.Certificate, files []string) {
	if ca == nil {
		return
	}
	fmt.Fprintf(w, "CA: %s  serial %s\n", ca.Subject, serialHex(ca))
	for _, f := range files {
		fmt.Fprintf(w, "  %s\n", f)
	}
}

func showPIV(env *environ, dir string) error {
	c, err := store.OpenPIV(dir, store.PIVOpenOptions{NotFound: piv.ErrNotFound})
	if err != nil {
		return err
	}
	w := env.stdout
	info := c.Info()
	fmt.Fprintf(w, "Card: %s\n", c.Dir())
	fmt.Fprintf(w, "Type: PIV (format %d)\n", info.Version)
	fmt.Fprintf(w, "Name: %s\n", info.CN)
	fmt.Fprintf(w, "Created: %s\n", info.Created.Format(time.RFC3339))
	for _, p := range []struct {
		name string
		left func() (int, int)
	}{{"PIN", c.PIN().TriesLeft}, {"PUK", c.PUK().TriesLeft}} {
		left, max := p.left()
		if left == 0 {
			fmt.Fprintf(w, "%s: set, blocked (0 of %d tries left)\n", p.name, max)
		} else {
			fmt.Fprintf(w, "%s: set, %d of %d tries left\n", p.name, left, max)
		}
	}
	alg, _, err := c.ManagementKey()
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "Management key: %s (value not shown; it is in %s)\n", mgmAlgName(alg), filepath.Join(dir, store.MgmFile))
	now := time.Now()
	fmt.Fprintln(w, "Slots:")
	keys := c.Slots()
	for _, r := range pivSlotRefs(c) {
		fmt.Fprintf(w, "  %02X %s\n", r, pivSlotName(r))
		if slices.Contains(keys, r) {
			k, err := c.Key(r)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "     private key: %s\n", store.KeyDescription(k.Public()))
		} else {
			fmt.Fprintln(w, "     private key: none")
		}
		cert, err := pivCert(c, r)
		switch {
		case err != nil:
			fmt.Fprintf(w, "     certificate: %v\n", err)
		case cert == nil:
			fmt.Fprintln(w, "     certificate: none")
		default:
			printCert(w, cert, now)
		}
	}
	tags, err := c.Objects()
	if err != nil {
		return err
	}
	names := make([]string, len(tags))
	for i, t := range tags {
		names[i] = strconv.FormatUint(uint64(t), 16)
	}
	fmt.Fprintf(w, "Data objects: %s\n", strings.ToUpper(strings.Join(names, " ")))
	if ca := c.CA(); ca != nil {
		fmt.Fprintln(w, "CA:")
		printCert(w, ca, now)
		fmt.Fprintf(w, "     files:    %s\n", strings.Join(c.CAFiles(), ", "))
	}
	return nil
}

// slotFlag is a repeatable --slot REF=FILE[,FILE...].
type slotFlag struct{ list *[]slotArg }

type slotArg struct {
	ref   byte
	files []string
}

func (f slotFlag) String() string { return "" }
func (f slotFlag) Set(v string) error {
	r, files, ok := strings.Cut(v, "=")
	if !ok || files == "" {
		return fmt.Errorf("want REF=FILE[,FILE...], e.g. 9a=id.p12 or 9c=cert.pem,key.pem")
	}
	ref, err := strconv.ParseUint(strings.TrimPrefix(strings.ToLower(r), "0x"), 16, 8)
	if err != nil || !slices.Contains(store.PIVKeyRefs(), byte(ref)) {
		return fmt.Errorf("slot %q: want 9a, 9c, 9d, 9e or 82-95", r)
	}
	a := slotArg{ref: byte(ref)}
	for f := range strings.SplitSeq(files, ",") {
		if f != "" {
			a.files = append(a.files, f)
		}
	}
	*f.list = append(*f.list, a)
	return nil
}

// isP12 tells a PKCS#12 file by its name, as openssl and browsers name
// them.
func isP12(path string) bool {
	ext := strings.ToLower(filepath.Ext(path))
	return ext == ".p12" || ext == ".pfx"
}

// runCardImportPIV makes a PIV card from --slot inputs: PKCS#12 files
// through the same password handling as a CAC import, PEM files
// (certificate, chain, key in any mix) as they are.
func runCardImportPIV(env *environ, fs *flag.FlagSet, dir string, slots []slotArg, pwFile, caFile, pin, pinFile string, tries int, pf *pivFlags) error {
	if len(slots) == 0 {
		return fmt.Errorf("%w: give the slots with --slot REF=FILE[,FILE...] (e.g. --slot 9a=id.p12 --slot 9c=cert.pem,key.pem)", errUsage)
	}
	o := store.PIVOptions{MaxPINTries: tries, Personalize: personalize}
	if err := pf.options(fs, &o); err != nil {
		return err
	}
	src := &importSources{env: env, pwFile: pwFile}
	var in []store.PIVSlot
	for _, s := range slots {
		var opts store.ImportOptions
		src.opts = &opts
		for _, f := range s.files {
			if isP12(f) {
				if err := src.addP12(f); err != nil {
					return err
				}
				continue
			}
			b, err := readSmallFile(f)
			if err != nil {
				return err
			}
			opts.Certs, opts.Keys = append(opts.Certs, b), append(opts.Keys, b)
		}
		in = append(in, store.PIVSlot{Ref: s.ref, Certs: opts.Certs, KeyPEM: opts.Keys})
	}
	var chainNote string
	if caFile != "" {
		b, err := readSmallFile(caFile)
		if err != nil {
			return err
		}
		o.CA = b
	} else {
	slots:
		for _, s := range in {
			for _, cert := range s.Certs {
				if c := chainCA(cert, src.chain); c != nil {
					o.CA = c.Raw
					chainNote = fmt.Sprintf("taken from the PKCS#12 chain: the issuer of slot %02X's certificate", s.Ref)
					break slots
				}
			}
		}
	}
	p, err := resolveImportPIN(env, pin, pinFile)
	if err != nil {
		return err
	}
	o.PIN = p
	c, err := store.ImportPIV(dir, in, o)
	if err != nil {
		return err
	}
	w := env.stdout
	fmt.Fprintf(w, "Imported PIV card in %s\n", c.Dir())
	printPIVSlotsShort(w, c)
	printCAFilesOf(w, c.CA(), c.CAFiles())
	if chainNote != "" {
		fmt.Fprintf(w, "  (%s)\n", chainNote)
	}
	printPIVSecrets(w, c)
	return nil
}
