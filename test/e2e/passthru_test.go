package e2e

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/vscard/vscard/internal/fakehost"
	"github.com/vscard/vscard/internal/pcscdtest"
	"github.com/vscard/vscard/pcsc"
)

// passthruScript is the APDU list sent both directly through pcscd and
// through `vscard connect --pcsc`; it starts with SELECTs so both runs
// begin from the same card state, and holds a GET RESPONSE chain.
var passthruScript = [][]byte{
	mustHexE2E("00A4040007A0000000790300"), // SELECT ACA: 61 0D
	mustHexE2E("00C000000D"),               // GET RESPONSE
	mustHexE2E("00A4040007A0000000790100"), // SELECT PKI applet 1
	mustHexE2E("80560100"),                 // GET PROPERTIES (CAC): 61 20
	mustHexE2E("00C0000020"),               // GET RESPONSE
	mustHexE2E("8052000002010200"),         // READ BUFFER: tag buffer length
	mustHexE2E("00A4040007A0000000790300"), // SELECT ACA again
	mustHexE2E("00CA7F6800"),               // GET DATA (unsupported: an error SW)
	mustHexE2E("00B0000010"),               // READ BINARY: an error SW on CAC
}

func mustHexE2E(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

// direct sends APDUs to the reader through our own pcsc client.
func direct(t *testing.T, reader string, cmds ...[]byte) [][]byte {
	t.Helper()
	pc, err := pcsc.EstablishContext(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Release()
	k, err := pc.Connect(reader, pcsc.ShareShared, pcsc.ProtocolAny)
	if err != nil {
		t.Fatalf("connect %q: %v", reader, err)
	}
	defer k.Disconnect(pcsc.LeaveCard)
	var out [][]byte
	for _, c := range cmds {
		r, err := k.Transmit(c)
		if err != nil {
			t.Fatalf("transmit %X: %v", c, err)
		}
		out = append(out, r)
	}
	return out
}

func directATR(t *testing.T, reader string) []byte {
	t.Helper()
	pc, err := pcsc.EstablishContext(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Release()
	k, err := pc.Connect(reader, pcsc.ShareShared, pcsc.ProtocolAny)
	if err != nil {
		t.Fatalf("connect %q: %v", reader, err)
	}
	defer k.Disconnect(pcsc.LeaveCard)
	st, err := k.Status()
	if err != nil {
		t.Fatal(err)
	}
	return st.ATR
}

// connectProc is a running `vscard connect --pcsc`.
type connectProc struct {
	cmd  *exec.Cmd
	log  string
	done chan error
}

func (e *env) connectPCSC(args ...string) *connectProc {
	e.t.Helper()
	f, err := os.CreateTemp(e.dir, "connect-*.log")
	if err != nil {
		e.t.Fatal(err)
	}
	sock := filepath.Join(e.dir, "connect.sock")
	cmd := exec.Command(vscardBin, append([]string{"connect", "--pcsc", "--no-stdin", "--control", sock, "--log-level", "debug"}, args...)...)
	cmd.Env = e.environ()
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	f.Close()
	p := &connectProc{cmd: cmd, log: f.Name(), done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait() }()
	e.t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-p.done
		}
		if e.t.Failed() {
			b, _ := os.ReadFile(p.log)
			e.t.Logf("vscard connect --pcsc log:\n%s", tail(b, 16<<10))
		}
	})
	return p
}

// expectSkipping reads the host's next message of type typ, skipping the
// acknowledgement-only traffic the client may interleave (a ReaderRemove
// clearing a stale reader).
func expectType(t *testing.T, h *fakehost.Host, typ uint32, skip ...uint32) fakehost.Msg {
	t.Helper()
	for {
		m := h.Next()
		if m.Err != nil {
			t.Fatalf("host: want message %d, got %v", typ, m.Err)
		}
		if m.Type == typ {
			return m
		}
		if !slices.Contains(skip, m.Type) {
			t.Fatalf("host: got message %d (% x), want %d", m.Type, m.Payload, typ)
		}
	}
}

func TestPassthru(t *testing.T) {
	e := newEnv(t)
	cardDir := e.newCard("card")
	cards := []card{{dir: cardDir, slot: 0}}
	srv := e.serve(cards)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cp := e.connectPCSC("--reader", readerName0, "tcp:"+ln.Addr().String())
	h := fakehost.Accept(t, ln)
	h.Expect(fakehost.TInit)
	h.Expect(fakehost.TReaderRemove)
	h.Expect(fakehost.TReaderAdd)
	atr := h.Expect(fakehost.TATR).Payload

	t.Run("same ATR", func(t *testing.T) {
		if want := directATR(t, readerName0); !bytes.Equal(atr, want) {
			t.Errorf("guest ATR %X, pcscd's %X", atr, want)
		}
	})

	t.Run("same responses", func(t *testing.T) {
		want := direct(t, readerName0, passthruScript...)
		if len(want[1]) != 15 || len(want[4]) != 34 {
			t.Fatalf("the script's answers carry no data (%X): the comparison would prove little", want)
		}
		for i, c := range passthruScript {
			if got := h.APDU(c); !bytes.Equal(got, want[i]) {
				t.Errorf("APDU %X: through passthru %X, directly %X", c, got, want[i])
			}
		}
	})

	t.Run("round trip", func(t *testing.T) {
		// A forwarded APDU costs one more hop (VSCard TCP) plus a
		// transaction around it; print both medians for the report.
		cmd := mustHexE2E("00A4040007A0000000790300")
		const n = 200
		var via, dir []time.Duration
		for range n {
			s := time.Now()
			h.APDU(cmd)
			via = append(via, time.Since(s))
		}
		pc, err := pcsc.EstablishContext(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Release()
		k, err := pc.Connect(readerName0, pcsc.ShareShared, pcsc.ProtocolAny)
		if err != nil {
			t.Fatal(err)
		}
		defer k.Disconnect(pcsc.LeaveCard)
		for range n {
			s := time.Now()
			if _, err := k.Transmit(cmd); err != nil {
				t.Fatal(err)
			}
			dir = append(dir, time.Since(s))
		}
		t.Logf("median APDU round trip over %d: through vscard connect --pcsc %v, directly through pcscd %v",
			n, median(via), median(dir))
	})

	t.Run("interleaved with a host program", func(t *testing.T) {
		// The guest's SELECT ACA (61 0D) and GET RESPONSE pairs and a host
		// program's own transactions take turns; a host command between the
		// two halves of the guest's chain would make its GET RESPONSE fail.
		// The guest pauses between the two, as a slow guest would: only
		// the transaction kept across the chain keeps the host out.
		sel, getResp := passthruScript[0], passthruScript[1]
		want := direct(t, readerName0, sel, getResp)
		selPKI := passthruScript[2]
		wantPKI := direct(t, readerName0, selPKI, passthruScript[5])
		const rounds = 100
		errs := make(chan error, 2)
		go func() {
			pc, err := pcsc.EstablishContext(context.Background(), nil)
			if err != nil {
				errs <- err
				return
			}
			defer pc.Release()
			k, err := pc.Connect(readerName0, pcsc.ShareShared, pcsc.ProtocolAny)
			if err != nil {
				errs <- err
				return
			}
			defer k.Disconnect(pcsc.LeaveCard)
			for i := range rounds {
				if err := k.BeginTransaction(context.Background()); err != nil {
					errs <- fmt.Errorf("host round %d: begin: %w", i, err)
					return
				}
				r1, err1 := k.Transmit(selPKI)
				r2, err2 := k.Transmit(passthruScript[5])
				k.EndTransaction(pcsc.LeaveCard)
				if err1 != nil || err2 != nil || !bytes.Equal(r1, wantPKI[0]) || !bytes.Equal(r2, wantPKI[1]) {
					errs <- fmt.Errorf("host round %d: %X %X (%v, %v), want %X %X", i, r1, r2, err1, err2, wantPKI[0], wantPKI[1])
					return
				}
			}
			errs <- nil
		}()
		for i := range rounds {
			r1 := h.APDU(sel)
			time.Sleep(5 * time.Millisecond)
			r2 := h.APDU(getResp)
			if !bytes.Equal(r1, want[0]) || !bytes.Equal(r2, want[1]) {
				t.Errorf("guest round %d: %X %X, want %X %X", i, r1, r2, want[0], want[1])
				break
			}
		}
		if err := <-errs; err != nil {
			t.Error(err)
		}
	})

	t.Run("last PIN try guard", func(t *testing.T) {
		h.APDU(mustHexE2E("00A4040007A0000000790300"))
		wrong := append(mustHexE2E("0020000008"), []byte(wrongPIN)...)
		var sws []string
		for i := 0; i < 5; i++ {
			r := h.APDU(wrong)
			sws = append(sws, fmt.Sprintf("%X", r))
			if bytes.Equal(r, []byte{0x69, 0x83}) {
				break
			}
		}
		if want := []string{"63C2", "63C1", "6983"}; !slices.Equal(sws, want) {
			t.Errorf("guest's wrong PINs got %q, want %q (the third refused by the guard)", sws, want)
		}
		// The card itself still has its last try.
		got := direct(t, readerName0, mustHexE2E("00A4040007A0000000790300"), mustHexE2E("00200000"))
		if !bytes.Equal(got[1], []byte{0x63, 0xC1}) {
			t.Errorf("card's own counter: empty VERIFY answers %X, want 63 C1", got[1])
		}
		log, _ := os.ReadFile(cp.log)
		if !bytes.Contains(log, []byte("one PIN try left")) || !bytes.Contains(log, []byte("--allow-last-pin-try")) {
			t.Errorf("the log does not say why the VERIFY was refused and how to override it")
		}
		if bytes.Contains(log, []byte(wrongPIN)) || bytes.Contains(bytes.ToUpper(log), []byte(fmt.Sprintf("%X", wrongPIN))) {
			t.Errorf("the log contains the PIN")
		}
		// The right PIN, directly, resets it for the rest of the test.
		right := append(mustHexE2E("0020000008"), []byte(testPIN)...)
		if got := direct(t, readerName0, mustHexE2E("00A4040007A0000000790300"), right); !bytes.Equal(got[1], []byte{0x90, 0x00}) {
			t.Errorf("right PIN directly: %X", got[1])
		}
	})

	t.Run("reset by a host program", func(t *testing.T) {
		// A host program resets the card; the guest's next command still
		// gets an answer (vscard reconnects without resetting it again),
		// and the log says what happened.
		pc, err := pcsc.EstablishContext(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Release()
		k, err := pc.Connect(readerName0, pcsc.ShareShared, pcsc.ProtocolAny)
		if err != nil {
			t.Fatal(err)
		}
		if err := k.Disconnect(pcsc.ResetCard); err != nil {
			t.Fatalf("disconnect with reset: %v", err)
		}
		if r := h.APDU(passthruScript[0]); !bytes.Equal(r, []byte{0x61, 0x0D}) {
			t.Errorf("SELECT ACA after a reset by another program: %X, want 61 0D", r)
		}
		log, _ := os.ReadFile(cp.log)
		if !bytes.Contains(log, []byte("another program reset the card")) {
			t.Errorf("the log does not mention the reset")
		}
	})

	t.Run("card removal and insertion", func(t *testing.T) {
		srv.stop()
		expectType(t, h, fakehost.TCardRemove)
		srv = e.serve(cards)
		got := expectType(t, h, fakehost.TATR).Payload
		if !bytes.Equal(got, atr) {
			t.Errorf("ATR after re-insertion %X, want %X", got, atr)
		}
		if r := h.APDU(passthruScript[0]); !bytes.Equal(r, []byte{0x61, 0x0D}) {
			t.Errorf("SELECT ACA after re-insertion: %X", r)
		}
	})

	t.Run("pcscd restart", func(t *testing.T) {
		restart := os.Getenv("VSCARD_PCSCD_RESTART")
		if restart == "" {
			t.Skip("VSCARD_PCSCD_RESTART is not set: this scripts/with-pcscd cannot restart its pcscd yet")
		}
		if out, err := exec.Command(restart).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", restart, err, out)
		}
		expectType(t, h, fakehost.TCardRemove, fakehost.TAPDU)
		expectType(t, h, fakehost.TReaderRemove)
		expectType(t, h, fakehost.TReaderAdd)
		if got := expectType(t, h, fakehost.TATR).Payload; !bytes.Equal(got, atr) {
			t.Errorf("ATR after the restart %X, want %X", got, atr)
		}
		if r := h.APDU(passthruScript[0]); !bytes.Equal(r, []byte{0x61, 0x0D}) {
			t.Errorf("SELECT ACA after the restart: %X", r)
		}
	})
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// TestPassthruAllReaders: --reader all maps the readers, in pcscd's order,
// to the TARGETs, and a card pulled from one reader leaves the other
// target alone.
func TestPassthruAllReaders(t *testing.T) {
	e := newEnv(t)
	c0 := card{dir: e.newCard("card0"), slot: 0}
	c1 := card{dir: e.newCard("card1"), slot: 1}
	e.serve([]card{c0})
	srv1 := e.serve([]card{c1})
	var lns []net.Listener
	var args []string
	for range 2 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		lns = append(lns, ln)
		args = append(args, "tcp:"+ln.Addr().String())
	}
	e.connectPCSC(append([]string{"--reader", "all"}, args...)...)
	var hosts []*fakehost.Host
	for i, ln := range lns {
		h := fakehost.Accept(t, ln)
		h.Expect(fakehost.TInit)
		h.Expect(fakehost.TReaderRemove)
		h.Expect(fakehost.TReaderAdd)
		if got, want := h.Expect(fakehost.TATR).Payload, directATR(t, fmt.Sprintf("Virtual PCD 00 %02d", i)); !bytes.Equal(got, want) {
			t.Errorf("target %d: ATR %X, want %X", i, got, want)
		}
		hosts = append(hosts, h)
	}
	// Each target answers from its own card: the certificate objects of
	// two `card new` cards differ, so READ BUFFER of the first PKI applet
	// tells them apart.
	read := func(h *fakehost.Host) []byte {
		h.APDU(passthruScript[2])
		return h.APDU(mustHexE2E("8052000002024000"))
	}
	want0 := direct(t, readerName0, passthruScript[2], mustHexE2E("8052000002024000"))[1]
	want1 := direct(t, readerName1, passthruScript[2], mustHexE2E("8052000002024000"))[1]
	if bytes.Equal(want0, want1) {
		t.Fatalf("the two cards answer alike (%X): the test cannot tell them apart", want0)
	}
	if got := read(hosts[0]); !bytes.Equal(got, want0) {
		t.Errorf("target 0 answers %X, want card 0's %X", got, want0)
	}
	if got := read(hosts[1]); !bytes.Equal(got, want1) {
		t.Errorf("target 1 answers %X, want card 1's %X", got, want1)
	}
	srv1.stop()
	hosts[1].Expect(fakehost.TCardRemove)
	if got := read(hosts[0]); !bytes.Equal(got, want0) {
		t.Errorf("target 0 after card 1 left: %X, want %X", got, want0)
	}
}

// TestVscclientMirror: vscclient -p serves its soft card and also sends
// each APDU to the physical card in the first reader, printing the
// commands whose answers differ, with PINs redacted.
func TestVscclientMirror(t *testing.T) {
	e := newEnv(t)
	root, err := pcscdtest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "vscclient")
	build := exec.Command("go", "build", "-o", bin, "./cmd/vscclient")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/vscclient: %v\n%s", err, out)
	}
	e.serve([]card{{dir: e.newCard("physical"), slot: 0}})
	// The soft card has other keys and another PIN, so some answers differ.
	soft := filepath.Join(e.dir, "soft")
	if r := e.vscard("card", "new", "--pin", "11112222", soft); r.code != 0 {
		t.Fatalf("card new: %s", r)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	var out bytes.Buffer
	cmd := exec.Command(bin, "-p", "-e", `db="`+soft+`" use_hw=no soft=(,Soft,CAC,,id,signing,encryption)`, host, port)
	cmd.Env = e.environ()
	cmd.Stdout, cmd.Stderr = &syncWriter{w: &out}, &syncWriter{w: &out}
	stdin, _ := cmd.StdinPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		stdin.Close()
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		if t.Failed() || testing.Verbose() {
			t.Logf("vscclient output:\n%s", lockedString(&out))
		}
	}()
	h := fakehost.Accept(t, ln)
	h.Handshake("Soft")
	h.APDU(passthruScript[0]) // SELECT ACA: the same on both
	h.APDU(passthruScript[1])
	verify := append(mustHexE2E("0020000008"), []byte(testPIN)...)
	if r := h.APDU(verify); !bytes.Equal(r, []byte{0x63, 0xC2}) {
		t.Errorf("VERIFY answered %X, want the soft card's 63 C2", r)
	}
	h.APDU(passthruScript[2])
	readCert := mustHexE2E("8052000002024000")
	h.APDU(readCert)
	deadline := time.Now().Add(10 * time.Second)
	for !bytes.Contains([]byte(lockedString(&out)), []byte("8052000002024000 differs")) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	got := lockedString(&out)
	for _, want := range []string{"mirroring to " + readerName0, "8052000002024000 differs", "00200000 (9 bytes with the PIN not shown) differs"} {
		if !bytes.Contains([]byte(got), []byte(want)) {
			t.Errorf("output lacks %q", want)
		}
	}
	if bytes.Contains([]byte(got), []byte("00A4040007A0000000790300 differs")) {
		t.Errorf("SELECT ACA reported as different")
	}
	if bytes.Contains([]byte(got), []byte(hex.EncodeToString([]byte(testPIN)))) || bytes.Contains([]byte(got), []byte(fmt.Sprintf("%X", testPIN))) {
		t.Errorf("the output shows the PIN")
	}
}

var outMu sync.Mutex

// syncWriter serialises the child's stdout and stderr into one buffer.
type syncWriter struct{ w *bytes.Buffer }

func (s *syncWriter) Write(p []byte) (int, error) {
	outMu.Lock()
	defer outMu.Unlock()
	return s.w.Write(p)
}

func lockedString(b *bytes.Buffer) string {
	outMu.Lock()
	defer outMu.Unlock()
	return b.String()
}

// TestPassthruExclusive: with --exclusive a host program cannot connect
// while the guest uses the card.
func TestPassthruExclusive(t *testing.T) {
	e := newEnv(t)
	e.serve([]card{{dir: e.newCard("card"), slot: 0}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// A --reader that matches both vpcd readers is refused at start.
	if r := e.vscard("connect", "--pcsc", "--no-stdin", "--reader", "Virtual PCD", "tcp:"+ln.Addr().String()); r.code != 2 ||
		!bytes.Contains([]byte(r.out), []byte("ambiguous")) {
		t.Errorf("ambiguous --reader: want exit 2 naming the ambiguity:\n%s", r)
	}
	e.connectPCSC("--exclusive", "tcp:"+ln.Addr().String())
	h := fakehost.Accept(t, ln)
	h.Expect(fakehost.TInit)
	h.Expect(fakehost.TReaderRemove)
	h.Expect(fakehost.TReaderAdd)
	h.Expect(fakehost.TATR)
	if r := h.APDU(passthruScript[0]); !bytes.Equal(r, []byte{0x61, 0x0D}) {
		t.Errorf("SELECT ACA: %X", r)
	}
	pc, err := pcsc.EstablishContext(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Release()
	if k, err := pc.Connect(readerName0, pcsc.ShareShared, pcsc.ProtocolAny); !errors.Is(err, pcsc.ErrSharingViolation) {
		if err == nil {
			k.Disconnect(pcsc.LeaveCard)
		}
		t.Errorf("host connect while the guest holds the card exclusively: %v, want a sharing violation", err)
	}
}
