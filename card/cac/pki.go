package cac

import (
	"bytes"
	"compress/zlib"
	"context"
	"errors"
	"fmt"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/tlv"
	"github.com/vscard/vscard/token"
)

var errFileTooLarge = errors.New("buffer longer than a CAC file can hold")

// pkiApplet is PKI applet n: one certificate and its RSA key (§3, §5.3).
type pkiApplet struct {
	bufApplet
	key     token.RawRSA
	modSize int

	// sign holds the chained SIGN/DECRYPT input (§4.6). Only modSize
	// bytes are ever kept: a longer total fails with 69 84 anyway, so
	// storing it would only let a host grow memory without bound.
	sign    []byte
	signLen int
}

// pkiFiles builds the certificate container (§5.3): CertInfo, the
// certificate, an empty MSCUID and an empty error detection code.
//
// Strict mode stores the DER uncompressed (CertInfo 00), as libcacard does.
// Default mode stores it zlib-compressed with CertInfo 01, as real CAC
// cards do. Debian 12's CoolKey 1.1.0-16 needs that: for a CAC v2 card (one
// with a CCC) it takes the tag-70 value alone and always passes it to
// zlib's uncompress(), so an uncompressed certificate fails with "Corrupted
// compressed CAC Cert" and no certificate is listed (peers.md appendix on
// CoolKey; seen in its loadCACCert with a debugger). OpenSC inflates
// CertInfo 01 itself (card-cac.c, (CertInfo & 3) == 1).
func (c *Card) pkiFiles(der []byte) (t, v []byte, err error) {
	if c.strict {
		return splitFile(
			tlv.Simple{Tag: 0x71, Value: []byte{0x00}},
			tlv.Simple{Tag: 0x70, Value: der},
			tlv.Simple{Tag: 0x72},
			tlv.Simple{Tag: 0xFE},
		)
	}
	// Each empty stored block makes the compressed form a few bytes
	// longer without changing what it inflates to; use them to keep the
	// V-buffer off the lengths QEMU 7.2 cannot carry (qemu54Risk).
	for pad := 0; pad < 4; pad++ {
		cert, err := deflate(der, pad)
		if err != nil {
			return nil, nil, err
		}
		t, v, err = splitFile(
			tlv.Simple{Tag: 0x71, Value: []byte{0x01}},
			tlv.Simple{Tag: 0x70, Value: cert},
			tlv.Simple{Tag: 0x72},
			tlv.Simple{Tag: 0xFE},
		)
		if err != nil || !qemu54Risk(len(v)-2) {
			return t, v, err
		}
	}
	return t, v, nil
}

// deflate compresses a certificate into the zlib format (RFC 1950) that
// both CoolKey's uncompress() and OpenSC's inflate accept, with pad empty
// stored blocks (sync flushes) before the end.
func deflate(der []byte, pad int) ([]byte, error) {
	var b bytes.Buffer
	w, err := zlib.NewWriterLevel(&b, zlib.BestCompression)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(der); err != nil {
		return nil, fmt.Errorf("cac: compress certificate: %w", err)
	}
	for range pad {
		if err := w.Flush(); err != nil {
			return nil, fmt.Errorf("cac: compress certificate: %w", err)
		}
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("cac: compress certificate: %w", err)
	}
	return b.Bytes(), nil
}

func newPKIApplet(c *Card, n int, der []byte, modSize int, key token.RawRSA) (*pkiApplet, error) {
	// 3 bytes of other values plus the DER must fit a 16-bit length.
	if len(der) > tlv.MaxSimpleLen-3 {
		return nil, errFileTooLarge
	}
	t, v, err := c.pkiFiles(der)
	if err != nil {
		return nil, err
	}
	coid := [2]byte{0x01, byte(n)}
	p := &pkiApplet{
		bufApplet: bufApplet{c: c, kind: kindPKI, aid: gsc(0x01, byte(n)), coids: [][2]byte{coid}, t: t, v: v},
		key:       key,
		modSize:   modSize,
		sign:      make([]byte, 0, modSize),
	}
	p.fci = fci(p.aid)
	// Key size byte is bits/64; libcacard leaves 10 when it cannot tell.
	ks := byte(0x10)
	if bits := modSize * 8; bits > 0 {
		ks = byte(bits / 64)
	}
	obj := el(0x51, el(0x41, coid[:]), bufferProps(0x00, len(t), len(v)),
		el(0x43, []byte{0x06, ks, 0x01, 0x01}), el(0x26, []byte{0x01}))
	p.setProps(stdProps(appletInfo, obj), longExtras...)
	return p, nil
}

// Select clears the partial SIGN input, as libcacard's PKI reset hook does.
func (p *pkiApplet) Select(int) []byte {
	p.resetSign()
	return p.fci
}

func (p *pkiApplet) resetSign() {
	p.sign = p.sign[:0]
	p.signLen = 0
}

func (p *pkiApplet) Handle(ctx context.Context, ch int, cmd apdu.Command) (apdu.Response, bool, error) {
	switch cmd.INS {
	case insUpdateBuffer:
		return apdu.Status(apdu.SWConditionsNotSatisfied), true, nil
	case insSignDecrypt:
		r, err := p.signDecrypt(ctx, cmd)
		return r, true, err
	}
	return p.bufApplet.Handle(ctx, ch, cmd)
}

// signDecrypt implements INS 42 (§4.6): P1=80 appends, P1=00 appends and
// runs the raw private-key operation on exactly modulus-length input.
func (p *pkiApplet) signDecrypt(ctx context.Context, cmd apdu.Command) (apdu.Response, error) {
	if cmd.P2 != 0 {
		// Checked before anything is appended: the buffer survives.
		return apdu.Status(apdu.SWIncorrectP1P2), nil
	}
	if room := p.modSize - len(p.sign); room > 0 {
		p.sign = append(p.sign, cmd.Data[:min(room, len(cmd.Data))]...)
	}
	p.signLen += len(cmd.Data)
	switch cmd.P1 {
	case 0x80:
		return apdu.Status(apdu.SWOK), nil
	case 0x00:
	default:
		p.resetSign()
		return apdu.Status(apdu.SWIncorrectP1P2), nil
	}
	defer p.resetSign()
	// The key is looked up (and needs a login) before the length check.
	if !p.c.mayUseKeys() {
		return apdu.Status(apdu.SWConditionsNotSatisfied), nil
	}
	if p.signLen != p.modSize {
		return apdu.Status(apdu.SWDataInvalid), nil
	}
	out, err := p.key.RawRSA(ctx, p.sign)
	if err != nil {
		if ctx.Err() != nil {
			return apdu.Response{}, err
		}
		if !errors.Is(err, token.ErrInputRange) {
			p.c.log.Warn("cac: raw RSA failed", "applet", p.aid[6], "err", err)
		}
		// Input not below the modulus, or a token failure: NSS's bad
		// data / general error mapping (§4.6).
		return apdu.Status(apdu.SWDataInvalid), nil
	}
	return apdu.OK(out), nil
}
