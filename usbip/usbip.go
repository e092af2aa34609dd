// Package usbip is a USB/IP server exporting usb.Devices to Linux's
// vhci-hcd (usbip attach). See protocols.md §5.
package usbip

import (
	"context"
	"errors"
	"log/slog"
	"net"

	"github.com/vscard/vscard/usb"
)

// Options configures a Server.
type Options struct {
	Logger *slog.Logger
}

// Server exports devices over USB/IP.
type Server struct {
	log *slog.Logger
}

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

// Add exports dev under busid.
func (s *Server) Add(busid string, dev usb.Device) error {
	return errors.New("usbip: not implemented")
}

// Serve accepts connections on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	return errors.New("usbip: not implemented")
}
