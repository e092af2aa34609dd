// Package usbredir serves a usb.Device over the usbredir protocol, playing
// its "usb-host" role (the device side) towards QEMU's usb-redir device,
// which plays "usb-guest" (protocols.md §6).
package usbredir

import (
	"context"
	"errors"
	"log/slog"
	"net"

	"github.com/vscard/vscard/usb"
)

// Options configures Serve.
type Options struct {
	Logger *slog.Logger // nil: discard
}

// Serve serves dev to one peer on conn until the peer disconnects or ctx
// ends (then device_disconnect is sent and flushed).
func Serve(ctx context.Context, conn net.Conn, dev usb.Device, opts *Options) error {
	_ = ctx
	_ = conn
	_ = dev
	_ = opts
	return errors.New("usbredir: not implemented")
}
