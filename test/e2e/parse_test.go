package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The parsers the end-to-end tests rely on are checked here against real
// tool output captured from vscard (testdata/), so a parser bug cannot
// make an end-to-end assertion pass vacuously. These tests run everywhere.

func golden(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestParseSlots(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		readers []string // of the slots holding tokens
		empty   int
	}{
		{"two cards", golden(t, "pkcs11-tool-L-two-cards.txt"), []string{readerName0, readerName1}, 0},
		{"one card", "Available slots:\nSlot 0 (0x0): Virtual PCD 00 00\n  token label        : X\n  serial num         : 01\nSlot 1 (0x4): Virtual PCD 00 01\n  (empty)\n",
			[]string{readerName0}, 1},
		{"no slots", "Available slots:\nNo slots.\n", nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			slots := parseSlots(tt.in)
			toks := tokens(slots)
			if len(toks) != len(tt.readers) {
				t.Fatalf("%d tokens, want %d: %+v", len(toks), len(tt.readers), slots)
			}
			empty := 0
			for _, s := range slots {
				if s.empty {
					empty++
				}
			}
			if empty != tt.empty {
				t.Errorf("%d empty slots, want %d", empty, tt.empty)
			}
			for i, tok := range toks {
				if tok.reader != tt.readers[i] {
					t.Errorf("token %d in %q, want %q", i, tok.reader, tt.readers[i])
				}
				if !regexp.MustCompile(`^[0-9a-f]+$`).MatchString(tok.fields["serial num"]) {
					t.Errorf("token %d serial %q", i, tok.fields["serial num"])
				}
				if !strings.HasPrefix(tok.id, "0x") {
					t.Errorf("token %d slot id %q", i, tok.id)
				}
			}
		})
	}
	two := tokens(parseSlots(golden(t, "pkcs11-tool-L-two-cards.txt")))
	if two[0].fields["token manufacturer"] != "Common Access Card" || two[0].fields["serial num"] == two[1].fields["serial num"] {
		t.Errorf("fields of the captured two-card listing: %+v", two)
	}
}

func TestParseObjects(t *testing.T) {
	objs := parseObjects(golden(t, "pkcs11-tool-O-login.txt"))
	counts := map[string]int{}
	for _, o := range objs {
		counts[o.kind]++
	}
	for _, kind := range []string{"Certificate", "Public Key", "Private Key"} {
		if counts[kind] != 3 {
			t.Errorf("%d %s objects, want 3 (%v)", counts[kind], kind, objs)
		}
	}
	// Every CAC label appears once per kind, with its ID.
	for _, c := range cacLabels {
		found := 0
		for _, o := range objs {
			if o.label == c.label && o.id == c.id {
				found++
			}
		}
		if found != 3 {
			t.Errorf("%q id %s: %d objects, want 3 (cert, public, private)", c.label, c.id, found)
		}
	}
	short := parseObjects("Certificate Object; type = X.509 cert\n  label:      CAC ID Certificate\n  ID:         0001\n")
	if len(short) != 1 || short[0].kind != "Certificate" || short[0].label != "CAC ID Certificate" || short[0].id != "0001" {
		t.Errorf("parseObjects(one cert) = %v", short)
	}
}

func TestTestOutput(t *testing.T) {
	tests := []struct {
		file     string
		randomOK bool
		errLines []string // substrings, one per reported error line
	}{
		{"pkcs11-tool-test.txt", true, nil},
		{"pkcs11-tool-test-strict.txt", false, []string{"C_GenerateRandom failed: CKR_GENERAL_ERROR", "1 errors"}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			out := golden(t, tt.file)
			if got := randomOK(out); got != tt.randomOK {
				t.Errorf("randomOK = %v, want %v", got, tt.randomOK)
			}
			errs := testErrors(out)
			if len(errs) != len(tt.errLines) {
				t.Fatalf("testErrors = %q, want %d lines", errs, len(tt.errLines))
			}
			for i, want := range tt.errLines {
				if !strings.Contains(errs[i], want) {
					t.Errorf("error line %d = %q, want it to contain %q", i, errs[i], want)
				}
			}
		})
	}
}

func TestP11Error(t *testing.T) {
	tests := []struct{ in, want string }{
		{golden(t, "pkcs11-tool-O-wrong-pin.txt"), "CKR_PIN_INCORRECT"},
		{"error: PKCS11 function C_Login failed: rv = CKR_PIN_LOCKED (0xa4)\nAborting.\n", "CKR_PIN_LOCKED"},
		{"Using slot 0 with a present token (0x0)\n", ""},
	}
	for _, tt := range tests {
		if got := p11Error(tt.in); got != tt.want {
			t.Errorf("p11Error(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestReaderLines(t *testing.T) {
	out := golden(t, "opensc-tool-list-readers.txt")
	var present []string
	for _, line := range strings.Split(out, "\n") {
		if m := readerRe.FindStringSubmatch(line); m != nil && m[1] == "Yes" {
			present = append(present, m[2])
		}
	}
	if strings.Join(present, "|") != readerName0+"|"+readerName1 {
		t.Errorf("present readers %q", present)
	}
	if readerRe.MatchString("Nr.  Card  Features  Name") {
		t.Errorf("header line matched as a reader")
	}
}

func TestNSSNickname(t *testing.T) {
	out := golden(t, "certutil-L.txt")
	for _, c := range cacLabels {
		nick := nssNickname(out, c.label)
		if !strings.HasSuffix(nick, ":"+c.label) || strings.ContainsAny(nick, "\t\n") || strings.HasSuffix(nick, " ") {
			t.Errorf("nssNickname(%q) = %q", c.label, nick)
		}
	}
	// "CAC ID Certificate" must not match a longer label that starts with it.
	if got := nssNickname("T:CAC ID Certificate 2   u,u,u\n", "CAC ID Certificate"); got != "" {
		t.Errorf("prefix label matched: %q", got)
	}
}
