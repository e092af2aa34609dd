package emuopts

import (
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/parse.golden.json")

// goldenInputs are option strings from libcacard's tests, QEMU, spice-gtk,
// virt_cacard and vscclient's -c expansion (cac.md §7, protocols.md §2.1),
// plus edge cases of the grammar.
var goldenInputs = []string{
	``,
	`db="sql:/tmp/softdb" use_hw=no soft=(,Test,CAC,,cert1,cert2,cert3)`,
	`db="/etc/pki/nssdb" use_hw=no soft=(,Virtual Reader,CAC,,id-cert,signing-cert,encryption-cert)`,
	`use_hw=no soft=(,Spice Software Smartcard,CAC,,cert1,cert2,cert3)`,
	`db="sql:db" use_hw=removable`,
	`db="/etc/pki/nssdb",soft=(,Virtual Reader,CAC,,id,sign,enc,)`,
	"db=\"sql:/x\"\n use_hw=no\n\tsoft=( slot 1, My Reader, cac, p,  a, b)",
	`nssemul`,
	`passthru`,
	`use_hw=yes hw_type=passthru hw_params=a,b,c`,
	`use_hw=false`,
	`use_hw=False`,
	`use_hw=0`,
	`use_hw=nope`,
	`soft=(,A,CAC,,x) soft=(,B,CAC,,y)`,
}

func TestParseGolden(t *testing.T) {
	type row struct {
		In  string
		Out *Options
	}
	var got []row
	for _, in := range goldenInputs {
		o, err := Parse(in)
		if err != nil {
			t.Fatalf("Parse(%q): %v", in, err)
		}
		got = append(got, row{in, o})
	}
	b, err := json.MarshalIndent(got, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, '\n')
	path := filepath.Join("testdata", "parse.golden.json")
	if *update {
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update once)", err)
	}
	if string(b) != string(want) {
		t.Errorf("parse results differ from %s; got:\n%s", path, b)
	}
}

func TestParseFields(t *testing.T) {
	o, err := Parse(`db="sql:/d" use_hw=no soft=(,Test,CAC,,cert1,cert2,cert3)`)
	if err != nil {
		t.Fatal(err)
	}
	want := &Options{DB: "sql:/d", DBGiven: true, UseHW: HWNo, UseHWGiven: true, HWType: TypeCAC,
		Soft: []Soft{{Reader: "Test", Type: TypeCAC, Certs: []string{"cert1", "cert2", "cert3"}}}}
	if !reflect.DeepEqual(o, want) {
		t.Errorf("got %+v\nwant %+v", o, want)
	}
	d, err := Parse("")
	if err != nil || d.DB != DefaultDB || d.UseHW != HWYes || d.UseHWGiven || d.HWType != TypeCAC {
		t.Errorf("defaults: %+v, %v", d, err)
	}
}

func TestParseUseHW(t *testing.T) {
	for v, want := range map[string]HWMode{
		"no": HWNo, "No": HWNo, "0": HWNo, "False": HWNo, "n": HWNo,
		"false": HWYes, "yes": HWYes, "1": HWYes, "": HWYes,
		"removable": HWRemovable, "removable-ish": HWRemovable,
	} {
		o, err := Parse("use_hw=" + v)
		if err != nil {
			t.Fatalf("use_hw=%s: %v", v, err)
		}
		if o.UseHW != want {
			t.Errorf("use_hw=%s: %v, want %v", v, o.UseHW, want)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`foo`, `Error: Unknown smartcard specification. ("foo")`},
		{`use_hw=no bogus=1`, `Error: Unknown smartcard specification. ("bogus=1")`},
		{`passthrux`, `Error: Unknown smartcard specification. ("passthrux")`},
		{`db=/etc/pki/nssdb`, `you must quote the file path`},
		{`db="/x`, `Error: invalid db argument.`},
		{`db="/a" db="/b"`, `Error: redefinition of db= is not allowed.`},
		{`hw_params=a hw_params=b`, `Error: redefinition of hw_params= is not allowed.`},
		{`hw_type=PIV`, `Error: invalid smartcard type 'PIV'.`},
		{`soft=,Test,CAC,,a)`, `must be followed by '('`},
		{`soft=(,Test,CAC,)`, `ends after the type parameters`},
		{`soft=(,Test)`, `ends after the reader name`},
		{`soft=(,Test,CAC,,a,b`, `missing ')'`},
		{`soft=(,Test,PIV,,a)`, `Error: invalid smartcard type 'PIV'.`},
		{strings.Repeat("soft=(,R,CAC,,a) ", MaxSoft+1), `more than 16 soft=`},
		{`soft=(,R,CAC,,` + strings.Repeat("a,", MaxCerts) + `a)`, `more than 100 certificates`},
	} {
		_, err := Parse(tc.in)
		if err == nil {
			t.Errorf("Parse(%q) accepted", tc.in)
			continue
		}
		if !errors.Is(err, ErrSyntax) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %v, want %q", tc.in, err, tc.want)
		}
	}
}

func TestStringRoundTrip(t *testing.T) {
	for _, in := range goldenInputs {
		o, err := Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		o2, err := Parse(o.String())
		if err != nil {
			t.Fatalf("Parse(String()) of %q = %q: %v", in, o.String(), err)
		}
		if !reflect.DeepEqual(o, o2) {
			t.Errorf("%q: round trip via %q gives %+v, want %+v", in, o.String(), o2, o)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, in := range goldenInputs {
		f.Add(in)
	}
	f.Add(`soft=(`)
	f.Add(`db="`)
	f.Fuzz(func(t *testing.T, s string) {
		o, err := Parse(s)
		if err != nil {
			if o != nil {
				t.Fatal("options with an error")
			}
			return
		}
		if len(o.Soft) > MaxSoft {
			t.Fatalf("%d soft readers", len(o.Soft))
		}
		for _, sc := range o.Soft {
			if len(sc.Certs) == 0 || len(sc.Certs) > MaxCerts {
				t.Fatalf("%d certs", len(sc.Certs))
			}
		}
		o2, err := Parse(o.String())
		if err != nil {
			t.Fatalf("re-parse of %q: %v", o.String(), err)
		}
		if !reflect.DeepEqual(o, o2) {
			t.Fatalf("round trip %q -> %q: %+v != %+v", s, o.String(), o, o2)
		}
	})
}
