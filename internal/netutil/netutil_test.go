package netutil

import (
	"io"
	"net"
	"runtime"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// roundTrips plays the vpcd/QEMU pattern: the peer writes a 2-byte header
// and a 10-byte payload in two writes with Nagle on, the responder reads
// all 12 bytes through r and answers with one write. It returns the mean
// round-trip time over n exchanges after a warm-up.
func roundTrips(t *testing.T, peer net.Conn, responder net.Conn, r io.Reader, n int) time.Duration {
	t.Helper()
	peer.(*net.TCPConn).SetNoDelay(false)
	peer.SetDeadline(time.Now().Add(30 * time.Second))
	go func() {
		msg := make([]byte, 12)
		for {
			if _, err := io.ReadFull(r, msg); err != nil {
				return
			}
			if _, err := responder.Write([]byte{0, 2, 0x90, 0x00}); err != nil {
				return
			}
		}
	}()
	hdr, payload, reply := []byte{0, 10}, make([]byte, 10), make([]byte, 4)
	one := func() {
		if _, err := peer.Write(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := peer.Write(payload); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(peer, reply); err != nil {
			t.Fatal(err)
		}
	}
	// TCP starts in quick-ACK mode; get past it, as a long-lived
	// connection to vpcd is.
	for range 20 {
		one()
	}
	start := time.Now()
	for range n {
		one()
	}
	return time.Since(start) / time.Duration(n)
}

func TestLowLatencyDefeatsDelayedACK(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("TCP_QUICKACK is Linux-only")
	}
	peer, card := tcpPair(t)
	ll := LowLatency(card)
	if active, err := QuickAckActive(ll); !active || err != nil {
		t.Fatalf("QuickAckActive = %v, %v", active, err)
	}
	mean := roundTrips(t, peer, card, ll, 50)
	t.Logf("split-write round trip with quick-ACK re-arm: %v", mean)
	// Without the re-arm every exchange waits for the ~40 ms delayed-ACK
	// timer (peers.md §4.1); with it, loopback takes well under 1 ms. The
	// bound leaves room for a loaded machine.
	if mean > 10*time.Millisecond {
		t.Errorf("mean round trip %v: the delayed-ACK stall is back", mean)
	}
	if _, err := QuickAckActive(ll); err != nil {
		t.Errorf("re-arm failed: %v", err)
	}
}

func TestLowLatencyNoDelay(t *testing.T) {
	_, card := tcpPair(t)
	card.(*net.TCPConn).SetNoDelay(false)
	LowLatency(card)
	rc, err := card.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	v, err := getNoDelay(rc)
	if err != nil {
		t.Skip(err)
	}
	if v == 0 {
		t.Error("TCP_NODELAY is off after LowLatency")
	}
}

func TestLowLatencyNonTCP(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	ll := LowLatency(a)
	if active, _ := QuickAckActive(ll); active {
		t.Error("QuickAckActive on a pipe")
	}
	go b.Write([]byte("hi"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(ll, buf); err != nil || string(buf) != "hi" {
		t.Errorf("read through wrapper: %q, %v", buf, err)
	}
	if active, _ := QuickAckActive(a); active {
		t.Error("QuickAckActive on an unwrapped conn")
	}
}

func TestLowLatencyClosed(t *testing.T) {
	peer, card := tcpPair(t)
	ll := LowLatency(card)
	peer.Write([]byte{1})
	buf := make([]byte, 1)
	if _, err := ll.Read(buf); err != nil {
		t.Fatal(err)
	}
	ll.Close()
	if n, err := ll.Read(buf); err == nil || n != 0 {
		t.Errorf("read on closed conn: %d, %v", n, err)
	}
}
