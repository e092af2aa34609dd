package vpcd_test

import (
	"context"
	"log/slog"
	"os"
	"os/signal"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/vpcd"
)

// Serve a card in pcscd's "Virtual PCD 00 01" reader (slot 1) until
// interrupted, tracing APDUs to standard error. (Compiled, not run: it
// needs a pcscd.)
func ExampleServe() {
	var c card.Card // card/cac's card, say
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	err := vpcd.Serve(ctx, "127.0.0.1:35964", c, &vpcd.Options{
		Logger: slog.Default(),
		Trace:  vpcd.JSONTrace(os.Stderr),
	})
	if err != nil {
		slog.Error("vpcd", "err", err)
	}
}
