package shellflip

// The control-socket protocol of cloudflare/shellflip 2.x
// (src/restart_coordination_socket.rs), so that Go and Rust processes can
// restart each other: a 4-byte big-endian payload length (tokio_util's
// LengthDelimitedCodec), then serde_json of the RestartMessage enum, one of
// the three payloads at msgKind. The encoders write serde_json's bytes
// exactly; the decoder, a small tokenizer rather than encoding/json so as to
// be easy to audit, accepts exactly what serde_json::from_slice accepts.

import (
	"encoding/binary"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// maxFrameLen is the largest payload readFrame accepts and the encoders
// produce: a bound on what a peer can make us allocate (Rust allows 8 MiB).
const maxFrameLen = 64 << 10

// msgKind says which of the three messages a message is; 0 is none.
type msgKind uint8

const (
	msgTryRestart      msgKind = iota + 1 // {"Request":"TryRestart"}
	msgRestartComplete                    // {"Response":{"RestartComplete":pid}}
	msgRestartFailed                      // {"Response":{"RestartFailed":"text"}}
)

type message struct {
	kind msgKind
	pid  uint32 // msgRestartComplete: the new process's PID
	text string // msgRestartFailed: why; valid UTF-8, but any character, including control characters
}

// appendTryRestart appends a whole TryRestart frame to dst. Like the other
// two encoders, it allocates only if dst lacks capacity.
func appendTryRestart(dst []byte) []byte {
	const payload = `{"Request":"TryRestart"}`
	return append(binary.BigEndian.AppendUint32(dst, uint32(len(payload))), payload...)
}

// appendRestartComplete appends a whole RestartComplete frame for pid.
func appendRestartComplete(dst []byte, pid uint32) []byte {
	start := len(dst)
	dst = append(dst, "\x00\x00\x00\x00"+`{"Response":{"RestartComplete":`...)
	dst = append(strconv.AppendUint(dst, uint64(pid), 10), "}}"...)
	binary.BigEndian.PutUint32(dst[start:], uint32(len(dst)-start-4))
	return dst
}

// appendRestartFailed appends a RestartFailed frame carrying text, with
// invalid UTF-8 replaced as by Rust's String::from_utf8_lossy, escaped as by
// serde_json, and cut between characters to the longest prefix that keeps
// the payload within maxFrameLen: a failure report must get through.
func appendRestartFailed(dst []byte, text string) []byte {
	const prefix, suffix = `{"Response":{"RestartFailed":"`, `"}}`
	start, budget := len(dst), maxFrameLen-len(prefix+suffix)
	// Grow once, rather than letting append double its way up to a long text.
	dst = slices.Grow(dst, 4+len(prefix+suffix)+min(len(text), budget))
	dst = append(dst, "\x00\x00\x00\x00"+prefix...)
	dst = append(wireAppendText(dst, text, len(dst)+budget), suffix...)
	binary.BigEndian.PutUint32(dst[start:], uint32(len(dst)-start-4))
	return dst
}

// wireAppendText appends s to dst escaped as serde_json's ser.rs ESCAPE table
// does, invalid UTF-8 as U+FFFD, and stops before the first character that
// would take len(dst) past end.
func wireAppendText(dst []byte, s string, end int) []byte {
	for len(s) > 0 {
		enc := make([]byte, 0, 6) // on the stack
		r, n := utf8.DecodeRuneInString(s)
		switch k := strings.IndexByte("\"\\\b\f\n\r\t", s[0]); {
		case k >= 0:
			enc = append(enc, '\\', `"\bfnrt`[k])
		case s[0] < 0x20:
			enc = append(enc, '\\', 'u', '0', '0', "0123456789abcdef"[s[0]>>4], "0123456789abcdef"[s[0]&15])
		case r == utf8.RuneError && n == 1:
			n = wireInvalidLen(s)
			enc = utf8.AppendRune(enc, r)
		default:
			enc = append(enc, s[:n]...)
		}
		if len(dst)+len(enc) > end {
			break
		}
		dst, s = append(dst, enc...), s[n:]
	}
	return dst
}

// wireInvalidLen returns how many bytes of the invalid UTF-8 at the start of
// s one U+FFFD replaces in String::from_utf8_lossy: a "maximal subpart"
// (Unicode ch. 3), the longest prefix that could begin a character, or one
// byte. Go would replace each byte of "\xe2\x82", or a whole run.
func wireInvalidLen(s string) int {
	n := 1
	for n < len(s) && !utf8.FullRuneInString(s[:n+1]) {
		n++
	}
	return n
}

// readFrame reads a frame from r and returns its payload, non-nil, in scratch
// if it fits (valid until scratch is reused). A length over maxFrameLen is
// refused before any allocation, leaving the stream out of step. If r ends
// before the first byte it returns io.EOF, later io.ErrUnexpectedEOF wrapped.
func readFrame(r io.Reader, scratch []byte) ([]byte, error) {
	hdr := slices.Grow(scratch[:0], 4)[:4]
	if got, err := io.ReadFull(r, hdr); err == io.EOF {
		return nil, io.EOF
	} else if err != nil {
		return nil, fmt.Errorf("wire: reading frame header, %d of 4 bytes: %w", got, err)
	}
	n := binary.BigEndian.Uint32(hdr)
	if n > maxFrameLen {
		return nil, fmt.Errorf("wire: frame of %d bytes exceeds the %d-byte limit", n, maxFrameLen)
	}
	payload := slices.Grow(hdr[:0], int(n))[:n]
	if got, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("wire: reading frame payload, %d of %d bytes: %w", got, n, err)
	}
	return payload, nil
}

// decodeMessage decodes one payload, or says what is wrong at which offset;
// only a RestartFailed's text is allocated. Like serde_json::from_slice, it
// accepts whitespace around tokens and escapes in names, "Req\u0075est"
// (deserialize_identifier is deserialize_str), and refuses an enum object
// with no key or two (deserialize_enum wants '}' after the value).
func decodeMessage(payload []byte) (message, error) {
	d := wireDecoder{p: payload}
	var m message
	switch d.variant("Request", "Response") {
	case 0:
		// A unit variant is "TryRestart" or {"TryRestart":null}: deserialize_enum
		// hands an object to VariantAccess, whose unit_variant reads a unit.
		if m.kind = msgTryRestart; d.next() != '{' {
			d.name("TryRestart")
			break
		}
		d.variant("TryRestart")
		d.lit("null")
		d.lit("}")
	case 1:
		switch d.variant("RestartComplete", "RestartFailed") {
		case 0:
			m.kind, m.pid = msgRestartComplete, d.pid()
		case 1:
			m.kind, m.text = msgRestartFailed, string(d.str(nil))
		}
		d.lit("}")
	}
	if d.lit("}"); d.next() >= 0 {
		d.unexpected("the end of the message") // Deserializer::end
	}
	if d.err != nil {
		return message{}, d.err
	}
	return m, nil
}

// wireDecoder is decodeMessage's cursor over one payload. The first error
// sticks: once err is set, every method does nothing.
type wireDecoder struct {
	p   []byte
	i   int // the next byte to read
	err error
}

// fail records an error about the payload at offset off, unless there is one.
func (d *wireDecoder) fail(off int, format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("wire: offset %d: %s", off, fmt.Sprintf(format, args...))
	}
}

// unexpected records that what is at d.i is not want.
func (d *wireDecoder) unexpected(want string) {
	found := "the end of the message"
	if d.i < len(d.p) {
		found = strconv.Quote(string(d.p[d.i : d.i+1]))
	}
	d.fail(d.i, "expected %s, found %s", want, found)
}

// next skips whitespace, space \t \n \r (serde_json's parse_whitespace), and
// returns the byte after it, or -1 at the end or after an error.
func (d *wireDecoder) next() int {
	for ; d.err == nil && d.i < len(d.p); d.i++ {
		if c := d.p[d.i]; c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return int(c)
		}
	}
	return -1
}

// lit consumes tok, after whitespace.
func (d *wireDecoder) lit(tok string) {
	if d.next() >= 0 && string(d.p[d.i:min(d.i+len(tok), len(d.p))]) == tok {
		d.i += len(tok)
		return
	}
	d.unexpected(strconv.Quote(tok))
}

// variant reads '{', one of names and ':', and returns the name's index.
func (d *wireDecoder) variant(names ...string) int {
	d.lit("{")
	k := d.name(names...)
	d.lit(":")
	return k
}

// name reads a string that must be one of names and returns its index.
func (d *wireDecoder) name(names ...string) int {
	d.next()
	off, buf := d.i, [32]byte{} // room for any name that can match, on the stack
	name := d.str(buf[:0])
	k := slices.Index(names, string(name))
	if k < 0 && len(name) > 32 {
		d.fail(off, `unknown variant %q..., expected "%s"`, string(name[:32]), strings.Join(names, `" or "`))
	} else if k < 0 {
		d.fail(off, `unknown variant %q, expected "%s"`, string(name), strings.Join(names, `" or "`))
	}
	return k
}

// pid reads a u32 as serde_json's deserialize_u32 does: a JSON number
// (parse_number) that is an integer and fits. A fraction or exponent makes an
// f64, a '-' an i64, -0 an f64 (serde-rs/json#801); JSON refuses '+' and
// leading zeros.
func (d *wireDecoder) pid() uint32 {
	if c := d.next(); c < '0' || c > '9' {
		d.unexpected("a process ID, an integer from 0 to 4294967295")
		return 0
	}
	start, n := d.i, uint64(0)
	for ; d.i < len(d.p) && '0' <= d.p[d.i] && d.p[d.i] <= '9'; d.i++ {
		if n = n*10 + uint64(d.p[d.i]-'0'); n > 1<<32-1 {
			d.fail(start, "process ID is larger than 4294967295")
			return 0
		}
	}
	if d.p[start] == '0' && d.i > start+1 || d.i < len(d.p) && strings.IndexByte(".eE", d.p[d.i]) >= 0 {
		d.fail(start, "process ID is not a JSON integer without leading zeros, fraction or exponent")
	}
	return uint32(n)
}

// str reads a JSON string as serde_json's parse_str with validation does (no
// raw control characters, valid UTF-8, surrogates in high-low pairs) and
// returns it decoded: a slice of the payload if it has no escape, else dst
// with it appended.
func (d *wireDecoder) str(dst []byte) []byte {
	if d.next() != '"' {
		d.unexpected("a string")
		return nil
	}
	open, run, escaped := d.i, d.i+1, false // run: where what is not yet in dst starts
	for d.i++; d.err == nil; {
		switch r, n := utf8.DecodeRune(d.p[d.i:]); {
		case n == 0:
			d.fail(open, "string is not terminated")
		case r == '"':
			if d.i++; !escaped {
				return d.p[run : d.i-1]
			}
			return append(dst, d.p[run:d.i-1]...)
		case r < 0x20:
			d.fail(d.i, "raw control character %U in a string; it must be escaped", r)
		case r == '\\' && d.i+1 < len(d.p): // else the string is not terminated
			dst, escaped = append(dst, d.p[run:d.i]...), true
			dst = utf8.AppendRune(dst, d.escape())
			run = d.i
		case r == utf8.RuneError && n == 1:
			d.fail(d.i, "invalid UTF-8 in a string")
		default:
			d.i += n
		}
	}
	return nil
}

// escape reads the escape at d.i, a backslash that is not the last byte.
func (d *wireDecoder) escape() rune {
	esc := d.i
	if k := strings.IndexByte(`"\/bfnrt`, d.p[esc+1]); k >= 0 {
		d.i += 2
		return rune("\"\\/\b\f\n\r\t"[k])
	}
	r := d.hex4(esc)
	if utf16.IsSurrogate(r) {
		// serde_json wants a high surrogate, then a low one in the next \u.
		if r = utf16.DecodeRune(r, d.hex4(d.i)); r == utf8.RuneError {
			d.fail(esc, "unpaired surrogate %s", string(d.p[esc:esc+6]))
		}
	} else if r < 0 {
		d.fail(esc, `invalid escape; JSON has \" \\ \/ \b \f \n \r \t and \u with four hex digits`)
	}
	return r
}

// hex4 reads the \uXXXX escape at off and returns its value, or -1 if none.
func (d *wireDecoder) hex4(off int) rune {
	if len(d.p)-off >= 6 && string(d.p[off:off+2]) == `\u` {
		if v, err := strconv.ParseUint(string(d.p[off+2:off+6]), 16, 16); err == nil {
			d.i = off + 6
			return rune(v)
		}
	}
	return -1
}
