package apdu

// Redact returns a copy of a command APDU that is safe to log or trace:
// for commands whose data field carries PIN or PUK bytes (VERIFY 20,
// CHANGE REFERENCE DATA 24, RESET RETRY COUNTER 2C, under any CLA) it keeps
// only the 4-byte header and reports how many bytes it dropped. Other
// commands are copied whole. vscard never logs PINs, so every transport
// trace goes through here.
func Redact(cmd []byte) (kept []byte, redacted int) {
	if len(cmd) > 4 {
		switch cmd[1] {
		case 0x20, 0x24, 0x2C:
			return append([]byte(nil), cmd[:4]...), len(cmd) - 4
		}
	}
	return append([]byte(nil), cmd...), 0
}
