// Package e2e holds vscard's end-to-end tests: the vscard binary serves cards
// to a real pcscd through vsmartcard's vpcd, and the peers users run —
// OpenSC (opensc-tool, pkcs11-tool, opensc-pkcs11.so), CoolKey's PKCS#11
// module, NSS (modutil, certutil) and openssl — talk to it through PC/SC.
//
// The tests skip unless VSCARD_E2E=1, which scripts/with-pcscd sets after it
// has started a private pcscd in its own mount namespace (peers.md, appendix
// "running a private pcscd"). Once it is set, a missing tool is a failure, not
// a skip: a green run must mean the peers were really exercised.
//
//	scripts/with-pcscd go test -v ./test/e2e/
//
// The package has no non-test code; this file only carries the documentation.
package e2e
