package secret

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestGet(t *testing.T) {
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pwFile := file("pw", "from-file\nsecond line ignored\n")
	crlf := file("crlf", "dos\r\n")
	empty := file("empty", "")
	long := file("long", strings.Repeat("x", MaxLen+1))
	vars := env(map[string]string{"PW": "from-env"})
	tests := []struct {
		name    string
		src     Source
		tty     string // nil Terminal when ""
		want    string
		wantErr string
	}{
		{"file first", Source{File: pwFile, EnvVar: "PW", LookupEnv: vars}, "from-tty\n", "from-file", ""},
		{"file with CRLF", Source{File: crlf}, "", "dos", ""},
		{"empty file is empty secret", Source{File: empty}, "", "", ""},
		{"file too long", Source{File: long, FileFlag: "--password-file"}, "", "", "longer than 1024"},
		{"missing file", Source{File: filepath.Join(dir, "nope"), FileFlag: "--password-file"}, "", "", "--password-file"},
		{"env before terminal", Source{EnvVar: "PW", LookupEnv: vars}, "from-tty\n", "from-env", ""},
		{"terminal last", Source{EnvVar: "OTHER", LookupEnv: vars}, "from-tty\n", "from-tty", ""},
		{"terminal at EOF", Source{EnvVar: "OTHER", LookupEnv: vars}, "", "", ""},
		{"confirm matches", Source{Confirm: true}, "1234\n1234\n", "1234", ""},
		{"confirm differs", Source{Confirm: true}, "1234\n4321\n", "", "differ"},
		{"nothing given", Source{What: "PKCS#12 password for a.p12", FileFlag: "--password-file", EnvVar: "OTHER", LookupEnv: vars}, "", "",
			"PKCS#12 password for a.p12 not given: use --password-file FILE, the OTHER environment variable, or run at a terminal"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var prompts bytes.Buffer
			if tt.tty != "" || tt.name == "terminal at EOF" {
				tt.src.Terminal = NewLineTerminal(strings.NewReader(tt.tty), &prompts)
			}
			got, err := tt.src.Get()
			if tt.name == "terminal at EOF" {
				if err == nil || !strings.Contains(err.Error(), "no input") {
					t.Fatalf("got %q, %v; want a no-input error", got, err)
				}
				return
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %q, %v; want error containing %q", got, err, tt.wantErr)
				}
				if tt.name == "nothing given" && !errors.Is(err, ErrNotGiven) {
					t.Fatalf("%v does not wrap ErrNotGiven", err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
			// The secret never reaches the prompt stream.
			if tt.want != "" && strings.Contains(prompts.String(), tt.want) {
				t.Fatalf("secret echoed in prompts %q", prompts.String())
			}
		})
	}
}

func TestGiven(t *testing.T) {
	vars := env(map[string]string{"PW": ""})
	if !(Source{File: "x"}).Given() || !(Source{EnvVar: "PW", LookupEnv: vars}).Given() {
		t.Fatal("file or set variable (even empty) should count as given")
	}
	if (Source{EnvVar: "NOPE", LookupEnv: vars, Terminal: NewLineTerminal(strings.NewReader("x\n"), nil)}).Given() {
		t.Fatal("a terminal alone is not given")
	}
}

func TestStdinNotTerminal(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if Stdin(f, nil) != nil || Stdin(strings.NewReader(""), nil) != nil {
		t.Fatal("Stdin returned a terminal for a non-terminal")
	}
}
