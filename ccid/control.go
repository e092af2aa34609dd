package ccid

import (
	"context"
	"encoding/binary"

	"github.com/vscard/vscard/usb"
)

// CCID class requests (CCID 1.1 §5.3).
const (
	reqAbort               = 0x01
	reqGetClockFrequencies = 0x02
	reqGetDataRates        = 0x03
)

// Control implements usb.Device: the standard requests of USB 2.0 §9.4 that
// a full-speed device with one configuration needs, and the CCID class
// requests. Anything else STALLs.
func (r *Reader) Control(ctx context.Context, s usb.Setup, data []byte) ([]byte, error) {
	out, err := r.control(s)
	if err != nil {
		r.log.Debug("ccid: control request stalled", "type", s.RequestType, "request", s.Request, "value", s.Value, "index", s.Index)
		return nil, err
	}
	if s.In() && len(out) > int(s.Length) {
		out = out[:s.Length] // the host asked for less (the 9-byte configuration header first)
	}
	return out, nil
}

func (r *Reader) control(s usb.Setup) ([]byte, error) {
	switch s.RequestType & 0x60 {
	case 0x00:
		return r.standard(s)
	case 0x20:
		return r.class(s)
	}
	return nil, usb.ErrStall
}

func (r *Reader) standard(s usb.Setup) ([]byte, error) {
	recipient := s.RequestType & 0x1F
	switch {
	case s.RequestType == 0x80 && s.Request == usb.ReqGetDescriptor:
		var d []byte
		switch s.Value >> 8 {
		case 0x01:
			d = r.deviceDescriptor()
		case 0x02:
			if s.Value&0xFF == 0 {
				d = r.config
			}
		case 0x03:
			d = r.stringDescriptor(uint8(s.Value))
		}
		// DEVICE_QUALIFIER and OTHER_SPEED stall, as they must for a
		// bcdUSB 1.10 device; so do BOS and unknown types.
		if d == nil {
			return nil, usb.ErrStall
		}
		return append([]byte(nil), d...), nil

	case s.RequestType == 0x00 && s.Request == usb.ReqSetAddress:
		// Transports usually handle the address; accepting it is harmless.
		return nil, nil

	case s.RequestType == 0x00 && s.Request == usb.ReqSetConfiguration:
		if s.Value > 1 {
			return nil, usb.ErrStall
		}
		r.mu.Lock()
		r.configured = uint8(s.Value)
		clear(r.halted)
		if s.Value == 1 {
			// libccid's first interrupt read wants the present state.
			r.notify = true
		}
		r.broadcast()
		r.mu.Unlock()
		return nil, nil

	case s.RequestType == 0x80 && s.Request == usb.ReqGetConfiguration:
		r.mu.Lock()
		defer r.mu.Unlock()
		return []byte{r.configured}, nil

	case s.RequestType == 0x01 && s.Request == usb.ReqSetInterface:
		if s.Index != 0 || s.Value != 0 {
			return nil, usb.ErrStall
		}
		return nil, nil

	case s.RequestType == 0x81 && s.Request == usb.ReqGetInterface:
		if s.Index != 0 {
			return nil, usb.ErrStall
		}
		return []byte{0}, nil

	case s.In() && s.Request == usb.ReqGetStatus:
		switch recipient {
		case 0: // device: bus powered, remote wake-up off
			return []byte{0, 0}, nil
		case 1:
			if s.Index != 0 {
				return nil, usb.ErrStall
			}
			return []byte{0, 0}, nil
		case 2:
			ep := uint8(s.Index)
			if !validEndpoint(ep) {
				return nil, usb.ErrStall
			}
			r.mu.Lock()
			defer r.mu.Unlock()
			if r.halted[ep] {
				return []byte{1, 0}, nil
			}
			return []byte{0, 0}, nil
		}

	case !s.In() && (s.Request == usb.ReqClearFeature || s.Request == usb.ReqSetFeature):
		set := s.Request == usb.ReqSetFeature
		switch {
		case recipient == 2 && s.Value == 0: // ENDPOINT_HALT
			ep := uint8(s.Index)
			if ep&0x7F == 0 {
				return nil, nil // endpoint 0 cannot stay halted
			}
			if !validEndpoint(ep) {
				return nil, usb.ErrStall
			}
			r.mu.Lock()
			if set {
				r.halted[ep] = true
			} else {
				delete(r.halted, ep)
				if ep == epBulkOut {
					// The host restarts the pipe: a message it was
					// sending in pieces will not be continued.
					r.outBuf = nil
				}
			}
			r.broadcast()
			r.mu.Unlock()
			return nil, nil
		case recipient == 0 && s.Value == 1 && !set: // DEVICE_REMOTE_WAKEUP off: it is never on
			return nil, nil
		}
	}
	return nil, usb.ErrStall
}

func validEndpoint(ep uint8) bool {
	switch ep {
	case 0x00, 0x80, epIntrIn, epBulkIn, epBulkOut:
		return true
	}
	return false
}

// class serves the CCID class requests (CCID 1.1 §5.3), addressed to
// interface 0.
func (r *Reader) class(s usb.Setup) ([]byte, error) {
	if s.RequestType&0x1F != 1 || s.Index != 0 {
		return nil, usb.ErrStall
	}
	switch {
	case s.RequestType == 0x21 && s.Request == reqAbort:
		// wValue: bSlot in the low byte and in the high byte the bSeq
		// of the bulk Abort that follows (§5.3.1). Whatever runs on the
		// slot is cancelled and answers CMD_ABORTED.
		slot, seq := int(s.Value&0xFF), byte(s.Value>>8)
		if slot >= len(r.slots) {
			return nil, usb.ErrStall
		}
		r.mu.Lock()
		sl := r.slots[slot]
		sl.abortSeq = int(seq)
		if sl.busy && sl.cancel != nil {
			sl.cancel()
		}
		r.mu.Unlock()
		return nil, nil
	case s.RequestType == 0xA1 && s.Request == reqGetClockFrequencies:
		// bNumClockSupported is 0: the default clock is the only one.
		return binary.LittleEndian.AppendUint32(nil, defaultClockKHz), nil
	case s.RequestType == 0xA1 && s.Request == reqGetDataRates:
		return binary.LittleEndian.AppendUint32(nil, defaultDataRate), nil
	}
	return nil, usb.ErrStall
}
