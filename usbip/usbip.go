// Package usbip is a USB/IP server: it exports usb.Devices so that a Linux
// machine attaches them with `usbip attach` and its kernel's vhci-hcd sees
// them as local USB devices (protocols.md §5).
//
// # Model
//
// A connection starts in the operation phase: the client asks for the
// device list (OP_REQ_DEVLIST, answered, then the connection closes) or
// imports one device by bus id (OP_REQ_IMPORT). An imported device is
// busy until that connection closes; closing it is the detach, after which
// the device is Reset. After a successful import the connection carries
// URBs: CMD_SUBMIT and CMD_UNLINK from the client, RET_SUBMIT and
// RET_UNLINK from the server.
//
// The server keeps one FIFO queue and one goroutine per endpoint (endpoint 0
// being one queue for both directions), so transfers on an endpoint
// complete in the order the client submitted them while different
// endpoints proceed independently: a bulk IN URB waiting for a CCID
// response, or an interrupt IN URB waiting for a slot change, is how the
// device NAKs, and must not hold up the bulk OUT that carries the next
// command. UNLINK cancels the ctx of the device call serving a URB; its
// RET_SUBMIT is then never sent (vhci-hcd drops the connection on a
// RET_SUBMIT for a seqnum it no longer knows). Data an IN call returns for
// a URB unlinked at that instant is kept for the next URB on that endpoint,
// so a device never loses a response.
//
// Every PDU is checked before anything is allocated for it; a PDU that
// breaks framing (unknown command, absurd length, wrong devid) ends the
// connection with a log line, the way Linux's own stub driver does.
package usbip

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"

	"github.com/vscard/vscard/internal/netutil"
	"github.com/vscard/vscard/usb"
)

// Options configures a Server.
type Options struct {
	// Logger receives connection and protocol events; nil discards them.
	Logger *slog.Logger
}

// Server exports devices over USB/IP. Its methods may be called from
// several goroutines.
type Server struct {
	log *slog.Logger

	mu   sync.Mutex
	devs []*export
}

// export is one device the server offers.
type export struct {
	busid          string
	dev            usb.Device
	busnum, devnum uint32
	inUse          bool // imported by a live connection
}

// devid is how the client addresses the device in URB headers (Linux
// vhci-hcd: busnum<<16 | devnum from the import reply).
func (e *export) devid() uint32 { return e.busnum<<16 | e.devnum }

// NewServer returns a Server with no devices.
func NewServer(opts *Options) *Server {
	s := &Server{}
	if opts != nil {
		s.log = opts.Logger
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	return s
}

// Add exports dev under busid, e.g. "1-1". The bus number announced is the
// number before the first '-' when there is one (else 1); device numbers
// count from 2 in the order devices are added, as devnum 1 is a root hub's.
func (s *Server) Add(busid string, dev usb.Device) error {
	if dev == nil {
		return errors.New("usbip: add: nil device")
	}
	// busid travels NUL-terminated in a 32-byte field and names a sysfs
	// directory on the Linux side: keep it printable and slash-free.
	if busid == "" || len(busid) >= busIDLen {
		return fmt.Errorf("usbip: add: bus id %q must be 1..%d bytes", busid, busIDLen-1)
	}
	for _, c := range []byte(busid) {
		if c <= ' ' || c >= 0x7f || c == '/' {
			return fmt.Errorf("usbip: add: bus id %q has a character that is not printable ASCII or is '/'", busid)
		}
	}
	busnum := uint32(1)
	if i := strings.IndexByte(busid, '-'); i > 0 {
		if n, err := strconv.ParseUint(busid[:i], 10, 16); err == nil && n > 0 {
			busnum = uint32(n)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.devs {
		if e.busid == busid {
			return fmt.Errorf("usbip: add: bus id %q already exported", busid)
		}
	}
	s.devs = append(s.devs, &export{busid: busid, dev: dev, busnum: busnum, devnum: uint32(len(s.devs) + 2)})
	return nil
}

// Serve accepts USB/IP clients on ln until ctx ends, then closes ln and
// every connection (detaching imported devices) and returns nil. It
// returns an Accept error that is not due to ctx.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	var wg sync.WaitGroup
	defer func() {
		// Also on an Accept error: serving ends, so every connection ends
		// (its device detached) before Serve returns.
		stop()
		cancel()
		wg.Wait()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("usbip: accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(ctx, c)
		}()
	}
}

// serveConn runs one client connection to its end.
func (s *Server) serveConn(ctx context.Context, c net.Conn) {
	log := s.log.With("remote", c.RemoteAddr().String())
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	defer c.Close()
	conn := netutil.LowLatency(c)

	// No deadline for the operation request: QEMU's guestfwd (the way a
	// guest on user networking reaches a host port) connects once when QEMU
	// starts, and the guest's usbip tool speaks on it only after boot.
	var hb [opHeaderLen]byte
	if _, err := io.ReadFull(conn, hb[:]); err != nil {
		log.Debug("usbip: no operation request", "err", err)
		return
	}
	h, _ := parseOpHeader(hb[:])
	if h.Version != version {
		// The Linux tool and usbipd refuse any other version too.
		log.Warn("usbip: unsupported protocol version; closing", "version", fmt.Sprintf("%#04x", h.Version))
		return
	}
	switch h.Code {
	case opReqDevlist:
		if _, err := conn.Write(s.devlist()); err != nil {
			log.Debug("usbip: write device list", "err", err)
		}
		log.Debug("usbip: device list sent")
	case opReqImport:
		var bb [busIDLen]byte
		if _, err := io.ReadFull(conn, bb[:]); err != nil {
			log.Debug("usbip: read import request", "err", err)
			return
		}
		busid := cString(bb[:])
		e, st := s.claim(busid)
		if st != stOK {
			log.Info("usbip: import refused", "busid", busid, "status", st)
			_, _ = conn.Write(opHeader{Version: version, Code: opRepImport, Status: st}.append(nil))
			return
		}
		defer s.release(e)
		rep := opHeader{Version: version, Code: opRepImport}.append(make([]byte, 0, opHeaderLen+deviceLen))
		rep = e.record().append(rep)
		if _, err := conn.Write(rep); err != nil {
			log.Debug("usbip: write import reply", "err", err)
			return
		}
		log = log.With("busid", busid)
		log.Info("usbip: device imported")
		err := runSession(ctx, conn, e.dev, e.devid(), log)
		log.Info("usbip: device detached", "reason", err)
	default:
		log.Warn("usbip: unknown operation; closing", "code", fmt.Sprintf("%#04x", h.Code))
	}
}

// claim marks the device with busid imported, or says why it cannot be.
func (s *Server) claim(busid string) (*export, uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.devs {
		if e.busid != busid {
			continue
		}
		if e.inUse {
			return nil, stBusy
		}
		e.inUse = true
		return e, stOK
	}
	return nil, stNoDev
}

// release is the detach: the device returns to its state before attach
// (a port reset, usb.Device.Reset) and can be imported again.
func (s *Server) release(e *export) {
	e.dev.Reset()
	s.mu.Lock()
	e.inUse = false
	s.mu.Unlock()
}

// record is the device record of e, from its usb.Info.
func (e *export) record() deviceRecord {
	info := e.dev.Info()
	speed := info.Speed
	if speed == usb.SpeedUnknown {
		speed = usb.SpeedFull // usb.Device's model is a full-speed device
	}
	return deviceRecord{
		// Shaped like a sysfs path as usbipd reports it; the client only
		// prints it.
		Path:               "/sys/devices/platform/vscard/usb" + strconv.FormatUint(uint64(e.busnum), 10) + "/" + e.busid,
		BusID:              e.busid,
		BusNum:             e.busnum,
		DevNum:             e.devnum,
		Speed:              uint32(speed),
		VendorID:           info.VendorID,
		ProductID:          info.ProductID,
		BCDDevice:          info.BCDDevice,
		Class:              info.Class,
		SubClass:           info.SubClass,
		Protocol:           info.Protocol,
		ConfigurationValue: info.ConfigurationValue,
		NumConfigurations:  max(info.NumConfigurations, 1),
		NumInterfaces:      uint8(min(len(mainInterfaces(info)), 255)),
	}
}

// devlist is the whole OP_REP_DEVLIST: header, count, then each device
// record followed by its interfaces' class triples (protocols.md §5).
// Imported devices are listed too, as usbipd lists them.
func (s *Server) devlist() []byte {
	s.mu.Lock()
	devs := append([]*export(nil), s.devs...)
	s.mu.Unlock()
	b := opHeader{Version: version, Code: opRepDevlist}.append(nil)
	b = append(b, byte(len(devs)>>24), byte(len(devs)>>16), byte(len(devs)>>8), byte(len(devs)))
	for _, e := range devs {
		rec := e.record()
		b = rec.append(b)
		for _, it := range mainInterfaces(e.dev.Info())[:rec.NumInterfaces] {
			b = append(b, it.Class, it.SubClass, it.Protocol, 0)
		}
	}
	return b
}

// mainInterfaces lists each interface once (its alternate setting 0):
// bNumInterfaces counts interfaces, not alternate settings.
func mainInterfaces(info usb.Info) []usb.Interface {
	var out []usb.Interface
	for _, it := range info.Interfaces {
		if it.AltSetting == 0 {
			out = append(out, it)
		}
	}
	return out
}
