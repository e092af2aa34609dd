// Package secret gets passwords and PINs from the user: from a file named
// on the command line, from an environment variable, or by prompting on the
// terminal without echo. The order is fixed (file, then environment, then
// terminal) so a script that sets one never meets a prompt, and a
// non-interactive run with nothing given fails with an error that names all
// three ways instead of hanging on a read.
//
// Secrets are returned as strings because their consumers (PBKDF2 in
// crypto/pbkdf2, go-pkcs12, the card store's PIN check) take strings; the
// package never logs or prints them.
package secret

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/term"
)

// MaxLen bounds a secret, so a wrong --password-file (a disk image, say)
// is refused instead of read whole.
const MaxLen = 1024

// ErrNotGiven is wrapped by Source.Get when no source has the secret.
var ErrNotGiven = errors.New("secret not given")

// notGiven is Get's error when no source has the secret: its text is for
// the user, and it matches ErrNotGiven.
type notGiven string

func (e notGiven) Error() string        { return string(e) }
func (e notGiven) Is(target error) bool { return target == ErrNotGiven }

// errNoInput is readLine's answer at end of input.
var errNoInput = errors.New("no input")

// Terminal reads one secret from the user, without echo on a real
// terminal.
type Terminal interface {
	ReadSecret(prompt string) (string, error)
}

// Stdin returns a Terminal that prompts on prompts and reads from stdin,
// or nil when stdin is not a terminal (the caller then has no
// interactive source).
func Stdin(stdin io.Reader, prompts io.Writer) Terminal {
	f, ok := stdin.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return ttyTerminal{f, prompts}
}

type ttyTerminal struct {
	f *os.File
	w io.Writer
}

func (t ttyTerminal) ReadSecret(prompt string) (string, error) {
	fmt.Fprint(t.w, prompt)
	b, err := term.ReadPassword(int(t.f.Fd()))
	// The user's Enter was not echoed either.
	fmt.Fprintln(t.w)
	if err != nil {
		return "", fmt.Errorf("read from terminal: %w", err)
	}
	if len(b) > MaxLen {
		return "", fmt.Errorf("longer than %d bytes", MaxLen)
	}
	return string(b), nil
}

// NewLineTerminal returns a Terminal that writes prompts to w and reads
// one line from r per secret. It stands in for a terminal where there is
// none (tests, or a caller that knows its input is interactive); it cannot
// turn echo off.
func NewLineTerminal(r io.Reader, w io.Writer) Terminal {
	if w == nil {
		w = io.Discard
	}
	return &lineTerminal{r: bufio.NewReaderSize(r, MaxLen+2), w: w}
}

type lineTerminal struct {
	r *bufio.Reader
	w io.Writer
}

func (t *lineTerminal) ReadSecret(prompt string) (string, error) {
	fmt.Fprint(t.w, prompt)
	return readLine(t.r)
}

// readLine reads one line of at most MaxLen bytes, without its line end.
func readLine(r *bufio.Reader) (string, error) {
	line, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) || len(strings.TrimRight(string(line), "\r\n")) > MaxLen {
		return "", fmt.Errorf("longer than %d bytes", MaxLen)
	}
	if err != nil && !(errors.Is(err, io.EOF) && len(line) > 0) {
		if errors.Is(err, io.EOF) {
			return "", errNoInput
		}
		return "", err
	}
	return strings.TrimRight(string(line), "\r\n"), nil
}

// ReadFile returns the first line of a file, without its line end: the
// format of NSS's `certutil -f` and `pk12util -k/-w` password files, so
// the same file serves both tools. An empty file is the empty secret.
func ReadFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	s, err := readLine(bufio.NewReaderSize(f, MaxLen+2))
	if errors.Is(err, errNoInput) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

// Source says where one secret may come from.
type Source struct {
	// What names the secret in prompts and errors, e.g. "PKCS#12
	// password for id.p12".
	What string
	// File is the value of FileFlag ("" when the flag was not given).
	File     string
	FileFlag string // e.g. "--password-file"
	// EnvVar is the environment variable to look at, e.g.
	// "VSCARD_PASSWORD"; LookupEnv reads it (nil means os.LookupEnv).
	EnvVar    string
	LookupEnv func(string) (string, bool)
	// Terminal prompts when neither File nor EnvVar has the secret; nil
	// means there is no terminal.
	Terminal Terminal
	// Confirm asks twice on the terminal and wants the same answer, for
	// a new secret such as a card PIN.
	Confirm bool
}

// Given reports whether the secret is given non-interactively (by file
// or environment), so a caller may try a default (such as the empty
// PKCS#12 password) before it prompts.
func (s Source) Given() bool {
	if s.File != "" {
		return true
	}
	_, ok := s.lookup()
	return ok
}

func (s Source) lookup() (string, bool) {
	if s.EnvVar == "" {
		return "", false
	}
	look := s.LookupEnv
	if look == nil {
		look = os.LookupEnv
	}
	return look(s.EnvVar)
}

// Get returns the secret from the file, else the environment variable,
// else a terminal prompt. With none of them it returns an error wrapping
// ErrNotGiven that names all three.
func (s Source) Get() (string, error) {
	if s.File != "" {
		v, err := ReadFile(s.File)
		if err != nil {
			return "", fmt.Errorf("read %s from %s: %w", s.What, s.FileFlag, err)
		}
		return v, nil
	}
	if v, ok := s.lookup(); ok {
		if len(v) > MaxLen {
			return "", fmt.Errorf("%s in $%s: longer than %d bytes", s.What, s.EnvVar, MaxLen)
		}
		return v, nil
	}
	if s.Terminal == nil {
		return "", notGiven(fmt.Sprintf("%s not given: use %s FILE, the %s environment variable, or run at a terminal to be prompted", s.What, s.FileFlag, s.EnvVar))
	}
	v, err := s.Terminal.ReadSecret(s.What + ": ")
	if err != nil {
		return "", fmt.Errorf("read %s: %w", s.What, err)
	}
	if s.Confirm {
		again, err := s.Terminal.ReadSecret("Again, to confirm: ")
		if err != nil {
			return "", fmt.Errorf("read %s: %w", s.What, err)
		}
		if again != v {
			return "", fmt.Errorf("%s: the two entries differ", s.What)
		}
	}
	return v, nil
}
