package shellflip

// This file is the control-socket protocol. It is byte-compatible with the
// Rust crate cloudflare/shellflip 2.x (src/restart_coordination_socket.rs),
// so a Go process and a Rust process can restart each other.
//
// The Rust side frames messages with tokio_util's LengthDelimitedCodec in its
// default configuration: a 4-byte big-endian payload length, then the
// payload. The payload is serde_json::to_string of
//
//	enum RestartMessage { Request(RestartRequest), Response(RestartResponse) }
//	enum RestartRequest { TryRestart }
//	enum RestartResponse { RestartComplete(u32), RestartFailed(String) }
//
// in serde's default, externally tagged, representation. So exactly three
// payloads are ever sent:
//
//	{"Request":"TryRestart"}
//	{"Response":{"RestartComplete":PID}}
//	{"Response":{"RestartFailed":"TEXT"}}
//
// The encoder writes those bytes exactly as serde_json does. The decoder
// accepts exactly what serde_json::from_slice accepts for RestartMessage:
// nothing more, so that a Go peer does not tolerate what a Rust peer would
// refuse, and nothing less, so that any Rust peer is understood. It is written
// by hand, without encoding/json or reflection, because it reads bytes from
// another process before anything is trusted and must stay small enough to
// audit; its rules are those of serde_json's de.rs and read.rs, cited below.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"unicode/utf8"
)

// maxFrameLen is the largest payload readFrame accepts and the encoders
// produce. The longest legitimate payload is a RestartFailed with a long
// error text; 64 KiB is plenty for that and bounds what a peer can make us
// allocate. (The Rust side's LengthDelimitedCodec allows 8 MiB, so whatever
// we send it fits.)
const maxFrameLen = 64 << 10

// msgKind says which of the three messages a message is. The zero value is
// not a message.
type msgKind uint8

const (
	msgTryRestart      msgKind = iota + 1 // {"Request":"TryRestart"}
	msgRestartComplete                    // {"Response":{"RestartComplete":pid}}
	msgRestartFailed                      // {"Response":{"RestartFailed":"text"}}
)

// message is one decoded control-socket message.
type message struct {
	kind msgKind
	pid  uint32 // msgRestartComplete: the new process's PID
	text string // msgRestartFailed: why; valid UTF-8, but any character, including control characters
}

// The payloads, or their fixed parts, exactly as serde_json::to_string writes
// them: no whitespace anywhere.
const (
	wireHeaderLen      = 4
	wireTryRestart     = `{"Request":"TryRestart"}`
	wireCompletePrefix = `{"Response":{"RestartComplete":`
	wireCompleteSuffix = `}}`
	wireFailedPrefix   = `{"Response":{"RestartFailed":"`
	wireFailedSuffix   = `"}}`
)

// appendTryRestart appends a whole TryRestart frame, header and payload, to
// dst and returns the extended slice. It allocates only if dst lacks
// capacity.
func appendTryRestart(dst []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(wireTryRestart)))
	return append(dst, wireTryRestart...)
}

// appendRestartComplete appends a whole RestartComplete frame for pid to dst
// and returns the extended slice. The PID is written in decimal, as
// serde_json writes a u32. It allocates only if dst lacks capacity.
func appendRestartComplete(dst []byte, pid uint32) []byte {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0) // the length, filled in by wireSeal
	dst = append(dst, wireCompletePrefix...)
	dst = strconv.AppendUint(dst, uint64(pid), 10)
	dst = append(dst, wireCompleteSuffix...)
	return wireSeal(dst, start)
}

// appendRestartFailed appends a whole RestartFailed frame carrying text to
// dst and returns the extended slice. It allocates only if dst lacks
// capacity.
//
// A Rust String is always UTF-8, so invalid UTF-8 in text is replaced the way
// Rust's String::from_utf8_lossy does it (see wireInvalidLen). The text is
// then escaped as serde_json escapes a string, and cut to the longest prefix
// whose escaped form keeps the payload within maxFrameLen; the cut falls
// between characters, never inside a character or an escape. The peer sees
// the shortened text, not an error: a failure report must get through.
func appendRestartFailed(dst []byte, text string) []byte {
	budget := maxFrameLen - len(wireFailedPrefix) - len(wireFailedSuffix)
	start := len(dst)
	// Grow once for the common case of text that needs no escaping, rather
	// than letting append double its way up to a long text.
	dst = slices.Grow(dst, wireHeaderLen+len(wireFailedPrefix)+min(len(text), budget)+len(wireFailedSuffix))
	dst = append(dst, 0, 0, 0, 0) // the length, filled in by wireSeal
	dst = append(dst, wireFailedPrefix...)
	dst = wireAppendText(dst, text, budget)
	dst = append(dst, wireFailedSuffix...)
	return wireSeal(dst, start)
}

// wireSeal writes the length of the payload that follows the header at
// frame[start:] into that header.
func wireSeal(frame []byte, start int) []byte {
	binary.BigEndian.PutUint32(frame[start:], uint32(len(frame)-start-wireHeaderLen))
	return frame
}

// wireAppendText appends s to dst as the inside of a JSON string, escaped
// exactly as serde_json's format_escaped_str_contents does (ser.rs, its
// ESCAPE table): `"` and `\` get a backslash; \b \f \n \r \t get their short
// escapes; every other byte below 0x20 becomes \u00XX with lowercase hex.
// Everything else, including DEL (0x7f), '/' and all of non-ASCII, is written
// raw. Invalid UTF-8 becomes U+FFFD, one per maximal invalid subsequence.
// It stops before the first character whose encoding would take the output
// past budget bytes.
func wireAppendText(dst []byte, s string, budget int) []byte {
	const hex = "0123456789abcdef"
	end := len(dst) + budget
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			if len(dst)+1 > end {
				return dst
			}
			dst = append(dst, c)
			i++
			continue
		}
		if c < utf8.RuneSelf {
			var esc byte
			switch c {
			case '"', '\\':
				esc = c
			case '\b':
				esc = 'b'
			case '\f':
				esc = 'f'
			case '\n':
				esc = 'n'
			case '\r':
				esc = 'r'
			case '\t':
				esc = 't'
			}
			if esc != 0 {
				if len(dst)+2 > end {
					return dst
				}
				dst = append(dst, '\\', esc)
			} else {
				if len(dst)+6 > end {
					return dst
				}
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			if len(dst)+utf8.RuneLen(utf8.RuneError) > end {
				return dst
			}
			dst = utf8.AppendRune(dst, utf8.RuneError)
			i += wireInvalidLen(s[i:])
			continue
		}
		if len(dst)+size > end {
			return dst
		}
		dst = append(dst, s[i:i+size]...)
		i += size
	}
	return dst
}

// wireInvalidLen returns the length of the invalid UTF-8 sequence at the start
// of s, which must not begin with a valid encoding: the "maximal subpart", the
// longest prefix that could still begin a well-formed character, or one byte
// if there is none.
//
// Rust's String::from_utf8_lossy writes one U+FFFD per maximal subpart (the
// Unicode Standard's recommended practice, ch. 3 "U+FFFD Substitution of
// Maximal Subparts"); the table below is the one in core/src/str/lossy.rs
// (Utf8Chunks::next). Go's libraries do it differently: utf8.DecodeRune reports
// every byte of "\xe2\x82" as its own error (two U+FFFD), and
// strings.ToValidUTF8 replaces a whole run of bad bytes with a single U+FFFD.
// Matching Rust matters because a Go peer's RestartFailed text should read the
// same as a Rust peer's for the same bytes.
func wireInvalidLen(s string) int {
	lo, hi := byte(0x80), byte(0xbf) // the range allowed for the second byte
	var need int                     // continuation bytes a full sequence has
	switch b := s[0]; {
	case 0xc2 <= b && b <= 0xdf:
		need = 1
	case b == 0xe0:
		lo, need = 0xa0, 2 // below is overlong
	case 0xe1 <= b && b <= 0xec, b == 0xee, b == 0xef:
		need = 2
	case b == 0xed:
		hi, need = 0x9f, 2 // above are the surrogates U+D800..U+DFFF
	case b == 0xf0:
		lo, need = 0x90, 3 // below is overlong
	case 0xf1 <= b && b <= 0xf3:
		need = 3
	case b == 0xf4:
		hi, need = 0x8f, 3 // above is past U+10FFFF
	default: // a continuation byte, 0xc0, 0xc1 or 0xf5..0xff: never valid
		return 1
	}
	n := 1
	for n <= need && n < len(s) && lo <= s[n] && s[n] <= hi {
		lo, hi = 0x80, 0xbf
		n++
	}
	return n
}

// readFrame reads one frame from r and returns its payload.
//
// The header is read into scratch, and so is the payload when it fits in
// cap(scratch); a longer payload goes into a new slice, and a scratch too
// small for the 4-byte header is treated as none. The payload may alias
// scratch, so it is valid only until scratch is used again. A successful
// readFrame into a scratch of capacity maxFrameLen allocates nothing. A
// zero-length frame returns an empty, non-nil payload.
//
// A length over maxFrameLen is refused before anything is allocated for it,
// with an error that names the length; the stream is then out of step and
// should be closed. readFrame returns io.EOF itself only if r ends cleanly
// before the first byte of the header. A frame cut short anywhere else returns
// an error for which errors.Is(err, io.ErrUnexpectedEOF) holds. Other read
// errors are returned wrapped.
func readFrame(r io.Reader, scratch []byte) ([]byte, error) {
	buf := scratch
	if cap(buf) < wireHeaderLen {
		buf = make([]byte, wireHeaderLen)
	}
	hdr := buf[:wireHeaderLen]
	if got, err := io.ReadFull(r, hdr); err != nil {
		switch err {
		case io.EOF:
			return nil, io.EOF
		case io.ErrUnexpectedEOF:
			return nil, fmt.Errorf("wire: frame header cut short after %d of %d bytes: %w", got, wireHeaderLen, err)
		}
		return nil, fmt.Errorf("wire: reading frame header: %w", err)
	}
	n := binary.BigEndian.Uint32(hdr)
	if n > maxFrameLen {
		return nil, fmt.Errorf("wire: frame of %d bytes exceeds the %d-byte limit", n, maxFrameLen)
	}
	var payload []byte
	if int(n) <= cap(buf) {
		payload = buf[:n]
	} else {
		payload = make([]byte, n)
	}
	if got, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, fmt.Errorf("wire: frame payload cut short after %d of %d bytes: %w", got, n, io.ErrUnexpectedEOF)
		}
		return nil, fmt.Errorf("wire: reading %d-byte frame payload: %w", n, err)
	}
	return payload, nil
}

// decodeMessage decodes one payload. It accepts exactly the payloads that
// serde_json::from_slice::<RestartMessage> accepts, and returns an error that
// says what was wrong, and where, for any other input. Decoding TryRestart or
// RestartComplete allocates nothing; RestartFailed allocates its text.
//
// What serde_json accepts beyond the three canonical payloads (de.rs):
//   - JSON whitespace (space, \t, \n, \r; parse_whitespace) before and after
//     every token, and after the value.
//   - A unit variant either as a string, "TryRestart", or as a one-key object
//     whose value is null, {"TryRestart":null} (deserialize_enum hands a string
//     to UnitVariantAccess, an object to VariantAccess whose unit_variant
//     deserializes a unit, which is null).
//   - Keys and variant names with escapes, "Req\u0075est": they are decoded
//     before they are compared (deserialize_identifier is deserialize_str).
//
// And what it refuses: an object with no key or more than one (after the
// value, deserialize_enum wants '}'); a newtype variant as a bare string
// (UnitVariantAccess::newtype_variant_seed is an error); names that match no
// variant exactly; strings with raw control characters, invalid escapes,
// unpaired surrogates or invalid UTF-8 (read.rs parse_str with validation);
// PIDs that are not a u32 written as a JSON integer (see wireParser.pid);
// anything but whitespace after the value (Deserializer::end); and the empty
// payload.
func decodeMessage(payload []byte) (message, error) {
	if len(payload) == 0 {
		return message{}, errors.New("wire: empty message")
	}
	d := wireParser{p: payload}
	m, err := d.message()
	if err != nil {
		return message{}, err
	}
	d.skipSpace()
	if d.i != len(d.p) {
		return message{}, d.unexpected("the end of the message")
	}
	return m, nil
}

// wireParser is a cursor over one payload. Its methods advance i past what
// they consume and, on error, leave it where the problem is.
type wireParser struct {
	p []byte
	i int
}

// wireName holds a decoded object key or variant name. The longest name in
// the protocol, "RestartComplete", has 15 bytes; longer names cannot match
// anything, so only a prefix of them is kept, for the error message. Names
// live on the caller's stack: comparing them allocates nothing.
type wireName struct {
	buf  [32]byte
	n    int
	long bool // the name was longer than buf; buf holds its first bytes
	off  int  // where the name starts in the payload, for errors
}

func (nm *wireName) is(s string) bool {
	return !nm.long && string(nm.buf[:nm.n]) == s
}

// message parses a RestartMessage.
func (d *wireParser) message() (message, error) {
	var nm wireName
	isObject, err := d.variant(&nm)
	if err != nil {
		return message{}, err
	}
	var m message
	switch {
	case nm.is("Request"):
		if err := d.newtypeValue(&nm, isObject); err != nil {
			return message{}, err
		}
		if err := d.request(); err != nil {
			return message{}, err
		}
		m = message{kind: msgTryRestart}
	case nm.is("Response"):
		if err := d.newtypeValue(&nm, isObject); err != nil {
			return message{}, err
		}
		if m, err = d.response(); err != nil {
			return message{}, err
		}
	default:
		return message{}, d.unknownVariant(&nm, `"Request" or "Response"`)
	}
	return m, d.endVariant()
}

// request parses a RestartRequest, which has one unit variant.
func (d *wireParser) request() error {
	var nm wireName
	isObject, err := d.variant(&nm)
	if err != nil {
		return err
	}
	if !nm.is("TryRestart") {
		return d.unknownVariant(&nm, `"TryRestart"`)
	}
	if !isObject {
		return nil
	}
	if err := d.colon(); err != nil {
		return err
	}
	if err := d.null(); err != nil {
		return err
	}
	return d.endVariant()
}

// response parses a RestartResponse, whose variants both carry a value.
func (d *wireParser) response() (message, error) {
	var nm wireName
	isObject, err := d.variant(&nm)
	if err != nil {
		return message{}, err
	}
	var m message
	switch {
	case nm.is("RestartComplete"):
		if err := d.newtypeValue(&nm, isObject); err != nil {
			return message{}, err
		}
		pid, err := d.pid()
		if err != nil {
			return message{}, err
		}
		m = message{kind: msgRestartComplete, pid: pid}
	case nm.is("RestartFailed"):
		if err := d.newtypeValue(&nm, isObject); err != nil {
			return message{}, err
		}
		text, err := d.text()
		if err != nil {
			return message{}, err
		}
		m = message{kind: msgRestartFailed, text: text}
	default:
		return message{}, d.unknownVariant(&nm, `"RestartComplete" or "RestartFailed"`)
	}
	return m, d.endVariant()
}

// variant reads the start of an externally tagged enum, as serde_json's
// deserialize_enum does: either a string, the whole enum in unit form, or '{'
// followed by the first key. It decodes the name into nm and reports which
// form it found. For the object form the caller checks the name, then calls
// colon (or newtypeValue), parses the value and calls endVariant.
func (d *wireParser) variant(nm *wireName) (isObject bool, err error) {
	d.skipSpace()
	if d.i < len(d.p) && d.p[d.i] == '{' {
		d.i++
		d.skipSpace()
		if d.i < len(d.p) && d.p[d.i] == '}' {
			return false, fmt.Errorf("wire: empty object at offset %d: an enum needs exactly one key, its variant", d.i)
		}
		if d.i >= len(d.p) || d.p[d.i] != '"' {
			return false, d.unexpected("a variant name")
		}
		return true, d.name(nm)
	}
	if d.i >= len(d.p) || d.p[d.i] != '"' {
		return false, d.unexpected(`a variant: a string or an object`)
	}
	return false, d.name(nm)
}

// newtypeValue checks that a variant that carries a value was written as an
// object, and consumes the colon before the value.
func (d *wireParser) newtypeValue(nm *wireName, isObject bool) error {
	if !isObject {
		// serde_json's UnitVariantAccess::newtype_variant_seed:
		// "invalid type: unit variant, expected newtype variant".
		q := nm.quote()
		return fmt.Errorf("wire: variant %s at offset %d carries a value, so it must be written as an object {%s:...}, not as a bare string",
			q, nm.off, q)
	}
	return d.colon()
}

// endVariant consumes the '}' that closes the object form of an enum.
func (d *wireParser) endVariant() error {
	d.skipSpace()
	if d.i < len(d.p) {
		switch d.p[d.i] {
		case '}':
			d.i++
			return nil
		case ',':
			return fmt.Errorf("wire: second key at offset %d: an enum object has exactly one key, its variant", d.i)
		}
	}
	return d.unexpected("'}'")
}

func (d *wireParser) colon() error {
	d.skipSpace()
	if d.i < len(d.p) && d.p[d.i] == ':' {
		d.i++
		return nil
	}
	return d.unexpected("':'")
}

// null consumes the literal null, the only JSON form of a unit (serde_json's
// deserialize_unit).
func (d *wireParser) null() error {
	d.skipSpace()
	if len(d.p)-d.i >= 4 && string(d.p[d.i:d.i+4]) == "null" {
		d.i += 4
		return nil
	}
	return d.unexpected("null, the value of a unit variant")
}

// pid parses a u32 as serde_json's deserialize_u32 accepts it: a JSON integer
// with no sign, fraction or exponent, no leading zero, and at most
// 4294967295. serde_json parses a number first and then offers it to the u32
// visitor, which takes only a non-negative integer that fits: a fraction or
// exponent makes an f64, a '-' an i64, and "-0" an f64 too (de.rs
// parse_number, since serde-rs/json#801); all are refused.
func (d *wireParser) pid() (uint32, error) {
	const want = "a process ID: an integer from 0 to 4294967295"
	d.skipSpace()
	start := d.i
	if d.i >= len(d.p) || d.p[d.i] < '0' || d.p[d.i] > '9' {
		return 0, d.unexpected(want)
	}
	if d.p[d.i] == '0' && d.i+1 < len(d.p) && '0' <= d.p[d.i+1] && d.p[d.i+1] <= '9' {
		return 0, fmt.Errorf("wire: number with a leading zero at offset %d, expected %s", d.i, want)
	}
	var n uint64
	for d.i < len(d.p) && '0' <= d.p[d.i] && d.p[d.i] <= '9' {
		n = n*10 + uint64(d.p[d.i]-'0')
		if n > 1<<32-1 {
			return 0, fmt.Errorf("wire: number at offset %d is larger than 4294967295, expected %s", start, want)
		}
		d.i++
	}
	if d.i < len(d.p) {
		switch d.p[d.i] {
		case '.', 'e', 'E':
			return 0, fmt.Errorf("wire: number at offset %d is not an integer, expected %s", start, want)
		}
	}
	return uint32(n), nil
}

// text parses the string value of RestartFailed.
func (d *wireParser) text() (string, error) {
	d.skipSpace()
	if d.i >= len(d.p) || d.p[d.i] != '"' {
		return "", d.unexpected("a string, the reason the restart failed")
	}
	// First pass: validate and find the end, keeping nothing. Text without
	// escapes is then copied straight from the payload; text with escapes is
	// decoded again into a buffer of the raw length, which escapes only
	// ever shrink.
	start := d.i
	if _, _, err := d.str(nil); err != nil {
		return "", err
	}
	raw := d.p[start+1 : d.i-1]
	if !slices.Contains(raw, '\\') {
		return string(raw), nil
	}
	again := wireParser{p: d.p, i: start}
	out, _, _ := again.str(make([]byte, 0, len(raw)))
	return string(out), nil
}

// name parses a string into nm. The caller has checked that d.p[d.i] is '"'.
func (d *wireParser) name(nm *wireName) error {
	nm.off = d.i
	out, whole, err := d.str(nm.buf[:0])
	nm.n, nm.long = len(out), !whole
	return err
}

// str parses the JSON string that starts at d.p[d.i], which must be '"', with
// the checks of serde_json's SliceRead::parse_str: no raw control characters,
// only the escapes \" \\ \/ \b \f \n \r \t \uXXXX, surrogates only in
// high-low pairs (parse_escape with validation on), and valid UTF-8 (as_str).
// The decoded bytes are appended to dst as far as cap(dst) allows; dst is
// never grown, and whole reports whether everything fit.
func (d *wireParser) str(dst []byte) (out []byte, whole bool, err error) {
	w := wireCapped{b: dst}
	open := d.i
	d.i++
	for {
		// A run that needs no decoding.
		start := d.i
		for d.i < len(d.p) {
			c := d.p[d.i]
			if c == '"' || c == '\\' || c < 0x20 {
				break
			}
			if c < utf8.RuneSelf {
				d.i++
				continue
			}
			r, size := utf8.DecodeRune(d.p[d.i:])
			if r == utf8.RuneError && size == 1 {
				return nil, false, fmt.Errorf("wire: invalid UTF-8 in string at offset %d", d.i)
			}
			d.i += size
		}
		w.add(d.p[start:d.i])
		if d.i >= len(d.p) {
			return nil, false, fmt.Errorf("wire: string at offset %d is not terminated", open)
		}
		switch c := d.p[d.i]; {
		case c == '"':
			d.i++
			return w.b, !w.short, nil
		case c < 0x20:
			return nil, false, fmt.Errorf("wire: raw control character 0x%02x in string at offset %d; it must be escaped", c, d.i)
		}
		// A backslash.
		esc := d.i
		d.i++
		if d.i >= len(d.p) {
			return nil, false, fmt.Errorf("wire: string at offset %d is not terminated", open)
		}
		c := d.p[d.i]
		d.i++
		switch c {
		case '"', '\\', '/':
			w.add([]byte{c})
		case 'b':
			w.add([]byte{'\b'})
		case 'f':
			w.add([]byte{'\f'})
		case 'n':
			w.add([]byte{'\n'})
		case 'r':
			w.add([]byte{'\r'})
		case 't':
			w.add([]byte{'\t'})
		case 'u':
			r, err := d.hex4(esc)
			if err != nil {
				return nil, false, err
			}
			switch {
			case 0xdc00 <= r && r <= 0xdfff:
				return nil, false, fmt.Errorf("wire: unpaired low surrogate \\u%04x at offset %d", r, esc)
			case 0xd800 <= r && r <= 0xdbff:
				if len(d.p)-d.i < 2 || d.p[d.i] != '\\' || d.p[d.i+1] != 'u' {
					return nil, false, fmt.Errorf("wire: unpaired high surrogate \\u%04x at offset %d", r, esc)
				}
				d.i += 2
				lo, err := d.hex4(d.i - 2)
				if err != nil {
					return nil, false, err
				}
				if lo < 0xdc00 || lo > 0xdfff {
					return nil, false, fmt.Errorf("wire: unpaired high surrogate \\u%04x at offset %d", r, esc)
				}
				r = 0x10000 + (r-0xd800)<<10 + (lo - 0xdc00)
			}
			var b [utf8.UTFMax]byte
			w.add(utf8.AppendRune(b[:0], r))
		default:
			return nil, false, fmt.Errorf("wire: invalid escape \\%s in string at offset %d", wireQuoteByte(c), esc)
		}
	}
}

// hex4 decodes the four hex digits of a \u escape that starts at esc.
func (d *wireParser) hex4(esc int) (rune, error) {
	if len(d.p)-d.i < 4 {
		return 0, fmt.Errorf("wire: \\u escape at offset %d needs four hex digits", esc)
	}
	var r rune
	for _, c := range d.p[d.i : d.i+4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, fmt.Errorf("wire: \\u escape at offset %d needs four hex digits", esc)
		}
		r = r<<4 | rune(c)
	}
	d.i += 4
	return r, nil
}

// skipSpace skips JSON whitespace, which is what serde_json's
// parse_whitespace skips: space, \t, \n and \r.
func (d *wireParser) skipSpace() {
	for d.i < len(d.p) {
		switch d.p[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

// unexpected reports that d.p[d.i] is not want.
func (d *wireParser) unexpected(want string) error {
	if d.i >= len(d.p) {
		return fmt.Errorf("wire: message ends at offset %d, expected %s", d.i, want)
	}
	return fmt.Errorf("wire: unexpected %s at offset %d, expected %s", wireQuoteByte(d.p[d.i]), d.i, want)
}

func (d *wireParser) unknownVariant(nm *wireName, want string) error {
	return fmt.Errorf("wire: unknown variant %s at offset %d, expected %s", nm.quote(), nm.off, want)
}

// quote quotes the name for an error message. (wireName is not a
// fmt.Stringer on purpose: handing it to fmt would move it to the heap.)
func (nm *wireName) quote() string {
	if nm.long {
		return strconv.Quote(string(nm.buf[:nm.n])) + "..."
	}
	return strconv.Quote(string(nm.buf[:nm.n]))
}

// wireQuoteByte shows a byte in an error message: printable ASCII quoted,
// anything else in hex.
func wireQuoteByte(c byte) string {
	if 0x20 <= c && c < 0x7f {
		return strconv.QuoteRune(rune(c))
	}
	return fmt.Sprintf("byte 0x%02x", c)
}

// wireCapped appends to a buffer without ever growing it: what does not fit
// is dropped, so b always holds a prefix of what was added.
type wireCapped struct {
	b     []byte
	short bool // something was dropped
}

func (w *wireCapped) add(s []byte) {
	n := copy(w.b[len(w.b):cap(w.b)], s)
	w.b = w.b[:len(w.b)+n]
	if n < len(s) {
		w.short = true
	}
}
