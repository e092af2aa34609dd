package nss

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// coldChildEnv marks the child process of BenchmarkOpenLoadCold.
const coldChildEnv = "VSCARD_NSS_COLD_CHILD"

// TestOpenLoadChild is not a test: it is the child process of
// BenchmarkOpenLoadCold, and skips unless that benchmark started it.
func TestOpenLoadChild(t *testing.T) {
	if os.Getenv(coldChildEnv) != "1" {
		t.Skip("helper process of BenchmarkOpenLoadCold")
	}
	t0 := time.Now()
	db, err := Open("sql:"+testDB, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Token([]string{"cert1", "cert2", "cert3"}); err != nil {
		t.Fatal(err)
	}
	d := time.Since(t0)
	db.Close()
	fmt.Printf("COLD-OPEN-LOAD-US %d\n", d.Microseconds())
}

// BenchmarkOpenLoadCold measures a card start the way vscclient makes one
// (issue 4's target: under 50 ms cold): each iteration is a fresh process
// that opens the libcacard test database and loads its three certificates
// and keys, the first time that process touches sqlite or the NSS code.
// median-ms is that time as the child measured it, without the process
// start; ns/op includes the start.
func BenchmarkOpenLoadCold(b *testing.B) {
	var ms []float64
	for b.Loop() {
		cmd := exec.Command(os.Args[0], "-test.run=^TestOpenLoadChild$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), coldChildEnv+"=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("child: %v\n%s", err, out)
		}
		us, ok := coldMicros(out)
		if !ok {
			b.Fatalf("child printed no COLD-OPEN-LOAD-US line:\n%s", out)
		}
		ms = append(ms, float64(us)/1e3)
	}
	slices.Sort(ms)
	b.ReportMetric(ms[len(ms)/2], "median-ms")
}

// coldMicros finds the child's measurement in its output.
func coldMicros(out []byte) (int64, bool) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "COLD-OPEN-LOAD-US "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}
