package cac

import (
	"errors"

	"github.com/vscard/vscard/apdu"
	"github.com/vscard/vscard/token"
)

// verify implements VERIFY (INS 20) on the generic path (§4.7). The PIN
// bytes are never logged.
func (c *Card) verify(cmd apdu.Command) apdu.Response {
	// Only the global PIN, reference 00: PIV's P2=80 and the logout form
	// P1=FF are rejected.
	if cmd.P1 != 0 || cmd.P2 != 0 {
		return apdu.Status(apdu.SWWrongParametersP1P2Bits)
	}
	pin := c.tok.PIN()
	if len(cmd.Data) == 0 {
		return c.verifyStatus(pin)
	}

	// libcacard strips every trailing FF (the pad OpenSC and CoolKey
	// add) before handing the PIN to NSS.
	p := cmd.Data
	for len(p) > 0 && p[len(p)-1] == 0xFF {
		p = p[:len(p)-1]
	}
	if c.strict {
		// ...and NUL-terminates it, so an embedded 00 ends the PIN.
		for i, b := range p {
			if b == 0 {
				p = p[:i]
				break
			}
		}
	}

	// The slot is logged out before the attempt, so a failed VERIFY
	// leaves the card logged out.
	c.loggedIn = false
	if pin == nil {
		// No password on the token: NSS accepts anything (§4.7).
		c.loggedIn = true
		return apdu.Status(apdu.SWOK)
	}
	left, err := pin.Verify(p)
	switch {
	case err == nil:
		c.loggedIn = true
		return apdu.Status(apdu.SWOK)
	case c.strict:
		// PK11_Authenticate failure of any kind is 69 85 (§4.7).
		return apdu.Status(apdu.SWConditionsNotSatisfied)
	case errors.Is(err, token.ErrPINBlocked):
		return apdu.Status(apdu.SWAuthBlocked)
	case errors.Is(err, token.ErrPINIncorrect):
		return triesLeft(left)
	default:
		// The token could not check or persist the attempt.
		c.log.Warn("cac: VERIFY: PIN check failed", "err", err)
		return apdu.Status(apdu.SWMemoryFailure)
	}
}

// verifyStatus answers VERIFY without data, the login-state query.
func (c *Card) verifyStatus(pin token.PIN) apdu.Response {
	if c.loggedIn || pin == nil {
		return apdu.Status(apdu.SWOK)
	}
	if c.strict {
		// NSS reports the login count as unknown: 6A 88, or the
		// Windows-compat 63 C3 once the Microsoft applet was probed.
		if c.msftCompat {
			return apdu.Status(apdu.SWVerifyFailed | 3)
		}
		return apdu.Status(apdu.SWReferencedDataNotFound)
	}
	left, _ := pin.TriesLeft()
	if left <= 0 {
		return apdu.Status(apdu.SWAuthBlocked)
	}
	return triesLeft(left)
}

// triesLeft encodes ISO 7816-4's 63 Cx with x = tries left (capped at 15).
// After the last wrong try that is 63 C0; the next VERIFY then gets
// 69 83 from the blocked token.
func triesLeft(left int) apdu.Response {
	return apdu.Status(apdu.SWVerifyFailed | apdu.SW(max(0, min(left, 15))))
}
