// Package store is vscard's own card store: a directory holding one virtual
// card's certificates, private keys and PIN, which *Card serves as a
// token.Token.
//
// Create makes a card the way QEMU's ccid documentation does with NSS
// certutil (a fake CA and three certificates: identity, signing,
// encryption), Import makes one from existing PEM files, and Open loads a
// card for serving or inspection.
//
// # Layout
//
// A card directory (mode 0700) holds:
//
//	card.json        manifest (0600): format version, card type ("cac"),
//	                 common name, card ID, the credential list in card
//	                 order, the CA files and the PIN hash parameters
//	state.json       PIN retry counter (0600), rewritten atomically
//	id.pem           identity certificate (first on the card)
//	id-key.pem       its private key, PKCS#8 PEM (0600)
//	signing.pem      signing certificate, signing-key.pem its key
//	encryption.pem   encryption certificate, encryption-key.pem its key
//	ca.pem, ca.der   the CA certificate, for import into a guest
//	ca-key.pem       the CA's private key (0600; Create only)
//
// Imported cards name their files cert1.pem, cert1-key.pem, and so on. The
// manifest lists every file by name, so Open never guesses.
//
// # PIV cards
//
// A directory whose manifest says "type": "piv" is a PIV card (CreatePIV,
// ImportPIV, OpenPIV; Type tells the kinds apart, and Open and OpenPIV
// each refuse the other kind with ErrWrongType). *PIVCard implements
// card/piv's Store: the card writes to it (generated keys, PUT DATA, PIN
// changes), so its files are named by what they hold rather than listed
// in the manifest: key-9a.pem (PKCS#8), obj-5fc105 (an object's value),
// pin.json and puk.json (hash and retry counter together, so a PIN
// change is one rename), mgm.json (the card management key). Every write
// is atomic and durable as below; PIN and PUK use the same
// decrement-before-compare code as the CAC PIN.
//
// # Security model
//
// Files holding secrets (keys, the PIN hash, the counter) are created 0600
// inside a 0700 directory, with those modes given at creation, never fixed
// up afterwards. Open refuses a card whose directory or secret files can be
// read or written by group or others, like ssh does with its keys: serving
// such a card would hide that its keys may already be copied. The error
// names the file and the chmod that fixes it.
//
// The PIN is stored only as a salted PBKDF2-HMAC-SHA256 hash (200,000
// iterations, about 50 ms on a 2024 laptop core); the algorithm and its
// parameters are stored beside the hash so they can change. PIN.Verify
// follows a smart card's order of operations: it first decrements and
// durably persists the retry counter (temporary file, fsync, rename, fsync
// of the directory), then compares in constant time, and only then, if the
// PIN was right, restores the counter. A process killed at any point thus
// never gains a free try. A blocked PIN is refused without being checked.
//
// Only the first match in a process pays for PBKDF2: Verify then keeps an
// HMAC of the PIN under a random in-memory key, bound to the stored hash,
// and later checks against that hash compare HMACs (still in constant
// time, still after the durable decrement). A PIV 9C key, which needs a
// VERIFY before every signature, thus costs two fsyncs per signature
// rather than 50 ms of hashing. A changed stored hash means PBKDF2 again.
//
// Within a process a mutex serialises Verify; across processes (two
// "vscard serve" on one card) an advisory flock(2) on the card directory
// does, and the counter is re-read under the lock, so tries are never
// lost. On systems without flock only the in-process mutex applies.
//
// A damaged card (bad JSON, unknown version, missing or unparsable file, a
// key that does not match its certificate, an unreadable counter) is an
// error naming the file and what to do. It is never reset or repaired
// silently, because resetting the counter would unblock the PIN.
package store
