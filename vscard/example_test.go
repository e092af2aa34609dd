package vscard_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/vscard/vscard/card"
	"github.com/vscard/vscard/vscard"
)

func ExampleClient() {
	// Serve a card to QEMU's ccid-card-passthru listening on a TCP port:
	//
	//	-chardev socket,id=ccid,host=127.0.0.1,port=35970,server=on,wait=off,nodelay=on
	//	-device usb-ccid -device ccid-card-passthru,chardev=ccid
	var d net.Dialer
	dial := func(ctx context.Context) (net.Conn, error) {
		return d.DialContext(ctx, "tcp", "127.0.0.1:35970")
	}
	var c card.Card // e.g. cac.New(tok, cac.Options{})
	cl := vscard.NewClient(dial, c, &vscard.ClientOptions{ReaderName: "vscard", QEMU54Workaround: true})
	// Run until SIGINT/SIGTERM: then the card and reader are removed
	// cleanly before the connection closes.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := cl.Run(ctx); err != nil {
		fmt.Println(err)
	}
}
