// Command vscclient is a drop-in replacement for libcacard's vscclient: it
// connects a virtual CAC card to QEMU's ccid-card-passthru device with the
// same command line and the same stdin commands, on top of vscard's VSCard
// client.
//
// Usage:
//
//	vscclient [-c cert]... [-e emul_args] [-d level] [-p] host port
//
// emul_args is libcacard's option string (internal/emuopts), e.g.
//
//	vscclient -e 'db="DIR" use_hw=no soft=(,Test,CAC,,id,signing,encryption)' 127.0.0.1 2001
//
// where DIR is an NSS database made with certutil (cert9.db and key4.db,
// with or without the sql: prefix, read by token/nss without any NSS
// library; default /etc/pki/nssdb as in libcacard) or a vscard card store
// ('vscard card new DIR'). The reader name comes from soft=(...) and is sent
// in ReaderAdd; the certificate names pick and order the certificates: NSS
// nicknames, or a store's labels (see pickCredentials). The NSS database
// password is the card PIN; a database with an empty password accepts any
// PIN, as with libcacard, and vscclient warns that its keys are effectively
// unprotected.
//
// Physical cards: -e passthru (or use_hw=yes hw_type=PASSTHRU) forwards the
// first PC/SC reader and its card through pcscd, with hot-plug, shared with
// host programs, and refusing the guest a VERIFY that would use the card's
// last PIN try (card/passthru). -p serves the soft card and also sends each
// APDU to the card in the first PC/SC reader, printing where the answers
// differ, as libcacard's vscclient does. Rebuilding CAC cards out of
// hardware PKCS#11 tokens (use_hw=yes hw_type=CAC, use_hw=removable,
// nssemul) is out of scope and says so.
//
// # Differences from libcacard's vscclient
//
// Fixing what peers.md §1.3 and §9 item 6 list: IPv6 hosts work; it
// reconnects with backoff when QEMU is not up yet or restarts (libcacard
// exits 5 when the connection fails, and spins at 100 % CPU when QEMU goes
// away); "exit", SIGINT and SIGTERM deliver CardRemove and ReaderRemove
// before exiting (libcacard loses them); EOF on stdin stops reading stdin
// and keeps the card served; the ReaderAdd carries the reader name; a
// 54-byte response is split with 61 xx because QEMU 7.2's usb-ccid loses
// sync on it (peers.md appendix).
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/card/cac"
	"github.com/vscard/vscard/card/passthru"
	"github.com/vscard/vscard/internal/emuopts"
	"github.com/vscard/vscard/internal/netutil"
	"github.com/vscard/vscard/vscard"
)

// Exit codes of libcacard's vscclient (protocols.md §2.1).
const (
	exitOK       = 0
	exitError    = 1
	exitUsage    = 4
	exitTooMany  = 5
	maxCertNames = 100
)

const usageText = `usage: vscclient [-c certname]... [-e emul_args] [-d level] [-p] <host> <port>
 -c certname   certificate of the soft card (repeatable; an NSS nickname, or
               a card store label such as id, signing, encryption)
 -e emul_args  libcacard options, e.g.
               'db="sql:DIR" use_hw=no soft=(,Test,CAC,,id-cert,signing-cert,encryption-cert)'
               or 'passthru' to forward the first PC/SC reader's card
               where DIR is an NSS database (certutil -N -d sql:DIR; its
               password is the PIN) or a vscard card store ('vscard card new DIR')
 -d level      debug level: 0 info, 1-10 debug, >10 also every message
 -p            also send each APDU to the card in the first PC/SC reader and
               print where its answers differ from the soft card's
 -no-qemu54-workaround
               send 54-byte responses whole (QEMU 7.2 usb-ccid then loses sync)
stdin commands: insert [id], remove [id], select id, list, debug [level], exit
`

// config is the parsed command line.
type config struct {
	certs        []string
	emul         string
	emulGiven    bool
	debug        int
	pcsc         bool
	noWorkaround bool
	host, port   string
}

// usageError makes run print the usage and exit 4, as vscclient does.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// parseArgs reads the command line the way getopt("c:e:d:p") does on glibc:
// options and operands may be mixed, an option's value may be attached
// (-d1) or the next argument, and "--" ends the options.
func parseArgs(args []string) (*config, error) {
	c := &config{}
	var operands []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			operands = append(operands, args[i+1:]...)
			break
		}
		if a == "--no-qemu54-workaround" || a == "-no-qemu54-workaround" {
			c.noWorkaround = true
			continue
		}
		if len(a) < 2 || a[0] != '-' {
			operands = append(operands, a)
			continue
		}
		// A cluster like -pd1.
	cluster:
		for j := 1; j < len(a); j++ {
			opt := a[j]
			switch opt {
			case 'p':
				c.pcsc = true
				continue
			case 'h':
				return nil, flagHelp
			case 'c', 'e', 'd':
			default:
				return nil, &usageError{fmt.Sprintf("invalid option -- '%c'", opt)}
			}
			val := a[j+1:]
			if val == "" {
				if i+1 >= len(args) {
					return nil, &usageError{fmt.Sprintf("option requires an argument -- '%c'", opt)}
				}
				i++
				val = args[i]
			}
			switch opt {
			case 'c':
				c.certs = append(c.certs, val)
			case 'e':
				c.emul, c.emulGiven = val, true
			case 'd':
				c.debug = atoiLevel(val)
			}
			break cluster
		}
	}
	if len(operands) != 2 {
		return nil, &usageError{fmt.Sprintf("want <host> <port>, got %d arguments", len(operands))}
	}
	c.host, c.port = operands[0], operands[1]
	return c, nil
}

var flagHelp = errors.New("help requested")

// atoiLevel reads -d's level: leading digits as C's atoi; no digits gives 1
// (protocols.md §2.1).
func atoiLevel(s string) int {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' && i < 6 {
		i++
	}
	if i == 0 {
		return 1
	}
	n, _ := strconv.Atoi(s[:i])
	return n
}

// emulString builds the option string like vscclient: with -c, the base is
// the -e string or the default db, followed by a soft card named "Virtual
// Reader" with the -c names and a trailing comma (protocols.md §2.1).
func emulString(c *config) string {
	if len(c.certs) == 0 {
		return c.emul
	}
	base := c.emul
	if !c.emulGiven {
		base = `db="` + emuopts.DefaultDB + `"`
	}
	return base + ",soft=(,Virtual Reader,CAC,," + strings.Join(c.certs, ",") + ",)"
}

// levelFor maps vscclient's -d onto slog: 0 is info, above that debug.
func levelFor(d int) slog.Level {
	if d > 0 {
		return slog.LevelDebug
	}
	return slog.LevelInfo
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run is main without the process: it returns the exit code.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	cfg, err := parseArgs(args)
	if errors.Is(err, flagHelp) {
		fmt.Fprint(stdout, usageText)
		return exitOK
	}
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "vscclient: %v\n", err)
		fmt.Fprint(stderr, usageText)
		return exitUsage
	}
	if len(cfg.certs) > maxCertNames {
		fmt.Fprintf(stderr, "vscclient: too many certs (max = %d)\n", maxCertNames)
		return exitTooMany
	}
	if err := serve(ctx, cfg, stdin, stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "vscclient: %v\n", err)
		return exitError
	}
	return exitOK
}

func serve(ctx context.Context, cfg *config, stdin io.Reader, stdout, stderr io.Writer) error {
	var level slog.LevelVar
	level.Set(levelFor(cfg.debug))
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: &level}))

	opts, err := emuopts.Parse(emulString(cfg))
	if err != nil {
		return fmt.Errorf("-e: %w", err)
	}
	sc, err := selectCard(opts, log)
	if errors.Is(err, errPassthru) {
		if cfg.pcsc {
			return errors.New("-p compares a soft card with the physical one; with passthru the physical card is the one served")
		}
		return servePassthru(ctx, cfg, &level, log, stdin, stdout, stderr)
	}
	if err != nil {
		return err
	}
	if sc.closer != nil {
		defer sc.closer.Close()
	}
	c, err := cac.New(sc.tok, cac.Options{Logger: log})
	if err != nil {
		return fmt.Errorf("card %s: %w", sc.dir, err)
	}
	var served card.Card = c
	if cfg.pcsc {
		m := newMirror(ctx, c, stdout, log)
		defer m.Close()
		served = m
	}
	trace := traceFor(cfg, stderr)
	addr, dial := dialFor(cfg)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	client := vscard.NewClient(dial, served, &vscard.ClientOptions{
		ReaderName:       sc.reader,
		Logger:           log,
		Trace:            trace,
		QEMU54Workaround: !cfg.noWorkaround,
	})
	log.Info("serving card", "db", sc.dir, "reader", sc.reader, "certificates", strings.Join(sc.labels, ","), "host", addr)
	s := &session{client: client, card: served, reader: sc.reader, level: &level, debug: cfg.debug, quit: cancel, out: stdout}
	go s.loop(ctx, stdin, log)
	return client.Run(ctx)
}

// traceFor is the message trace: vscclient prints every message above
// level 10.
func traceFor(cfg *config, stderr io.Writer) func(vscard.TraceEvent) {
	if cfg.debug > 10 {
		return vscard.JSONTrace(stderr)
	}
	return nil
}

// dialFor returns the host's address and the dial function for the client.
func dialFor(cfg *config) (string, func(ctx context.Context) (net.Conn, error)) {
	addr := net.JoinHostPort(cfg.host, cfg.port)
	return addr, func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		return netutil.LowLatency(nc), nil
	}
}

// session runs vscclient's stdin commands (protocols.md §2.4).
type session struct {
	client *vscard.Client
	card   card.Card
	// bridge, with passthru, drives the reader and card instead of card.
	bridge *passthru.Bridge
	reader string
	level  *slog.LevelVar
	debug  int
	quit   context.CancelFunc
	out    io.Writer
}

// loop reads commands until EOF. Unlike vscclient, EOF does not spin: the
// card stays served and SIGTERM ends the process.
func (s *session) loop(ctx context.Context, r io.Reader, log *slog.Logger) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 256), 4096)
	fmt.Fprint(s.out, "> ")
	for sc.Scan() {
		if ctx.Err() != nil {
			return
		}
		if a := s.handle(strings.TrimSpace(sc.Text())); a != "" {
			fmt.Fprintln(s.out, a)
		}
		fmt.Fprint(s.out, "> ")
	}
	if err := sc.Err(); err != nil {
		log.Warn("stopped reading commands from stdin", "err", err)
		return
	}
	log.Debug("stdin closed; the card stays served until SIGINT or SIGTERM")
}

// readerID checks an optional reader id argument: the only reader is 0,
// the id QEMU assigns (protocols.md §2.5).
func readerID(args []string) error {
	if len(args) == 0 {
		return nil
	}
	if n, err := strconv.ParseUint(args[0], 10, 32); err != nil || n != 0 {
		return fmt.Errorf("error: no reader with id %s (the only reader is 0)", args[0])
	}
	return nil
}

func (s *session) handle(line string) string {
	f := strings.Fields(line)
	if len(f) == 0 {
		return ""
	}
	cmd, args := f[0], f[1:]
	switch cmd {
	case "insert":
		if err := readerID(args); err != nil {
			return err.Error()
		}
		if s.bridge != nil {
			if err := s.bridge.Reinsert(context.Background()); err != nil {
				return "error: " + err.Error()
			}
			return "card inserted"
		}
		if err := s.client.Insert(s.card); err != nil {
			if errors.Is(err, vscard.ErrCardInserted) {
				return "error: card already inserted"
			}
			return "error: " + err.Error()
		}
		return "card inserted"
	case "remove":
		if err := readerID(args); err != nil {
			return err.Error()
		}
		if s.bridge != nil {
			if err := s.bridge.Eject(); err != nil {
				return "error: " + err.Error()
			}
			return "card removed"
		}
		if err := s.client.Remove(); err != nil {
			if errors.Is(err, vscard.ErrNoCard) {
				return "error: no card inserted"
			}
			return "error: " + err.Error()
		}
		return "card removed"
	case "select":
		if len(args) != 1 {
			return "error: select needs a reader id"
		}
		if err := readerID(args); err != nil {
			return err.Error()
		}
		return "Selecting reader 0, " + s.reader
	case "list":
		st := s.client.Status()
		present := "            "
		if st.CardInserted {
			present = "CARD_PRESENT"
		}
		reader := s.reader
		if s.bridge != nil {
			if bs := s.bridge.Status(); bs.Slots[0].Reader != "" {
				reader = bs.Slots[0].Reader
			} else {
				return "Active Readers:\nInactive Readers:\n(no PC/SC reader yet)"
			}
		}
		line := fmt.Sprintf("%3d %s %s", 0, present, reader)
		if st.Connected {
			return "Active Readers:\n" + line + "\nInactive Readers:"
		}
		return "Active Readers:\nInactive Readers:\n" + line
	case "debug":
		if len(args) > 0 {
			s.debug = atoiLevel(args[0])
			s.level.Set(levelFor(s.debug))
		}
		return fmt.Sprintf("debug level = %d", s.debug)
	case "exit", "quit":
		s.quit()
		return ""
	}
	return "commands: insert [id], remove [id], select id, list, debug [level], exit"
}
