package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/card/cac"
	"github.com/vscard/vscard/internal/ctl"
	"github.com/vscard/vscard/internal/netutil"
	"github.com/vscard/vscard/token"
	"github.com/vscard/vscard/token/nss"
	"github.com/vscard/vscard/vscard"
)

const connectUsage = `usage: vscard connect [flags] TARGET
       vscard connect --pcsc [--reader NAME|all] [flags] TARGET [TARGET...]

Connects a card to QEMU's ccid-card-passthru device (the role of libcacard's
vscclient) and keeps it connected: when QEMU restarts or the socket drops, it
reconnects with backoff and inserts the card again. TARGET is the chardev
socket QEMU listens on:

  tcp:HOST:PORT     e.g. tcp:127.0.0.1:2001, tcp:[::1]:2001 (HOST:PORT also works)
  unix:PATH         QEMU's -chardev socket,path=PATH,server=on

'vscard qemu-args' prints matching QEMU options. With --tls-ca, the link is
TLS to a chardev with tls-creds=...: QEMU's certificate is verified against
the CA, and --tls-cert/--tls-key give the client certificate that
verify-peer=on asks for.

With --pcsc, the card is a physical one in a PC/SC reader, forwarded
through pcscd: each APDU goes to the card verbatim, inside a PC/SC
transaction, so host programs can use the card at the same time (--exclusive
keeps them out). A card inserted, removed, or a reader plugged in or out,
shows up in the guest likewise; one TARGET serves one reader (QEMU's
ccid-card-passthru has one reader per chardev). --reader picks the reader:
an exact name or a unique part of one (default: the first reader), or 'all'
for every reader, each on the next free TARGET. A VERIFY that would use the
card's last PIN try is refused (the guest gets 69 83) unless
--allow-last-pin-try is given. A card that offers only T=1 (most physical
cards) is shown to the guest with the same ATR announcing T=0, because QEMU
7.2's usb-ccid cannot do T=1; --keep-atr forwards the ATR unchanged.

While it runs, it takes commands on stdin and on its control socket
('vscard ctl COMMAND'): insert, remove, list, status, debug LEVEL, quit.
SIGINT, SIGTERM or quit remove the card and the reader from QEMU, wait until
QEMU has them, and exit 0.

flags:
`

// connectCommands is the help text of the interactive commands.
const connectCommands = `commands:
  insert        insert the card (again)
  remove        remove the card; the guest sees it pulled out
  list          show the reader and its card
  status        show the link state and counters
  debug LEVEL   set the log level: debug, info, warn or error
  quit          remove card and reader, then exit`

// runConnect implements "vscard connect".
func runConnect(ctx context.Context, env *environ, args []string) error {
	fs := flag.NewFlagSet("connect", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	cardDir := fs.String("card", "", "card `DIR` made by 'vscard card new' (without it the reader starts empty)")
	strict := fs.Bool("strict", false, "reproduce libcacard 2.8 byte for byte, quirks included")
	readerName := fs.String("reader-name", "vscard", "reader `NAME` sent in ReaderAdd (QEMU ignores it; other hosts may show it)")
	tlsCA := fs.String("tls-ca", "", "CA certificate `FILE` (PEM) that QEMU's server certificate must chain to; turns on TLS")
	tlsCert := fs.String("tls-cert", "", "client certificate `FILE` (PEM) for QEMU's verify-peer=on")
	tlsKey := fs.String("tls-key", "", "client private key `FILE` (PEM)")
	tlsServerName := fs.String("tls-server-name", "", "`NAME` expected in QEMU's certificate (default: the target's host)")
	control := fs.String("control", "", "control socket `PATH` (default "+ctl.DefaultPath(os.Getpid())+")")
	noStdin := fs.Bool("no-stdin", false, "do not read commands from stdin")
	tracePath := fs.String("trace", "", "append every message with timestamps to `FILE` as JSON lines (PINs redacted)")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn or error")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	noWorkaround := fs.Bool("no-qemu54-workaround", false,
		"send 54-byte responses as they are. By default they are split with 61 xx, because QEMU 7.2's usb-ccid\n"+
			"turns a 54-byte response into a full USB packet plus a zero-length one that the guest takes for the\n"+
			"next answer, and the guest's reader stays out of step until re-plugged")
	nssDB := fs.String("nss", "", "serve certificates from the NSS database `DIR` (sql:DIR or DIR, made with certutil; its password is the PIN)")
	certs := fs.String("certs", "", "with --nss: certificate `NICKNAMES`, comma-separated, in card order (e.g. id-cert,signing-cert,encryption-cert)")
	usePCSC := fs.Bool("pcsc", false, "forward a physical card in a PC/SC reader (through pcscd) instead of a virtual card")
	pcscReader := fs.String("reader", "", "with --pcsc: the PC/SC reader `NAME` (exact, or a unique part of it), or 'all' (default: the first reader)")
	exclusive := fs.Bool("exclusive", false, "with --pcsc: hold the card exclusively; host programs cannot use it meanwhile")
	allowLastPIN := fs.Bool("allow-last-pin-try", false, "with --pcsc: let the guest's VERIFY use the card's last PIN try (a wrong PIN then blocks the card)")
	keepATR := fs.Bool("keep-atr", false, "with --pcsc: forward a T=1-only card's ATR unchanged (for hosts whose reader does T=1; QEMU 7.2's usb-ccid does not)")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), connectUsage)
		fs.PrintDefaults()
		fmt.Fprintln(fs.Output(), "\n"+connectCommands)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if *nssDB != "" && *cardDir != "" {
		return fmt.Errorf("%w: give either --card DIR or --nss DIR, not both", errUsage)
	}
	if *nssDB != "" && *certs == "" {
		return fmt.Errorf("%w: --nss needs --certs NICKNAMES, e.g. --certs id-cert,signing-cert,encryption-cert ('certutil -L -d %s' lists them)", errUsage, *nssDB)
	}
	if *certs != "" && *nssDB == "" {
		return fmt.Errorf("%w: --certs picks certificates of an NSS database: give --nss DIR too", errUsage)
	}
	if *usePCSC && (*cardDir != "" || *nssDB != "" || *strict) {
		return fmt.Errorf("%w: --pcsc forwards a physical card; it does not go with --card, --nss or --strict", errUsage)
	}
	if !*usePCSC && (*pcscReader != "" || *exclusive || *allowLastPIN || *keepATR) {
		return fmt.Errorf("%w: --reader, --exclusive, --allow-last-pin-try and --keep-atr go with --pcsc", errUsage)
	}
	if *usePCSC {
		if fs.NArg() == 0 {
			return fmt.Errorf("%w: want at least one TARGET (tcp:HOST:PORT or unix:PATH)", errUsage)
		}
		if fs.NArg() > 1 && *pcscReader != "all" {
			return fmt.Errorf("%w: %d TARGETs need --reader all (one TARGET per reader)", errUsage, fs.NArg())
		}
	} else if fs.NArg() != 1 {
		return fmt.Errorf("%w: want exactly one TARGET (tcp:HOST:PORT or unix:PATH), got %d arguments", errUsage, fs.NArg())
	}
	var tgts []target
	var tlsCfgs []*tls.Config
	for _, a := range fs.Args() {
		tgt, err := parseTarget(a)
		if err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		cfg, err := clientTLSConfig(*tlsCA, *tlsCert, *tlsKey, *tlsServerName, tgt)
		if err != nil {
			return err
		}
		tgts, tlsCfgs = append(tgts, tgt), append(tlsCfgs, cfg)
	}
	tgt, tlsCfg := tgts[0], tlsCfgs[0]
	var level slog.LevelVar
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("%w: --log-level %q: want debug, info, warn or error", errUsage, *logLevel)
	}
	log, err := newLevelLogger(env.stderr, &level, *logFormat)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}

	var c card.Card
	var desc string
	if *usePCSC {
		// Below: a Bridge drives the readers instead of a fixed card.
	} else if *cardDir != "" {
		oc, err := openCardDir(*cardDir, *strict, log)
		if err != nil {
			return err
		}
		c, desc = oc.card, oc.desc
	} else if *nssDB != "" {
		db, tok, err := openNSS(*nssDB, *certs, log)
		if err != nil {
			return err
		}
		defer db.Close()
		cc, err := cac.New(tok, cac.Options{Strict: *strict, Logger: log})
		if err != nil {
			return fmt.Errorf("--nss %s: %w", *nssDB, err)
		}
		c = cc
		desc = describeCard(*nssDB, tok.Credentials())
	} else {
		log.Warn("no --card or --nss given: the reader starts empty and 'insert' has nothing to insert")
	}

	var trace func(vscard.TraceEvent)
	if *tracePath != "" {
		f, err := os.OpenFile(*tracePath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("open trace file: %w", err)
		}
		defer f.Close()
		trace = vscard.JSONTrace(f)
	}

	ctlPath := *control
	if ctlPath == "" {
		ctlPath = ctl.DefaultPath(os.Getpid())
	}
	ln, err := ctl.Listen(ctlPath)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if *usePCSC {
		return runConnectPCSC(ctx, env, &pcscRun{
			targets: tgts, tlsCfgs: tlsCfgs, reader: *pcscReader, exclusive: *exclusive, allowLastPIN: *allowLastPIN, keepATR: *keepATR,
			readerName: *readerName, noWorkaround: *noWorkaround, noStdin: *noStdin,
			log: log, level: &level, trace: trace, ctl: ln, ctlPath: ctlPath, cancel: cancel,
		})
	}
	client := vscard.NewClient(dialer(tgt, tlsCfg), c, &vscard.ClientOptions{
		ReaderName:       *readerName,
		Logger:           log,
		Trace:            trace,
		QEMU54Workaround: !*noWorkaround,
	})
	s := &connectSession{client: client, card: c, cardDesc: desc, reader: *readerName,
		target: tgt.String(), level: &level, quit: cancel}

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := ctl.Serve(ctx, ln, s.handle, log); err != nil {
			log.Error("control socket failed", "err", err)
		}
	}()
	log.Info("control socket ready", "path", ctlPath, "try", "vscard ctl --control "+ctlPath+" status")
	if !*noStdin {
		// Not waited for: a read from a terminal cannot be interrupted, and
		// the process exits right after Run anyway.
		go commandLoop(ctx, env.stdin, env.stdout, s.handle, log)
	}
	mode := "tcp"
	if tlsCfg != nil {
		mode = "tls"
	}
	if tgt.Network == "unix" {
		mode = "unix"
		if tlsCfg != nil {
			mode = "unix+tls"
		}
	}
	log.Info("connecting to QEMU's ccid-card-passthru chardev", "target", tgt.String(), "transport", mode,
		"card", *cardDir+*nssDB, "qemu54_workaround", !*noWorkaround)
	runErr := client.Run(ctx)
	cancel()
	wg.Wait()
	if runErr != nil {
		return runErr
	}
	log.Info("stopped; exiting")
	return nil
}

// newLevelLogger is newLogger with a level that can change at runtime
// ("debug LEVEL").
func newLevelLogger(w io.Writer, level *slog.LevelVar, format string) (*slog.Logger, error) {
	opts := &slog.HandlerOptions{Level: level}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// target is where QEMU's chardev listens.
type target struct {
	Network string // "tcp" or "unix"
	Addr    string // host:port or path
	Host    string // host part of a tcp target, for TLS verification
}

func (t target) String() string { return t.Network + ":" + t.Addr }

// parseTarget reads tcp:HOST:PORT, unix:PATH or HOST:PORT. IPv6 hosts are
// bracketed (tcp:[::1]:2001), which vscclient cannot reach at all
// (peers.md §9 item 6).
func parseTarget(s string) (target, error) {
	switch {
	case strings.HasPrefix(s, "unix:"):
		p := strings.TrimPrefix(s, "unix:")
		if p == "" {
			return target{}, fmt.Errorf("target %q: empty socket path", s)
		}
		return target{Network: "unix", Addr: p}, nil
	case strings.HasPrefix(s, "tcp:"):
		s = strings.TrimPrefix(s, "tcp:")
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return target{}, fmt.Errorf("target %q: want tcp:HOST:PORT, tcp:[IPv6]:PORT or unix:PATH", s)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return target{}, fmt.Errorf("target %q: port %q is not a number from 1 to 65535", s, port)
	}
	if host == "" {
		host = "127.0.0.1" // QEMU's own default for a client chardev
	}
	return target{Network: "tcp", Addr: net.JoinHostPort(host, port), Host: host}, nil
}

// clientTLSConfig builds the TLS configuration for QEMU's tls-creds-x509
// chardev (peers.md §7.3), or nil when no TLS flag is given. The server's
// certificate is always verified: against --tls-ca only, since QEMU's
// certificates come from a private CA.
func clientTLSConfig(caFile, certFile, keyFile, serverName string, tgt target) (*tls.Config, error) {
	if caFile == "" && certFile == "" && keyFile == "" && serverName == "" {
		return nil, nil
	}
	if caFile == "" {
		return nil, fmt.Errorf("%w: TLS needs --tls-ca FILE, the CA that signed QEMU's server certificate (ca-cert.pem in QEMU's tls-creds-x509 dir)", errUsage)
	}
	if (certFile == "") != (keyFile == "") {
		return nil, fmt.Errorf("%w: give --tls-cert and --tls-key together", errUsage)
	}
	pool, err := readCertPool(caFile)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca: %w", err)
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12, ServerName: serverName}
	if cfg.ServerName == "" {
		if tgt.Network != "tcp" {
			return nil, fmt.Errorf("%w: TLS over a Unix socket needs --tls-server-name NAME (a name in QEMU's server certificate)", errUsage)
		}
		cfg.ServerName = tgt.Host
	}
	if certFile != "" {
		kp, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{kp}
	}
	return cfg, nil
}

// dialTimeout bounds one connection attempt, TLS handshake included, so a
// black-holed address does not stall the reconnect loop.
const dialTimeout = 10 * time.Second

// errTLSHandshake marks a dial that reached the peer but failed its TLS
// handshake: a problem of certificates, not of a peer that is down.
var errTLSHandshake = errors.New("TLS handshake")

// dialer returns the dial function for vscard.NewClient.
func dialer(tgt target, cfg *tls.Config) func(ctx context.Context) (net.Conn, error) {
	return func(ctx context.Context) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, dialTimeout)
		defer cancel()
		var d net.Dialer
		nc, err := d.DialContext(ctx, tgt.Network, tgt.Addr)
		if err != nil {
			return nil, err
		}
		// TCP_NODELAY and TCP_QUICKACK re-arming on the raw socket, under
		// TLS if any: QEMU writes header and payload separately
		// (peers.md §1.3), so without quick ACKs each APDU waits ~40 ms.
		nc = netutil.LowLatency(nc)
		if cfg == nil {
			return nc, nil
		}
		tc := tls.Client(nc, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, fmt.Errorf("%w with %s: %w", errTLSHandshake, tgt, err)
		}
		return tc, nil
	}
}

// openNSS opens an NSS database read-only with token/nss and makes a token
// of the certificates named in certs (comma-separated nicknames, in card
// order), as libcacard's soft=(...) does (cac.md §6). The database password
// is the card PIN; with an empty password any PIN works and token/nss logs
// that the keys are effectively unprotected (peers.md §6.2).
func openNSS(path, certs string, log *slog.Logger) (*nss.DB, *nss.Token, error) {
	var names []string
	seen := make(map[string]bool)
	for _, n := range strings.Split(certs, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		if seen[n] {
			return nil, nil, fmt.Errorf("%w: --certs names %q twice; name each certificate once", errUsage, n)
		}
		seen[n] = true
		names = append(names, n)
	}
	if len(names) == 0 {
		return nil, nil, fmt.Errorf("%w: --certs %q names no certificate", errUsage, certs)
	}
	db, err := nss.Open(path, &nss.Options{Logger: log})
	if err != nil {
		return nil, nil, fmt.Errorf("--nss %s: %w", path, err)
	}
	tok, err := db.Token(names)
	if err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("--nss %s: %w", path, err)
	}
	return db, tok, nil
}

// describeCard is the card line of "list".
func describeCard(dir string, creds []token.Credential) string {
	labels := make([]string, len(creds))
	for i, c := range creds {
		labels[i] = c.Label
	}
	return fmt.Sprintf("%s (%d certificates: %s)", dir, len(creds), strings.Join(labels, ", "))
}

// connectSession answers the interactive commands of "vscard connect".
type connectSession struct {
	client   *vscard.Client
	card     card.Card // nil: started without --card
	cardDesc string
	reader   string
	target   string
	level    *slog.LevelVar
	quit     context.CancelFunc
}

// handle runs one command line and returns the answer.
func (s *connectSession) handle(_ context.Context, line string) string {
	f := strings.Fields(line)
	if len(f) == 0 {
		return ""
	}
	cmd, args := f[0], f[1:]
	wantArgs := func(n int) string {
		if len(args) != n {
			return fmt.Sprintf("error: %s takes %d argument(s)", cmd, n)
		}
		return ""
	}
	switch cmd {
	case "insert":
		if e := wantArgs(0); e != "" {
			return e
		}
		if s.card == nil {
			return "error: no card to insert: start vscard connect with --card DIR or --nss DIR --certs NICKNAMES"
		}
		if err := s.client.Insert(s.card); err != nil {
			if errors.Is(err, vscard.ErrCardInserted) {
				return "error: the card is already inserted"
			}
			return "error: " + err.Error()
		}
		return "card inserted"
	case "remove":
		if e := wantArgs(0); e != "" {
			return e
		}
		if err := s.client.Remove(); err != nil {
			if errors.Is(err, vscard.ErrNoCard) {
				return "error: no card inserted"
			}
			return "error: " + err.Error()
		}
		return "card removed"
	case "list":
		st := s.client.Status()
		state := "empty"
		if st.CardInserted {
			state = "card inserted"
		}
		out := fmt.Sprintf("reader %q: %s", s.reader, state)
		if s.cardDesc != "" {
			out += "\ncard " + s.cardDesc
		}
		return out
	case "status":
		st := s.client.Status()
		var b strings.Builder
		fmt.Fprintf(&b, "target: %s\n", s.target)
		if st.Connected {
			fmt.Fprintf(&b, "link: connected to %s since %s\n", st.Addr, st.Since.Format(time.RFC3339))
		} else {
			fmt.Fprintf(&b, "link: not connected (waiting for QEMU)\n")
		}
		fmt.Fprintf(&b, "card: %s\n", map[bool]string{true: "inserted", false: "not inserted"}[st.CardInserted])
		fmt.Fprintf(&b, "apdus: %d\nconnects: %d\n", st.APDUs, st.Connects)
		fmt.Fprintf(&b, "log level: %s", strings.ToLower(s.level.Level().String()))
		if st.LastError != "" {
			fmt.Fprintf(&b, "\nlast error: %s", st.LastError)
		}
		return b.String()
	case "debug":
		if e := wantArgs(1); e != "" {
			return e + " (debug, info, warn or error)"
		}
		var l slog.Level
		if err := l.UnmarshalText([]byte(args[0])); err != nil {
			return fmt.Sprintf("error: unknown log level %q: want debug, info, warn or error", args[0])
		}
		s.level.Set(l)
		return "log level: " + strings.ToLower(l.String())
	case "quit", "exit":
		s.quit()
		return "removing card and reader, then exiting"
	case "help", "?":
		return connectCommands
	}
	return fmt.Sprintf("error: unknown command %q; try help", cmd)
}

// maxCommandLine bounds a stdin line like a control socket line.
const maxCommandLine = ctl.MaxLine

// commandLoop reads command lines from r until EOF or a read error and
// writes each answer to w. It returns the number of lines handled. EOF only
// ends the loop — the card stays served, so "vscard connect < /dev/null"
// works — unlike vscclient, which spins at 100 % CPU on EOF (peers.md §1.3).
func commandLoop(ctx context.Context, r io.Reader, w io.Writer, h ctl.Handler, log *slog.Logger) int {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 256), maxCommandLine)
	n := 0
	for sc.Scan() {
		if ctx.Err() != nil {
			break
		}
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		n++
		if a := h(ctx, line); a != "" {
			fmt.Fprintln(w, strings.TrimRight(a, "\n"))
		}
	}
	if err := sc.Err(); err != nil {
		log.Warn("stopped reading commands from stdin", "err", err)
	} else {
		log.Debug("stdin closed; commands still work through the control socket")
	}
	return n
}
