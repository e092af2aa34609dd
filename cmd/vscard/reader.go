package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/vscard/vscard/internal/ctl"
)

const readerUsage = `usage: vscard reader [--usbredir TARGET [--listen]] [--usbip HOST:PORT [--busid ID]] [flags] SOURCE...

Runs vscard's own USB smart card reader (CCID, as stock libccid drives it)
and exports it to a QEMU guest over usbredir, to any Linux machine over
USB/IP, or both. The reader has one slot per SOURCE flag, in command-line
order (slot 0 is the first):

  --card DIR                 a vscard card made by 'vscard card new' or
                             'vscard card import' (as 'vscard serve')
  --nss DB --certs NICKS     certificates of an NSS database, served as a
                             CAC card (as 'vscard connect --nss'); --certs
                             belongs to the --nss before it
  --pcsc READER              the physical card in a host PC/SC reader,
                             forwarded through pcscd (READER: exact name or
                             a unique part of one; "" for the first
                             reader). A card or reader plugged in or out
                             shows up in the slot likewise. Its ATR is
                             forwarded unchanged (this reader does T=1).
                             A VERIFY that would use the card's last PIN
                             try is refused (69 83) unless
                             --allow-last-pin-try is given.
  --vscard-listen ADDR       a VSCard host socket (tcp:HOST:PORT or
                             unix:PATH): the role of QEMU's
                             ccid-card-passthru. A VSCard client that
                             connects ('vscard connect ADDR', or libcacard's
                             vscclient) puts its card in the slot; its
                             ATR inserts the card, CardRemove, ReaderRemove
                             or a disconnect remove it. One client at a time
                             per slot; another one is turned away while it
                             is connected. A command APDU over 270 bytes
                             is never sent to the client (vscclient
                             overflows its buffer); the guest gets 67 00.
                             --tls-cert/--tls-key make it TLS; --tls-ca
                             then asks clients for a certificate from that
                             CA (QEMU's verify-peer=on).

Exports (at least one):

  --usbredir unix:PATH|tcp:HOST:PORT
      connect to QEMU's usbredir chardev (-chardev socket,...,server=on
      -device usb-redir,chardev=...), and connect again with backoff when
      QEMU restarts. With --listen, listen there instead, so that QEMU
      connects in with a client chardev (server=off,reconnect=N); one QEMU
      at a time. With --usbredir-tls-dir DIR (tcp only: QEMU has no TLS
      on unix sockets) the link is TLS, as QEMU's chardev with
      tls-creds-x509 asks. DIR is laid out like QEMU's credentials
      directory: ca-cert.pem, which QEMU's certificate must chain to, and
      client-cert.pem/client-key.pem for QEMU's verify-peer=on; with
      --listen, server-cert.pem/server-key.pem, and with ca-cert.pem there
      QEMU must present a certificate from that CA.
  --usbip HOST:PORT
      serve USB/IP ('usbip list -r HOST', 'usbip attach -r HOST -b ID'),
      port 3240 by default; --busid names the device (default 1-1).

The reader is one USB device: it can be attached to one importer at a time.
While QEMU has it over usbredir, a 'usbip attach' is refused; while a
USB/IP client has it attached, usbredir waits (or turns QEMU away with
--listen) until it is detached. Listening addresses default to loopback;
give another host explicitly to listen beyond this machine.

While it runs, it takes commands on stdin and on its control socket
('vscard ctl COMMAND'): insert [SLOT], remove [SLOT], list, status,
debug LEVEL, quit. Without SLOT, insert and remove act on every slot.
SIGINT, SIGTERM or quit detach the reader from its importers (usbredir's
device_disconnect is sent) and exit 0.

flags:
`

const readerCommands = `commands:
  insert [SLOT]   insert the slot's card again (every slot without SLOT)
  remove [SLOT]   remove the slot's card; the guest sees it pulled out
  list            show the slots and their cards
  status          show the exports, the slots and counters
  debug LEVEL     set the log level: debug, info, warn or error
  quit            detach the reader, then exit`

// sourceKind is the kind of card source behind a slot.
type sourceKind string

const (
	srcCard   sourceKind = "card"
	srcNSS    sourceKind = "nss"
	srcPCSC   sourceKind = "pcsc"
	srcVSCard sourceKind = "vscard-listen"
)

// sourceSpec is one SOURCE flag: one slot.
type sourceSpec struct {
	kind  sourceKind
	arg   string // DIR, DB, READER or the listen address
	certs string // --nss: the nicknames
	addr  target // --vscard-listen: the parsed address
}

func (s sourceSpec) String() string {
	if s.kind == srcNSS {
		return fmt.Sprintf("--nss %s --certs %s", s.arg, s.certs)
	}
	return fmt.Sprintf("--%s %s", s.kind, s.arg)
}

// readerConfig is the parsed command line of "vscard reader".
type readerConfig struct {
	sources []sourceSpec

	usbredir       *target // nil: no usbredir export
	usbredirListen bool
	usbredirTLSDir string // "" for plain TCP
	usbip          string // HOST:PORT, "" for none
	busid          string
	vid, pid       uint16

	tlsCA, tlsCert, tlsKey string
	exclusive              bool
	allowLastPIN           bool

	control   string
	noStdin   bool
	tracePath string
	logLevel  string
	logFormat string
}

// defaultUSBIPPort is the IANA port of USB/IP (usbipd's default).
const defaultUSBIPPort = "3240"

// maxReaderSlots is ccid.Options.Slots' limit (bMaxSlotIndex 7).
const maxReaderSlots = 8

// parseReaderFlags parses the command line of "vscard reader". Mistakes
// wrap errUsage.
func parseReaderFlags(args []string, stderr io.Writer) (*readerConfig, error) {
	cfg := &readerConfig{}
	fs := flag.NewFlagSet("reader", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var srcErr error
	addSource := func(kind sourceKind) func(string) error {
		return func(v string) error {
			s := sourceSpec{kind: kind, arg: v}
			switch kind {
			case srcCard, srcNSS:
				if v == "" {
					return fmt.Errorf("empty %s", map[sourceKind]string{srcCard: "card directory", srcNSS: "database"}[kind])
				}
			case srcVSCard:
				t, err := parseListenAddr(v)
				if err != nil {
					return err
				}
				s.addr = t
			}
			cfg.sources = append(cfg.sources, s)
			return nil
		}
	}
	fs.Func("card", "add a slot with the card `DIR` made by 'vscard card new' (repeatable)", addSource(srcCard))
	fs.Func("nss", "add a slot serving certificates of the NSS database `DB` (sql:DIR or DIR; its password is the PIN); give --certs after it", addSource(srcNSS))
	fs.Func("certs", "for the --nss before it: certificate `NICKNAMES`, comma-separated, in card order (e.g. id-cert,signing-cert,encryption-cert)", func(v string) error {
		for i := len(cfg.sources) - 1; i >= 0; i-- {
			s := &cfg.sources[i]
			if s.kind != srcNSS {
				continue
			}
			if s.certs != "" {
				break
			}
			s.certs = v
			return nil
		}
		if srcErr == nil {
			srcErr = fmt.Errorf("--certs %s: give it after the --nss DB it belongs to", v)
		}
		return nil
	})
	fs.Func("pcsc", "add a slot forwarding the physical card in the PC/SC `READER` (exact name or a unique part; \"\" for the first reader)", addSource(srcPCSC))
	fs.Func("vscard-listen", "add a slot fed by a VSCard client (vscard connect, vscclient) connecting to `ADDR`: tcp:HOST:PORT or unix:PATH", addSource(srcVSCard))

	usbredir := fs.String("usbredir", "", "export over usbredir: QEMU's chardev `TARGET`, unix:PATH or tcp:HOST:PORT")
	fs.BoolVar(&cfg.usbredirListen, "listen", false, "with --usbredir: listen at TARGET for QEMU to connect (default: connect to QEMU)")
	fs.StringVar(&cfg.usbredirTLSDir, "usbredir-tls-dir", "", "with --usbredir tcp:HOST:PORT: TLS, with certificates in `DIR` laid out like QEMU's tls-creds-x509 dir (ca-cert.pem, client-cert.pem/client-key.pem; server-cert.pem/server-key.pem with --listen)")
	fs.StringVar(&cfg.usbip, "usbip", "", "export over USB/IP, listening on `HOST:PORT` (e.g. 127.0.0.1:3240)")
	fs.StringVar(&cfg.busid, "busid", "", "with --usbip: the bus `ID` clients attach (default 1-1)")
	vidPID := fs.String("vid-pid", "08e6:4433", "USB vendor and product `ID`s, hex VID:PID (the default is one stock libccid knows)")
	fs.StringVar(&cfg.tlsCA, "tls-ca", "", "with --vscard-listen TLS: CA certificate `FILE` (PEM) that clients' certificates must chain to; clients must present one")
	fs.StringVar(&cfg.tlsCert, "tls-cert", "", "server certificate `FILE` (PEM) for --vscard-listen; turns on TLS")
	fs.StringVar(&cfg.tlsKey, "tls-key", "", "server private key `FILE` (PEM) for --vscard-listen")
	fs.BoolVar(&cfg.exclusive, "exclusive", false, "with --pcsc: hold the card exclusively; host programs cannot use it meanwhile")
	fs.BoolVar(&cfg.allowLastPIN, "allow-last-pin-try", false, "with --pcsc: let the guest's VERIFY use the card's last PIN try (a wrong PIN then blocks the card)")
	fs.StringVar(&cfg.control, "control", "", "control socket `PATH` (default "+ctl.DefaultPath(os.Getpid())+")")
	fs.BoolVar(&cfg.noStdin, "no-stdin", false, "do not read commands from stdin")
	fs.StringVar(&cfg.tracePath, "trace", "", "append every APDU with timestamps to `FILE` as JSON lines (PINs redacted)")
	fs.StringVar(&cfg.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&cfg.logFormat, "log-format", "text", "log format: text or json")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), readerUsage)
		fs.PrintDefaults()
		fmt.Fprintln(fs.Output(), "\n"+readerCommands)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	if srcErr != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, srcErr)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("%w: unexpected argument %q; sources are flags (--card DIR, --nss DB --certs NICKS, --pcsc READER, --vscard-listen ADDR)", errUsage, fs.Arg(0))
	}
	if len(cfg.sources) == 0 {
		return nil, fmt.Errorf("%w: no card source: give at least one of --card DIR, --nss DB --certs NICKS, --pcsc READER, --vscard-listen ADDR", errUsage)
	}
	if len(cfg.sources) > maxReaderSlots {
		return nil, fmt.Errorf("%w: %d sources; the reader has at most %d slots", errUsage, len(cfg.sources), maxReaderSlots)
	}
	hasPCSC, hasListen := false, false
	for _, s := range cfg.sources {
		switch s.kind {
		case srcNSS:
			if s.certs == "" {
				return nil, fmt.Errorf("%w: --nss %s needs --certs NICKNAMES after it, e.g. --certs id-cert,signing-cert,encryption-cert ('certutil -L -d %s' lists them)", errUsage, s.arg, s.arg)
			}
		case srcPCSC:
			hasPCSC = true
		case srcVSCard:
			hasListen = true
		}
	}
	if !hasPCSC && (cfg.exclusive || cfg.allowLastPIN) {
		return nil, fmt.Errorf("%w: --exclusive and --allow-last-pin-try go with --pcsc", errUsage)
	}
	if !hasListen && (cfg.tlsCA != "" || cfg.tlsCert != "" || cfg.tlsKey != "") {
		return nil, fmt.Errorf("%w: --tls-ca, --tls-cert and --tls-key secure --vscard-listen; give one", errUsage)
	}
	if (cfg.tlsCert == "") != (cfg.tlsKey == "") {
		return nil, fmt.Errorf("%w: give --tls-cert and --tls-key together", errUsage)
	}
	if cfg.tlsCA != "" && cfg.tlsCert == "" {
		return nil, fmt.Errorf("%w: --tls-ca needs --tls-cert and --tls-key (the listener's own certificate)", errUsage)
	}
	if *usbredir == "" && cfg.usbip == "" {
		return nil, fmt.Errorf("%w: no export: give --usbredir unix:PATH|tcp:HOST:PORT, --usbip HOST:PORT, or both", errUsage)
	}
	if *usbredir != "" {
		var t target
		var err error
		if cfg.usbredirListen {
			t, err = parseListenAddr(*usbredir)
		} else {
			t, err = parseTarget(*usbredir)
		}
		if err != nil {
			return nil, fmt.Errorf("%w: --usbredir: %v", errUsage, err)
		}
		cfg.usbredir = &t
		if cfg.usbredirTLSDir != "" && t.Network != "tcp" {
			// QEMU 7.2: "'tls_creds' option is incompatible with 'unix'
			// address type".
			return nil, fmt.Errorf("%w: --usbredir-tls-dir needs --usbredir tcp:HOST:PORT: QEMU has no TLS on unix sockets (protect the socket file with its permissions instead)", errUsage)
		}
	} else if cfg.usbredirListen || cfg.usbredirTLSDir != "" {
		return nil, fmt.Errorf("%w: --listen and --usbredir-tls-dir go with --usbredir", errUsage)
	}
	if cfg.usbip != "" {
		a, err := parseUSBIPAddr(cfg.usbip)
		if err != nil {
			return nil, fmt.Errorf("%w: --usbip: %v", errUsage, err)
		}
		cfg.usbip = a
		if cfg.busid == "" {
			cfg.busid = "1-1"
		}
		if err := checkBusID(cfg.busid); err != nil {
			return nil, fmt.Errorf("%w: --busid: %v", errUsage, err)
		}
	} else if cfg.busid != "" {
		return nil, fmt.Errorf("%w: --busid goes with --usbip", errUsage)
	}
	vid, pid, err := parseVIDPID(*vidPID)
	if err != nil {
		return nil, fmt.Errorf("%w: --vid-pid: %v", errUsage, err)
	}
	cfg.vid, cfg.pid = vid, pid
	var level slog.LevelVar
	if err := level.UnmarshalText([]byte(cfg.logLevel)); err != nil {
		return nil, fmt.Errorf("%w: --log-level %q: want debug, info, warn or error", errUsage, cfg.logLevel)
	}
	if cfg.logFormat != "text" && cfg.logFormat != "json" {
		return nil, fmt.Errorf("%w: --log-format %q: want text or json", errUsage, cfg.logFormat)
	}
	return cfg, nil
}

// parseListenAddr reads a listening address: unix:PATH, tcp:HOST:PORT or
// HOST:PORT. An empty host is loopback, never every interface: a card
// reader must not be reachable from the network by accident.
func parseListenAddr(s string) (target, error) {
	return parseTarget(s) // it maps an empty host to 127.0.0.1
}

// parseUSBIPAddr reads --usbip HOST:PORT, HOST (port 3240) or :PORT
// (loopback).
func parseUSBIPAddr(s string) (string, error) {
	if !strings.Contains(s, ":") || strings.HasSuffix(s, "]") {
		s += ":" + defaultUSBIPPort
	}
	t, err := parseTarget("tcp:" + s)
	if err != nil {
		return "", err
	}
	return t.Addr, nil
}

// checkBusID accepts what Linux's usbip tools print and take with -b:
// a short name of letters, digits, '-', '.' and ':' (a USB/IP bus id field
// holds 32 bytes, protocols.md §5).
func checkBusID(id string) error {
	if len(id) == 0 || len(id) > 31 {
		return fmt.Errorf("bus id %q: want 1 to 31 characters, like 1-1", id)
	}
	for _, r := range id {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r == '-' || r == '.' || r == ':' || r == '_') {
			return fmt.Errorf("bus id %q: only letters, digits, '-', '.', ':' and '_'", id)
		}
	}
	return nil
}

// parseVIDPID reads "08e6:4433".
func parseVIDPID(s string) (vid, pid uint16, err error) {
	v, p, ok := strings.Cut(s, ":")
	if !ok {
		return 0, 0, fmt.Errorf("%q: want VID:PID in hex, e.g. 08e6:4433", s)
	}
	vv, err1 := strconv.ParseUint(strings.TrimPrefix(v, "0x"), 16, 16)
	pp, err2 := strconv.ParseUint(strings.TrimPrefix(p, "0x"), 16, 16)
	if err1 != nil || err2 != nil || v == "" || p == "" {
		return 0, 0, fmt.Errorf("%q: want VID:PID as two hex numbers up to ffff, e.g. 08e6:4433", s)
	}
	return uint16(vv), uint16(pp), nil
}

// runReader implements "vscard reader".
func runReader(ctx context.Context, env *environ, args []string) error {
	cfg, err := parseReaderFlags(args, env.stderr)
	if err != nil {
		return err
	}
	var level slog.LevelVar
	_ = level.UnmarshalText([]byte(cfg.logLevel)) // checked by parseReaderFlags
	log, err := newLevelLogger(env.stderr, &level, cfg.logFormat)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	var traceOut io.Writer
	if cfg.tracePath != "" {
		f, err := os.OpenFile(cfg.tracePath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("open trace file: %w", err)
		}
		defer f.Close()
		traceOut = f
	}
	app, err := newReaderApp(ctx, cfg, log, traceOut)
	if err != nil {
		return err
	}
	defer app.close()
	app.level = &level
	if err := app.prepare(); err != nil {
		return err
	}

	ctlPath := cfg.control
	if ctlPath == "" {
		ctlPath = ctl.DefaultPath(os.Getpid())
	}
	ln, err := ctl.Listen(ctlPath)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	app.quit = cancel

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := ctl.Serve(ctx, ln, app.handle, log); err != nil {
			log.Error("control socket failed", "err", err)
		}
	}()
	log.Info("control socket ready", "path", ctlPath, "try", "vscard ctl --control "+ctlPath+" status")
	if !cfg.noStdin {
		// Not waited for: a read from a terminal cannot be interrupted.
		go commandLoop(ctx, env.stdin, env.stdout, app.handle, log)
	}
	err = app.run(ctx)
	cancel()
	wg.Wait()
	if err != nil {
		return err
	}
	log.Info("stopped; exiting")
	return nil
}
