package pcsc

import "fmt"

// Error is a PC/SC return code as pcscd sends it (pcsc-lite's pcsclite.h:
// SCARD_E_*, SCARD_F_*, SCARD_W_*). Compare with errors.Is.
type Error uint32

// Return codes of pcsc-lite (src/PCSC/pcsclite.h.in).
const (
	ErrInternal           Error = 0x80100001 // SCARD_F_INTERNAL_ERROR
	ErrCancelled          Error = 0x80100002 // SCARD_E_CANCELLED
	ErrInvalidHandle      Error = 0x80100003 // SCARD_E_INVALID_HANDLE
	ErrInvalidParameter   Error = 0x80100004 // SCARD_E_INVALID_PARAMETER
	ErrInvalidTarget      Error = 0x80100005 // SCARD_E_INVALID_TARGET
	ErrNoMemory           Error = 0x80100006 // SCARD_E_NO_MEMORY
	ErrWaitedTooLong      Error = 0x80100007 // SCARD_F_WAITED_TOO_LONG
	ErrInsufficientBuffer Error = 0x80100008 // SCARD_E_INSUFFICIENT_BUFFER
	ErrUnknownReader      Error = 0x80100009 // SCARD_E_UNKNOWN_READER
	ErrTimeout            Error = 0x8010000A // SCARD_E_TIMEOUT
	ErrSharingViolation   Error = 0x8010000B // SCARD_E_SHARING_VIOLATION
	ErrNoSmartcard        Error = 0x8010000C // SCARD_E_NO_SMARTCARD
	ErrUnknownCard        Error = 0x8010000D // SCARD_E_UNKNOWN_CARD
	ErrCantDispose        Error = 0x8010000E // SCARD_E_CANT_DISPOSE
	ErrProtoMismatch      Error = 0x8010000F // SCARD_E_PROTO_MISMATCH
	ErrNotReady           Error = 0x80100010 // SCARD_E_NOT_READY
	ErrInvalidValue       Error = 0x80100011 // SCARD_E_INVALID_VALUE
	ErrSystemCancelled    Error = 0x80100012 // SCARD_E_SYSTEM_CANCELLED
	ErrCommError          Error = 0x80100013 // SCARD_F_COMM_ERROR
	ErrUnknownError       Error = 0x80100014 // SCARD_F_UNKNOWN_ERROR
	ErrInvalidATR         Error = 0x80100015 // SCARD_E_INVALID_ATR
	ErrNotTransacted      Error = 0x80100016 // SCARD_E_NOT_TRANSACTED
	ErrReaderUnavailable  Error = 0x80100017 // SCARD_E_READER_UNAVAILABLE
	ErrShutdown           Error = 0x80100018 // SCARD_P_SHUTDOWN
	ErrPCITooSmall        Error = 0x80100019 // SCARD_E_PCI_TOO_SMALL
	ErrReaderUnsupported  Error = 0x8010001A // SCARD_E_READER_UNSUPPORTED
	ErrDuplicateReader    Error = 0x8010001B // SCARD_E_DUPLICATE_READER
	ErrCardUnsupported    Error = 0x8010001C // SCARD_E_CARD_UNSUPPORTED
	ErrNoService          Error = 0x8010001D // SCARD_E_NO_SERVICE
	ErrServiceStopped     Error = 0x8010001E // SCARD_E_SERVICE_STOPPED
	ErrICCInstallation    Error = 0x80100020 // SCARD_E_ICC_INSTALLATION
	ErrICCCreateOrder     Error = 0x80100021 // SCARD_E_ICC_CREATEORDER
	// ErrUnsupportedFeature is pcsc-lite's SCARD_E_UNSUPPORTED_FEATURE,
	// which pcsc-lite defines as 0x8010001F, the value Windows gives
	// SCARD_E_UNEXPECTED (Windows' own is 0x80100022).
	ErrUnsupportedFeature Error = 0x8010001F
	// ErrUnexpected is SCARD_E_UNEXPECTED, the same value in pcsc-lite.
	ErrUnexpected                   = ErrUnsupportedFeature
	ErrDirNotFound            Error = 0x80100023 // SCARD_E_DIR_NOT_FOUND
	ErrFileNotFound           Error = 0x80100024 // SCARD_E_FILE_NOT_FOUND
	ErrNoDir                  Error = 0x80100025 // SCARD_E_NO_DIR
	ErrNoFile                 Error = 0x80100026 // SCARD_E_NO_FILE
	ErrNoAccess               Error = 0x80100027 // SCARD_E_NO_ACCESS
	ErrWriteTooMany           Error = 0x80100028 // SCARD_E_WRITE_TOO_MANY
	ErrBadSeek                Error = 0x80100029 // SCARD_E_BAD_SEEK
	ErrInvalidCHV             Error = 0x8010002A // SCARD_E_INVALID_CHV
	ErrUnknownResMng          Error = 0x8010002B // SCARD_E_UNKNOWN_RES_MNG
	ErrNoSuchCertificate      Error = 0x8010002C // SCARD_E_NO_SUCH_CERTIFICATE
	ErrCertificateUnavailable Error = 0x8010002D // SCARD_E_CERTIFICATE_UNAVAILABLE
	ErrNoReadersAvailable     Error = 0x8010002E // SCARD_E_NO_READERS_AVAILABLE
	ErrCommDataLost           Error = 0x8010002F // SCARD_E_COMM_DATA_LOST
	ErrNoKeyContainer         Error = 0x80100030 // SCARD_E_NO_KEY_CONTAINER
	ErrServerTooBusy          Error = 0x80100031 // SCARD_E_SERVER_TOO_BUSY
	ErrUnsupportedCard        Error = 0x80100065 // SCARD_W_UNSUPPORTED_CARD
	ErrUnresponsiveCard       Error = 0x80100066 // SCARD_W_UNRESPONSIVE_CARD
	ErrUnpoweredCard          Error = 0x80100067 // SCARD_W_UNPOWERED_CARD
	ErrResetCard              Error = 0x80100068 // SCARD_W_RESET_CARD
	ErrRemovedCard            Error = 0x80100069 // SCARD_W_REMOVED_CARD
	ErrSecurityViolation      Error = 0x8010006A // SCARD_W_SECURITY_VIOLATION
	ErrWrongCHV               Error = 0x8010006B // SCARD_W_WRONG_CHV
	ErrCHVBlocked             Error = 0x8010006C // SCARD_W_CHV_BLOCKED
	ErrEOF                    Error = 0x8010006D // SCARD_W_EOF
	ErrCancelledByUser        Error = 0x8010006E // SCARD_W_CANCELLED_BY_USER
	ErrCardNotAuthenticated   Error = 0x8010006F // SCARD_W_CARD_NOT_AUTHENTICATED
)

var errorNames = map[Error]string{
	ErrInternal:               "SCARD_F_INTERNAL_ERROR",
	ErrCancelled:              "SCARD_E_CANCELLED",
	ErrInvalidHandle:          "SCARD_E_INVALID_HANDLE",
	ErrInvalidParameter:       "SCARD_E_INVALID_PARAMETER",
	ErrInvalidTarget:          "SCARD_E_INVALID_TARGET",
	ErrNoMemory:               "SCARD_E_NO_MEMORY",
	ErrWaitedTooLong:          "SCARD_F_WAITED_TOO_LONG",
	ErrInsufficientBuffer:     "SCARD_E_INSUFFICIENT_BUFFER",
	ErrUnknownReader:          "SCARD_E_UNKNOWN_READER",
	ErrTimeout:                "SCARD_E_TIMEOUT",
	ErrSharingViolation:       "SCARD_E_SHARING_VIOLATION",
	ErrNoSmartcard:            "SCARD_E_NO_SMARTCARD",
	ErrUnknownCard:            "SCARD_E_UNKNOWN_CARD",
	ErrCantDispose:            "SCARD_E_CANT_DISPOSE",
	ErrProtoMismatch:          "SCARD_E_PROTO_MISMATCH",
	ErrNotReady:               "SCARD_E_NOT_READY",
	ErrInvalidValue:           "SCARD_E_INVALID_VALUE",
	ErrSystemCancelled:        "SCARD_E_SYSTEM_CANCELLED",
	ErrCommError:              "SCARD_F_COMM_ERROR",
	ErrUnknownError:           "SCARD_F_UNKNOWN_ERROR",
	ErrInvalidATR:             "SCARD_E_INVALID_ATR",
	ErrNotTransacted:          "SCARD_E_NOT_TRANSACTED",
	ErrReaderUnavailable:      "SCARD_E_READER_UNAVAILABLE",
	ErrShutdown:               "SCARD_P_SHUTDOWN",
	ErrPCITooSmall:            "SCARD_E_PCI_TOO_SMALL",
	ErrReaderUnsupported:      "SCARD_E_READER_UNSUPPORTED",
	ErrDuplicateReader:        "SCARD_E_DUPLICATE_READER",
	ErrCardUnsupported:        "SCARD_E_CARD_UNSUPPORTED",
	ErrNoService:              "SCARD_E_NO_SERVICE",
	ErrServiceStopped:         "SCARD_E_SERVICE_STOPPED",
	ErrICCInstallation:        "SCARD_E_ICC_INSTALLATION",
	ErrICCCreateOrder:         "SCARD_E_ICC_CREATEORDER",
	ErrUnsupportedFeature:     "SCARD_E_UNSUPPORTED_FEATURE",
	ErrDirNotFound:            "SCARD_E_DIR_NOT_FOUND",
	ErrFileNotFound:           "SCARD_E_FILE_NOT_FOUND",
	ErrNoDir:                  "SCARD_E_NO_DIR",
	ErrNoFile:                 "SCARD_E_NO_FILE",
	ErrNoAccess:               "SCARD_E_NO_ACCESS",
	ErrWriteTooMany:           "SCARD_E_WRITE_TOO_MANY",
	ErrBadSeek:                "SCARD_E_BAD_SEEK",
	ErrInvalidCHV:             "SCARD_E_INVALID_CHV",
	ErrUnknownResMng:          "SCARD_E_UNKNOWN_RES_MNG",
	ErrNoSuchCertificate:      "SCARD_E_NO_SUCH_CERTIFICATE",
	ErrCertificateUnavailable: "SCARD_E_CERTIFICATE_UNAVAILABLE",
	ErrNoReadersAvailable:     "SCARD_E_NO_READERS_AVAILABLE",
	ErrCommDataLost:           "SCARD_E_COMM_DATA_LOST",
	ErrNoKeyContainer:         "SCARD_E_NO_KEY_CONTAINER",
	ErrServerTooBusy:          "SCARD_E_SERVER_TOO_BUSY",
	ErrUnsupportedCard:        "SCARD_W_UNSUPPORTED_CARD",
	ErrUnresponsiveCard:       "SCARD_W_UNRESPONSIVE_CARD",
	ErrUnpoweredCard:          "SCARD_W_UNPOWERED_CARD",
	ErrResetCard:              "SCARD_W_RESET_CARD",
	ErrRemovedCard:            "SCARD_W_REMOVED_CARD",
	ErrSecurityViolation:      "SCARD_W_SECURITY_VIOLATION",
	ErrWrongCHV:               "SCARD_W_WRONG_CHV",
	ErrCHVBlocked:             "SCARD_W_CHV_BLOCKED",
	ErrEOF:                    "SCARD_W_EOF",
	ErrCancelledByUser:        "SCARD_W_CANCELLED_BY_USER",
	ErrCardNotAuthenticated:   "SCARD_W_CARD_NOT_AUTHENTICATED",
}

// Error gives the pcsc-lite name and the hex code, e.g.
// "pcsc: SCARD_E_TIMEOUT (0x8010000A)".
func (e Error) Error() string {
	if n, ok := errorNames[e]; ok {
		return fmt.Sprintf("pcsc: %s (0x%08X)", n, uint32(e))
	}
	return fmt.Sprintf("pcsc: unknown return code 0x%08X", uint32(e))
}
