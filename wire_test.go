//go:build linux

package shellflip

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"unicode/utf8"
)

// The control-socket protocol (wire.go).

// wireFrameOf returns payload with its 4-byte big-endian length header.
func wireFrameOf(payload string) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
}

func TestWireEncodeExact(t *testing.T) {
	tests := []struct {
		name string
		got  []byte
		want string
	}{
		{"TryRestart", appendTryRestart(nil),
			"\x00\x00\x00\x18" + `{"Request":"TryRestart"}`},
		{"RestartComplete 1234", appendRestartComplete(nil, 1234),
			"\x00\x00\x00\x25" + `{"Response":{"RestartComplete":1234}}`},
		{"RestartComplete 0", appendRestartComplete(nil, 0),
			"\x00\x00\x00\x22" + `{"Response":{"RestartComplete":0}}`},
		{"RestartComplete max", appendRestartComplete(nil, 4294967295),
			"\x00\x00\x00\x2b" + `{"Response":{"RestartComplete":4294967295}}`},
		{"RestartFailed", appendRestartFailed(nil, "huge success"),
			"\x00\x00\x00\x2d" + `{"Response":{"RestartFailed":"huge success"}}`},
		{"RestartFailed empty", appendRestartFailed(nil, ""),
			"\x00\x00\x00\x21" + `{"Response":{"RestartFailed":""}}`},
		{"appends to dst", appendTryRestart([]byte("xyz")),
			"xyz\x00\x00\x00\x18" + `{"Request":"TryRestart"}`},
		{"two frames", appendRestartComplete(appendTryRestart(nil), 7),
			"\x00\x00\x00\x18" + `{"Request":"TryRestart"}` + "\x00\x00\x00\x22" + `{"Response":{"RestartComplete":7}}`},
	}
	for _, tt := range tests {
		if string(tt.got) != tt.want {
			t.Errorf("%s: got %q, want %q", tt.name, tt.got, tt.want)
		}
	}
	// The header lengths above were counted by hand; count them again.
	for _, tt := range tests[:6] {
		if n := binary.BigEndian.Uint32([]byte(tt.want)); int(n) != len(tt.want)-4 {
			t.Errorf("%s: test header says %d, payload has %d bytes", tt.name, n, len(tt.want)-4)
		}
	}
}

// wireEscapes maps a RestartFailed text to the inside of the JSON string
// serde_json writes for it (after from_utf8_lossy for invalid UTF-8).
var wireEscapes = []struct {
	in, want string
}{
	{"", ""},
	{"plain text", "plain text"},
	{`"`, `\"`},
	{`\`, `\\`},
	{`say "hi" \o/`, `say \"hi\" \\o/`},
	{"/", "/"}, // serde_json does not escape the solidus
	{"\b\f\n\r\t", `\b\f\n\r\t`},
	{"\x00\x01\x07\x0b\x0e\x1a\x1f", `\u0000\u0001\u0007\u000b\u000e\u001a\u001f`}, // lowercase hex
	{"\x7f", "\x7f"},                 // DEL is not escaped
	{" ~", " ~"},                     // printable ASCII bounds
	{"<>&'", "<>&'"},                 // no HTML escaping
	{"é€😀", "é€😀"},                   // non-ASCII raw
	{"\u2028\u2029", "\u2028\u2029"}, // unlike encoding/json, serde_json writes these raw
	{"\ufffd", "\ufffd"},             // a real U+FFFD stays one U+FFFD

	// Invalid UTF-8: one U+FFFD per maximal subpart, as Rust's from_utf8_lossy.
	{"\xff", "\ufffd"},
	{"a\x80b", "a\ufffdb"},
	{"\xe2\x82", "\ufffd"},                               // truncated 3-byte sequence: one, not two
	{"\xe2\x82x", "\ufffdx"},                             // same, mid-string
	{"Hello \xF0\x90\x80World", "Hello \ufffdWorld"},     // the example in Rust's from_utf8_lossy docs
	{"\xf0\x90\x80", "\ufffd"},                           // truncated 4-byte sequence
	{"\xf1\x80\x80\xf1\x80\x80\x80", "\ufffd\U00040000"}, // truncated, then a valid one
	{"\xc0\xaf", "\ufffd\ufffd"},                         // overlong '/': C0 is never valid
	{"\xe0\x80\xaf", "\ufffd\ufffd\ufffd"},               // overlong: E0 needs A0..BF next
	{"\xed\xa0\x80", "\ufffd\ufffd\ufffd"},               // UTF-8-encoded surrogate U+D800
	{"\xf4\x90\x80\x80", "\ufffd\ufffd\ufffd\ufffd"},     // past U+10FFFF
	{"\xf5\x80", "\ufffd\ufffd"},                         // F5 is never valid
	{"\x80\x80\x80", "\ufffd\ufffd\ufffd"},               // lone continuation bytes, one each
	{"\xe2\x82\xe2\x82\xac", "\ufffd€"},                  // truncated, then a valid euro sign
	{"\xc3", "\ufffd"},                                   // truncated at the very end
	{"\"\xff\n", `\"` + "\ufffd" + `\n`},
}

func TestWireEscape(t *testing.T) {
	for _, tt := range wireEscapes {
		frame := appendRestartFailed(nil, tt.in)
		want := wireFrameOf(`{"Response":{"RestartFailed":"` + tt.want + `"}}`)
		if !bytes.Equal(frame, want) {
			t.Errorf("appendRestartFailed(%q) = %q, want %q", tt.in, frame, want)
			continue
		}
		if got := wireRefLossy(tt.in); got != wireMustUnquote(t, tt.want) {
			t.Errorf("reference lossy(%q) = %q, disagrees with the table", tt.in, got)
		}
		m, err := decodeMessage(frame[4:])
		if err != nil || m != (message{kind: msgRestartFailed, text: wireRefLossy(tt.in)}) {
			t.Errorf("decode(encode(%q)) = %+v, %v", tt.in, m, err)
		}
	}
}

// wireMustUnquote decodes the inside of a JSON string with encoding/json.
func wireMustUnquote(t testing.TB, inner string) string {
	t.Helper()
	var s string
	if err := json.Unmarshal([]byte(`"`+inner+`"`), &s); err != nil {
		t.Fatalf("unquote %q: %v", inner, err)
	}
	return s
}

// wireRefLossy is String::from_utf8_lossy written a second way, with the
// table of wireRefInvalidLen.
func wireRefLossy(s string) string {
	var b strings.Builder
	for len(s) > 0 {
		r, size := utf8.DecodeRuneInString(s)
		if r == utf8.RuneError && size == 1 {
			size = wireRefInvalidLen(s)
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(s[:size])
		}
		s = s[size:]
	}
	return b.String()
}

// wireRefInvalidLen is wireInvalidLen written from the table of Rust's
// core/src/str/lossy.rs (Utf8Chunks::next), which is also the table of
// well-formed UTF-8 in the Unicode Standard (ch. 3, table 3-7): the length
// of the "maximal subpart" at the start of s, the longest prefix that could
// still begin a well-formed character, or 1 if there is none. s must not
// begin with a valid encoding. (This was wire.go's own code before issue 10.)
func wireRefInvalidLen(s string) int {
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

// TestWireInvalidLen compares wireInvalidLen, which asks utf8.FullRuneInString,
// with the reference table on every invalid sequence of up to three bytes and
// on every 4-byte one whose first three bytes could start a valid sequence.
func TestWireInvalidLen(t *testing.T) {
	check := func(s string) {
		if r, size := utf8.DecodeRuneInString(s); r != utf8.RuneError || size != 1 {
			return
		}
		if got, want := wireInvalidLen(s), wireRefInvalidLen(s); got != want {
			t.Fatalf("wireInvalidLen(%q) = %d, want %d", s, got, want)
		}
	}
	var b [4]byte
	for b0 := 0x80; b0 <= 0xff; b0++ {
		b[0] = byte(b0)
		check(string(b[:1]))
		for b1 := range 256 {
			b[1] = byte(b1)
			check(string(b[:2]))
			for b2 := range 256 {
				b[2] = byte(b2)
				check(string(b[:3]))
				if b0 < 0xf0 || b0 > 0xf4 || b1 < 0x80 || b1 > 0xbf || b2 < 0x80 || b2 > 0xbf {
					continue
				}
				for b3 := range 256 {
					b[3] = byte(b3)
					check(string(b[:4]))
				}
			}
		}
	}
}

// TestWireEscapeMatchesEncodingJSON checks the escaper against encoding/json,
// which escapes exactly like serde_json once HTML escaping is off, except
// that it also escapes U+2028 and U+2029 (left out here).
func TestWireEscapeMatchesEncodingJSON(t *testing.T) {
	var all []byte
	for c := range 0x80 {
		all = append(all, byte(c))
	}
	all = append(all, "é€😀\U0010ffff"...)
	for _, s := range []string{string(all), "abc", `"\`} {
		if got, want := string(appendRestartFailed(nil, s)[4:]), wireRefPayloadFailed(s); got != want {
			t.Errorf("text %q:\n got %q\nwant %q", s, got, want)
		}
	}
}

// wireRefPayloadFailed builds the RestartFailed payload for valid UTF-8 text
// with encoding/json. The text must not contain U+2028 or U+2029.
func wireRefPayloadFailed(text string) string {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(map[string]map[string]string{"Response": {"RestartFailed": text}}); err != nil {
		panic(err)
	}
	return strings.TrimSuffix(buf.String(), "\n")
}

func TestWireTruncate(t *testing.T) {
	const budget = maxFrameLen - len(`{"Response":{"RestartFailed":""}}`) // 65503
	tests := []struct {
		name     string
		text     string
		wantText string
	}{
		{"ascii, longer than a frame", strings.Repeat("a", 100000), strings.Repeat("a", budget)},
		{"ascii, exactly fits", strings.Repeat("a", budget), strings.Repeat("a", budget)},
		{"6-byte escapes", strings.Repeat("\x01", 20000), strings.Repeat("\x01", budget/6)},
		{"2-byte escapes", strings.Repeat("\n", 40000), strings.Repeat("\n", budget/2)},
		{"3-byte runes", strings.Repeat("€", 30000), strings.Repeat("€", budget/3)},
		{"4-byte runes", strings.Repeat("😀", 20000), strings.Repeat("😀", budget/4)},
		{"invalid UTF-8", strings.Repeat("\xff", 30000), strings.Repeat("\ufffd", budget/3)},
		{"escape would be split", strings.Repeat("a", budget-3) + "\x01", strings.Repeat("a", budget-3)},
		{"short escape would be split", strings.Repeat("a", budget-1) + `"`, strings.Repeat("a", budget-1)},
		{"rune would be split", strings.Repeat("a", budget-1) + "é", strings.Repeat("a", budget-1)},
		{"rune exactly fits", strings.Repeat("a", budget-2) + "é", strings.Repeat("a", budget-2) + "é"},
		{"replacement would be split", strings.Repeat("a", budget-2) + "\xe2\x82", strings.Repeat("a", budget-2)},
	}
	for _, tt := range tests {
		frame := appendRestartFailed(nil, tt.text)
		n := binary.BigEndian.Uint32(frame)
		if int(n) != len(frame)-4 || n > maxFrameLen {
			t.Errorf("%s: header %d, payload %d bytes, limit %d", tt.name, n, len(frame)-4, maxFrameLen)
		}
		m, err := decodeMessage(frame[4:])
		if err != nil {
			t.Errorf("%s: decode: %v", tt.name, err)
			continue
		}
		if m.text != tt.wantText {
			t.Errorf("%s: got %d bytes of text, want %d", tt.name, len(m.text), len(tt.wantText))
		}
	}
}

func TestWireRoundTrip(t *testing.T) {
	msgs := []message{
		{kind: msgTryRestart},
		{kind: msgRestartComplete, pid: 0},
		{kind: msgRestartComplete, pid: 1},
		{kind: msgRestartComplete, pid: 4294967295},
		{kind: msgRestartFailed, text: ""},
		{kind: msgRestartFailed, text: "fork/exec /usr/bin/app: permission denied"},
		{kind: msgRestartFailed, text: "line 1\nline 2\t\"quoted\" \\ \x00 é 😀"},
	}
	var stream []byte
	for _, m := range msgs {
		stream = wireAppend(stream, m)
	}
	r := bytes.NewReader(stream)
	scratch := make([]byte, 0, 64)
	for _, want := range msgs {
		payload, err := readFrame(r, scratch)
		if err != nil {
			t.Fatalf("readFrame: %v", err)
		}
		got, err := decodeMessage(payload)
		if err != nil || got != want {
			t.Errorf("got %+v, %v; want %+v", got, err, want)
		}
	}
	if _, err := readFrame(r, scratch); err != io.EOF {
		t.Errorf("after the last frame: %v, want io.EOF", err)
	}
}

// wireAppend encodes m with the encoder for its kind.
func wireAppend(dst []byte, m message) []byte {
	switch m.kind {
	case msgTryRestart:
		return appendTryRestart(dst)
	case msgRestartComplete:
		return appendRestartComplete(dst, m.pid)
	case msgRestartFailed:
		return appendRestartFailed(dst, m.text)
	}
	panic(fmt.Sprintf("wireAppend: kind %d", m.kind))
}

// wireAccepted lists payloads serde_json::from_slice::<RestartMessage> accepts.
var wireAccepted = []struct {
	in   string
	want message
}{
	// What serde_json::to_string writes.
	{`{"Request":"TryRestart"}`, message{kind: msgTryRestart}},
	{`{"Response":{"RestartComplete":1234}}`, message{kind: msgRestartComplete, pid: 1234}},
	{`{"Response":{"RestartFailed":"huge success"}}`, message{kind: msgRestartFailed, text: "huge success"}},

	// A unit variant may also be an object whose value is null.
	{`{"Request":{"TryRestart":null}}`, message{kind: msgTryRestart}},

	// Whitespace around every token, and after the value.
	{" \t\r\n{ \"Request\" : \"TryRestart\" } \n", message{kind: msgTryRestart}},
	{"{\n\t\"Request\"\r:\n{ \"TryRestart\"\t:\tnull\n}\r}\r\n", message{kind: msgTryRestart}},
	{` { "Response" : { "RestartComplete" : 42 } } `, message{kind: msgRestartComplete, pid: 42}},
	{` { "Response" : { "RestartFailed" : "x" } } `, message{kind: msgRestartFailed, text: "x"}},

	// Names are compared after unescaping.
	{`{"Req\u0075est":"TryRestart"}`, message{kind: msgTryRestart}},
	{`{"\u0052\u0065\u0071\u0075\u0065\u0073\u0074":"\u0054ry\u0052estart"}`, message{kind: msgTryRestart}},
	{`{"Request":{"Try\u0052estart":null}}`, message{kind: msgTryRestart}},
	{`{"Respons\u0065":{"Restart\u0043omplete":7}}`, message{kind: msgRestartComplete, pid: 7}},
	{`{"Response":{"Restart\u0046ailed":""}}`, message{kind: msgRestartFailed}},

	// PIDs: the whole u32 range, plain integers.
	{`{"Response":{"RestartComplete":0}}`, message{kind: msgRestartComplete, pid: 0}},
	{`{"Response":{"RestartComplete":4294967295}}`, message{kind: msgRestartComplete, pid: 4294967295}},

	// Text: every escape, surrogate pairs in either case, raw UTF-8 and DEL.
	{`{"Response":{"RestartFailed":"\"\\\/\b\f\n\r\t"}}`, message{kind: msgRestartFailed, text: "\"\\/\b\f\n\r\t"}},
	{`{"Response":{"RestartFailed":"\u0000\u001f\u00e9\u00E9\u20ac"}}`, message{kind: msgRestartFailed, text: "\x00\x1féé€"}},
	{`{"Response":{"RestartFailed":"\ud83d\ude00\uD83D\uDE00\udbff\udfff"}}`, message{kind: msgRestartFailed, text: "😀😀\U0010ffff"}},
	{`{"Response":{"RestartFailed":"é€😀` + "\x7f" + `"}}`, message{kind: msgRestartFailed, text: "é€😀\x7f"}},
	{`{"Response":{"RestartFailed":"\ufffd` + "\ufffd" + `"}}`, message{kind: msgRestartFailed, text: "\ufffd\ufffd"}},
	{`{"Response":{"RestartFailed":"{\"Request\":\"TryRestart\"}"}}`, message{kind: msgRestartFailed, text: `{"Request":"TryRestart"}`}},
}

// wireRejected lists payloads serde_json::from_slice::<RestartMessage> refuses.
var wireRejected = []struct {
	in     string
	reason string
}{
	{"", "empty payload"},
	{" \n", "whitespace only"},
	{"null", "not an enum"},
	{"[]", "not an enum"},
	{`["Request","TryRestart"]`, "enums are not arrays"},
	{`"Request"`, "a newtype variant as a bare string"},
	{`"TryRestart"`, "not a RestartMessage variant"},
	{`{}`, "an enum object needs one key"},
	{`{"Request"}`, "no colon, no value"},
	{`{"Request":}`, "no value"},
	{`{"Request":"TryRestart"`, "no closing brace"},
	{`{"Request":"TryRestart"`, "no closing brace"},
	{`{"Request`, "unterminated key"},
	{`{`, "ends after the brace"},
	{`{"Request":"TryRestart"}}`, "trailing brace"},
	{`{"Request":"TryRestart"}x`, "trailing data"},
	{`{"Request":"TryRestart"}{"Request":"TryRestart"}`, "two values"},
	{`{"Request":"TryRestart"}` + "\x00", "trailing NUL"},
	{"\f" + `{"Request":"TryRestart"}`, "form feed is not JSON whitespace"},
	{`{"Request":"TryRestart"}` + "\v", "vertical tab is not JSON whitespace"},
	{"\xef\xbb\xbf" + `{"Request":"TryRestart"}`, "a byte order mark is not whitespace"},
	{"\u00a0" + `{"Request":"TryRestart"}`, "no-break space is not JSON whitespace"},
	{`{"Request":"TryRestart","Request":"TryRestart"}`, "second key, even a duplicate"},
	{`{"Request":"TryRestart","Response":{"RestartComplete":1}}`, "second key"},
	{`{"Request":"TryRestart",}`, "trailing comma"},
	{`{"request":"TryRestart"}`, "names are case-sensitive"},
	{`{"Request":"tryrestart"}`, "names are case-sensitive"},
	{`{"Request ":"TryRestart"}`, "names are exact"},
	{`{"Request":"TryRestart "}`, "names are exact"},
	{`{"Request\u0000":"TryRestart"}`, "names are exact, NUL included"},
	{`{"Request":"TryRestartTryRestartTryRestartTryRestartTryRestart"}`, "unknown long name"},
	{`{"Requests":"TryRestart"}`, "unknown variant"},
	{`{"Request":"Restart"}`, "unknown variant"},
	{`{"Response":"RestartComplete"}`, "a newtype variant as a bare string"},
	{`{"Response":"RestartFailed"}`, "a newtype variant as a bare string"},
	{`{"Request":{"TryRestart":{}}}`, "a unit is null"},
	{`{"Request":{"TryRestart":""}}`, "a unit is null"},
	{`{"Request":{"TryRestart":0}}`, "a unit is null"},
	{`{"Request":{"TryRestart":nul}}`, "truncated null"},
	{`{"Request":{"TryRestart":nulll}}`, "null followed by garbage"},
	{`{"Request":{"TryRestart":Null}}`, "null is lowercase"},
	{`{"Request":{"TryRestart"}}`, "no colon"},
	{`{"Request":{"TryRestart":null,"TryRestart":null}}`, "second key in the inner enum"},
	{`{"Request":{}}`, "an enum object needs one key"},
	{`{"Request":null}`, "not an enum"},
	{`{"Request":["TryRestart"]}`, "not an enum"},
	{`{"Response":{"RestartComplete":"1234"}}`, "the PID is a number, not a string"},
	{`{"Response":{"RestartComplete":-1}}`, "negative"},
	{`{"Response":{"RestartComplete":-0}}`, "serde_json parses -0 as a float"},
	{`{"Response":{"RestartComplete":+1}}`, "no plus sign in JSON"},
	{`{"Response":{"RestartComplete":1.0}}`, "a float"},
	{`{"Response":{"RestartComplete":1.}}`, "not even a JSON number"},
	{`{"Response":{"RestartComplete":1e3}}`, "exponent makes a float"},
	{`{"Response":{"RestartComplete":1E3}}`, "exponent makes a float"},
	{`{"Response":{"RestartComplete":0e0}}`, "exponent makes a float"},
	{`{"Response":{"RestartComplete":01}}`, "leading zero"},
	{`{"Response":{"RestartComplete":00}}`, "leading zero"},
	{`{"Response":{"RestartComplete":4294967296}}`, "larger than u32"},
	{`{"Response":{"RestartComplete":18446744073709551616}}`, "larger than u64"},
	{`{"Response":{"RestartComplete":0x10}}`, "no hex in JSON"},
	{`{"Response":{"RestartComplete":1 2}}`, "two numbers"},
	{`{"Response":{"RestartComplete":null}}`, "not a number"},
	{`{"Response":{"RestartComplete":}}`, "no value"},
	{`{"Response":{"RestartComplete":1,"RestartFailed":"x"}}`, "second key"},
	{`{"Response":{"RestartFailed":1}}`, "the text is a string"},
	{`{"Response":{"RestartFailed":null}}`, "the text is a string"},
	{`{"Response":{"RestartFailed":["x"]}}`, "the text is a string"},
	{`{"Response":{"RestartFailed":"abc`, "unterminated string"},
	{`{"Response":{"RestartFailed":"abc\`, "unterminated escape"},
	{`{"Response":{"RestartFailed":"abc\"}}`, "escaped quote does not terminate"},
	{`{"Response":{"RestartFailed":"a` + "\x01" + `b"}}`, "raw control character"},
	{`{"Response":{"RestartFailed":"a` + "\n" + `b"}}`, "raw newline"},
	{`{"Response":{"RestartFailed":"a` + "\t" + `b"}}`, "raw tab"},
	{`{"Response":{"RestartFailed":"` + "\x1f" + `"}}`, "raw unit separator"},
	{`{"Response":{"RestartFailed":"\x41"}}`, "no \\x escape in JSON"},
	{`{"Response":{"RestartFailed":"\U0041"}}`, "\\u is lowercase"},
	{`{"Response":{"RestartFailed":"\a"}}`, "no \\a escape in JSON"},
	{`{"Response":{"RestartFailed":"\'"}}`, "no \\' escape in JSON"},
	{`{"Response":{"RestartFailed":"\u12"}}`, "short \\u escape"},
	{`{"Response":{"RestartFailed":"\u12G4"}}`, "bad hex digit"},
	{`{"Response":{"RestartFailed":"\u`, "truncated \\u escape"},
	{`{"Response":{"RestartFailed":"\ud800"}}`, "lone high surrogate"},
	{`{"Response":{"RestartFailed":"\ud800x"}}`, "high surrogate followed by a character"},
	{`{"Response":{"RestartFailed":"\ud800\n"}}`, "high surrogate followed by another escape"},
	{`{"Response":{"RestartFailed":"\ud800\u0041"}}`, "high surrogate followed by a non-surrogate"},
	{`{"Response":{"RestartFailed":"\ud800\ud800"}}`, "two high surrogates"},
	{`{"Response":{"RestartFailed":"\udc00"}}`, "lone low surrogate"},
	{`{"Response":{"RestartFailed":"\ude00\ud83d"}}`, "surrogates in the wrong order"},
	{`{"Response":{"RestartFailed":"\ud800\`, "truncated after a high surrogate"},
	{`{"Response":{"RestartFailed":"\ud800\u`, "truncated in the low surrogate"},
	{`{"Response":{"RestartFailed":"` + "\xff" + `"}}`, "invalid UTF-8"},
	{`{"Response":{"RestartFailed":"` + "\xe2\x82" + `"}}`, "truncated UTF-8 sequence"},
	{`{"Response":{"RestartFailed":"` + "\xc0\xaf" + `"}}`, "overlong UTF-8"},
	{`{"Response":{"RestartFailed":"` + "\xed\xa0\x80" + `"}}`, "UTF-8-encoded surrogate"},
	{`{"Response":{"RestartFailed":"` + "\xf4\x90\x80\x80" + `"}}`, "UTF-8 past U+10FFFF"},
	{`{"Response":{"RestartFailed":"x\u0041` + "\xff" + `"}}`, "invalid UTF-8 after an escape"},
	{`{"Re` + "\xff" + `quest":"TryRestart"}`, "invalid UTF-8 in a key"},
	{`{"Req` + "\n" + `uest":"TryRestart"}`, "raw control character in a key"},
	{`{"Request":"Try\ud800Restart"}`, "lone surrogate in a variant name"},
	{`{"Request":` + "\xff" + `}`, "invalid UTF-8 outside a string"},
	{`{'Request':'TryRestart'}`, "single quotes"},
	{`{Request:TryRestart}`, "unquoted names"},
	{`{"Request":"TryRestart"/**/}`, "no comments in JSON"},
}

func TestWireDecodeAccepted(t *testing.T) {
	for _, tt := range wireAccepted {
		got, err := decodeMessage([]byte(tt.in))
		if err != nil || got != tt.want {
			t.Errorf("decodeMessage(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
		// The table must agree with the reference decoder, or one of them is wrong.
		if ref, err := wireRefDecode([]byte(tt.in)); err != nil || ref != tt.want {
			t.Errorf("reference(%q) = %+v, %v; want %+v", tt.in, ref, err, tt.want)
		}
	}
}

func TestWireDecodeRejected(t *testing.T) {
	for _, tt := range wireRejected {
		got, err := decodeMessage([]byte(tt.in))
		if err == nil {
			t.Errorf("decodeMessage(%q) = %+v, want an error (%s)", tt.in, got, tt.reason)
		} else if !strings.HasPrefix(err.Error(), "wire: ") {
			t.Errorf("decodeMessage(%q): error %q lacks the package prefix", tt.in, err)
		}
		if ref, err := wireRefDecode([]byte(tt.in)); err == nil {
			t.Errorf("reference(%q) = %+v, want an error (%s)", tt.in, ref, tt.reason)
		}
	}
}

// wireErrors maps payloads to the start of the error decodeMessage returns.
var wireErrors = []struct {
	in   string
	want string
}{
	{``, `wire: offset 0: expected "{", found the end of the message`},
	{" \n", `wire: offset 2: expected "{", found the end of the message`},
	{`{"Foo":1}`, `wire: offset 1: unknown variant "Foo", expected "Request" or "Response"`},
	{`{"Request":"Foo"}`, `wire: offset 11: unknown variant "Foo", expected "TryRestart"`},
	{`{"Response":{"Foo":1}}`, `wire: offset 13: unknown variant "Foo", expected "RestartComplete" or "RestartFailed"`},
	{`{"Request":"TryRestartTryRestartTryRestartTryRestart"}`, `wire: offset 11: unknown variant "TryRestartTryRestartTryRestartTr"..., expected "TryRestart"`},
	{`{"Request":"Try\u0052estartTryRestartTryRestartTryRestart"}`, `wire: offset 11: unknown variant "TryRestartTryRestartTryRestartTr"..., expected "TryRestart"`},
	{`"Request"`, `wire: offset 0: expected "{", found "\""`},
	{`{}`, `wire: offset 1: expected a string, found "}"`},
	{`{"Request":"TryRestart","x":1}`, `wire: offset 23: expected "}", found ","`},
	{`{"Request":"TryRestart"}x`, `wire: offset 24: expected the end of the message, found "x"`},
	{`{"Request":"TryRestart"`, `wire: offset 23: expected "}", found the end of the message`},
	{`{"Request":{"TryRestart":nul}}`, `wire: offset 25: expected "null", found "n"`},
	{`{"Response":{"RestartComplete":-0}}`, `wire: offset 31: expected a process ID, an integer from 0 to 4294967295, found "-"`},
	{`{"Response":{"RestartComplete":01}}`, `wire: offset 31: process ID is not a JSON integer without leading zeros, fraction or exponent`},
	{`{"Response":{"RestartComplete":1.5}}`, `wire: offset 31: process ID is not a JSON integer`},
	{`{"Response":{"RestartComplete":4294967296}}`, `wire: offset 31: process ID is larger than 4294967295`},
	{`{"Response":{"RestartFailed":"` + "\x01" + `"}}`, `wire: offset 30: raw control character U+0001 in a string; it must be escaped`},
	{`{"Response":{"RestartFailed":"` + "\xff" + `"}}`, `wire: offset 30: invalid UTF-8 in a string`},
	{`{"Response":{"RestartFailed":"\q"}}`, `wire: offset 30: invalid escape`},
	{`{"Response":{"RestartFailed":"\u12"}}`, `wire: offset 30: invalid escape`},
	{`{"Response":{"RestartFailed":"\ud800"}}`, `wire: offset 30: unpaired surrogate \ud800`},
	{`{"Response":{"RestartFailed":"\udc00"}}`, `wire: offset 30: unpaired surrogate \udc00`},
	{`{"Response":{"RestartFailed":"\ud800\u0041"}}`, `wire: offset 30: unpaired surrogate \ud800`},
	{`{"Response":{"RestartFailed":"abc`, `wire: offset 29: string is not terminated`},
	{`{"Response":{"RestartFailed":"abc\`, `wire: offset 29: string is not terminated`},
	{"\xef\xbb\xbf{}", `wire: offset 0: expected "{", found "\xef"`},
}

// TestWireDecodeErrors checks that errors say what was wrong.
func TestWireDecodeErrors(t *testing.T) {
	for _, tt := range wireErrors {
		_, err := decodeMessage([]byte(tt.in))
		if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
			t.Errorf("decodeMessage(%q) error = %v, want it to start with %q", tt.in, err, tt.want)
		}
	}
}

// TestWireDecodeCopiesText checks that a decoded text does not alias the
// payload, which readFrame reuses for the next frame.
func TestWireDecodeCopiesText(t *testing.T) {
	for _, in := range []string{`{"Response":{"RestartFailed":"abc"}}`, `{"Response":{"RestartFailed":"a\nc"}}`} {
		p := []byte(in)
		m, err := decodeMessage(p)
		if err != nil {
			t.Fatal(err)
		}
		before := m.text
		for i := range p {
			p[i] = 'X'
		}
		if m.text != strings.Clone(before) || (m.text != "abc" && m.text != "a\nc") {
			t.Errorf("text changed with the payload: %q", m.text)
		}
	}
}

func TestWireReadFrame(t *testing.T) {
	errBoom := errors.New("boom")
	tests := []struct {
		name    string
		r       io.Reader
		want    string // payload, when wantErr is nil
		wantErr error  // checked with errors.Is, or exactly for io.EOF
		errText string
	}{
		{name: "clean EOF", r: bytes.NewReader(nil), wantErr: io.EOF},
		{name: "header 1 byte", r: bytes.NewReader([]byte{0}), wantErr: io.ErrUnexpectedEOF, errText: "wire: reading frame header, 1 of 4 bytes: unexpected EOF"},
		{name: "header 3 bytes", r: bytes.NewReader([]byte{0, 0, 0}), wantErr: io.ErrUnexpectedEOF},
		{name: "payload missing", r: bytes.NewReader([]byte{0, 0, 0, 5}), wantErr: io.ErrUnexpectedEOF, errText: "wire: reading frame payload, 0 of 5 bytes: unexpected EOF"},
		{name: "payload short", r: bytes.NewReader([]byte{0, 0, 0, 5, 'a', 'b'}), wantErr: io.ErrUnexpectedEOF, errText: "reading frame payload, 2 of 5 bytes"},
		{name: "zero length", r: bytes.NewReader([]byte{0, 0, 0, 0}), want: ""},
		{name: "one frame", r: bytes.NewReader(wireFrameOf("hello")), want: "hello"},
		{name: "trailing bytes stay unread", r: bytes.NewReader(append(wireFrameOf("hi"), 0, 0)), want: "hi"},
		{name: "one byte at a time", r: iotest.OneByteReader(bytes.NewReader(wireFrameOf("hello"))), want: "hello"},
		{name: "data with EOF", r: iotest.DataErrReader(bytes.NewReader(wireFrameOf("hello"))), want: "hello"},
		{name: "exactly the limit", r: bytes.NewReader(append(binary.BigEndian.AppendUint32(nil, maxFrameLen), make([]byte, maxFrameLen)...)), want: string(make([]byte, maxFrameLen))},
		{name: "limit + 1", r: bytes.NewReader(binary.BigEndian.AppendUint32(nil, maxFrameLen+1)), errText: "wire: frame of 65537 bytes exceeds the 65536-byte limit"},
		{name: "1 GiB", r: bytes.NewReader(binary.BigEndian.AppendUint32(nil, 1<<30)), errText: "wire: frame of 1073741824 bytes exceeds the 65536-byte limit"},
		{name: "4 GiB - 1", r: bytes.NewReader([]byte{0xff, 0xff, 0xff, 0xff}), errText: "wire: frame of 4294967295 bytes exceeds the 65536-byte limit"},
		{name: "error in header", r: iotest.ErrReader(errBoom), wantErr: errBoom, errText: "wire: reading frame header, 0 of 4 bytes: boom"},
		{name: "error in payload", r: io.MultiReader(bytes.NewReader([]byte{0, 0, 0, 5}), iotest.ErrReader(errBoom)), wantErr: errBoom, errText: "wire: reading frame payload, 0 of 5 bytes: boom"},
	}
	for _, tt := range tests {
		for _, scratch := range [][]byte{nil, make([]byte, 0, 3), make([]byte, 0, 16), make([]byte, 0, maxFrameLen)} {
			if r, ok := tt.r.(*bytes.Reader); ok {
				r.Seek(0, io.SeekStart)
			}
			got, err := readFrame(tt.r, scratch)
			switch {
			case tt.wantErr == nil && tt.errText == "":
				if err != nil || string(got) != tt.want || got == nil {
					t.Errorf("%s (scratch %d): got %q, %v; want %q", tt.name, cap(scratch), got, err, tt.want)
				}
			case tt.wantErr == io.EOF:
				if err != io.EOF || got != nil {
					t.Errorf("%s: got %q, %v; want exactly io.EOF", tt.name, got, err)
				}
			default:
				if err == nil || got != nil ||
					(tt.wantErr != nil && !errors.Is(err, tt.wantErr)) ||
					!strings.Contains(err.Error(), tt.errText) ||
					(tt.wantErr != io.ErrUnexpectedEOF && errors.Is(err, io.ErrUnexpectedEOF)) ||
					errors.Is(err, io.EOF) {
					t.Errorf("%s: got %q, %v; want error %v containing %q", tt.name, got, err, tt.wantErr, tt.errText)
				}
			}
			// Only the readers that can be rewound are tried with every scratch.
			if _, ok := tt.r.(*bytes.Reader); !ok {
				break
			}
		}
	}
}

func TestWireReadFrameScratch(t *testing.T) {
	frame := wireFrameOf("hello")
	scratch := make([]byte, 0, 16)
	got, err := readFrame(bytes.NewReader(frame), scratch)
	if err != nil || string(got) != "hello" {
		t.Fatalf("got %q, %v", got, err)
	}
	if &got[0] != &scratch[:1][0] {
		t.Error("the payload was not read into scratch, which had room")
	}
	small := make([]byte, 0, 4)
	got, err = readFrame(bytes.NewReader(frame), small)
	if err != nil || string(got) != "hello" {
		t.Fatalf("got %q, %v", got, err)
	}
	if &got[0] == &small[:1][0] {
		t.Error("the payload overran scratch")
	}
}

// TestWireReadFrameRefusesBeforeAllocating shows that a header claiming a
// huge frame costs a small, fixed amount whatever the length it claims: the
// error and nothing else. (The error names the length, so it has to be built
// then; fmt.Errorf takes about three allocations and 170 bytes, a little
// more under -race, where sync.Pool drops fmt's buffers at random.)
func TestWireReadFrameRefusesBeforeAllocating(t *testing.T) {
	const maxAllocs, maxBytes = 6, 512
	scratch := make([]byte, 0, 64)
	for _, n := range []uint32{maxFrameLen + 1, 1 << 20, 1 << 30, 1<<32 - 1} {
		hdr := binary.BigEndian.AppendUint32(nil, n)
		r := bytes.NewReader(hdr)
		run := func() {
			r.Reset(hdr)
			if _, err := readFrame(r, scratch); err == nil {
				t.Fatal("no error")
			}
		}
		allocs := testing.AllocsPerRun(100, run)
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range 100 {
			run()
		}
		runtime.ReadMemStats(&after)
		perCall := (after.TotalAlloc - before.TotalAlloc) / 100
		if allocs > maxAllocs || perCall > maxBytes {
			t.Errorf("header claiming %d bytes: %v allocs, %d bytes per call; want at most %d and %d",
				n, allocs, perCall, maxAllocs, maxBytes)
		}
	}
}

func TestWireAllocs(t *testing.T) {
	buf := make([]byte, 0, maxFrameLen+4)
	text200 := strings.Repeat("restart failed: ", 12) + "12345678" // 200 bytes
	mixed := strings.Repeat("a\"\\\n\x01é\xff", 20)
	huge := strings.Repeat("x", 100000)
	zero := []struct {
		name string
		fn   func()
	}{
		{"appendTryRestart", func() { buf = appendTryRestart(buf[:0]) }},
		{"appendRestartComplete", func() { buf = appendRestartComplete(buf[:0], 4294967295) }},
		{"appendRestartFailed 200 bytes", func() { buf = appendRestartFailed(buf[:0], text200) }},
		{"appendRestartFailed escapes", func() { buf = appendRestartFailed(buf[:0], mixed) }},
		{"appendRestartFailed truncated", func() { buf = appendRestartFailed(buf[:0], huge) }},
	}
	for _, in := range []string{
		`{"Request":"TryRestart"}`,
		`{"Request":{"TryRestart":null}}`,
		" { \"Req\\u0075est\" : { \"Try\\u0052estart\" : null } } ",
		`{"Response":{"RestartComplete":1234}}`,
	} {
		p := []byte(in)
		zero = append(zero, struct {
			name string
			fn   func()
		}{"decodeMessage " + in, func() {
			if _, err := decodeMessage(p); err != nil {
				t.Fatal(err)
			}
		}})
	}
	frame := appendRestartFailed(nil, text200)
	r := bytes.NewReader(frame)
	scratch := make([]byte, 0, maxFrameLen)
	zero = append(zero, struct {
		name string
		fn   func()
	}{"readFrame into scratch", func() {
		r.Reset(frame)
		if _, err := readFrame(r, scratch); err != nil {
			t.Fatal(err)
		}
	}})
	for _, tt := range zero {
		if n := testing.AllocsPerRun(100, tt.fn); n != 0 {
			t.Errorf("%s: %v allocs, want 0", tt.name, n)
		}
	}

	// RestartFailed allocates its text once; a short text with escapes twice,
	// the decoding buffer and then the string.
	for _, tt := range []struct {
		in   string
		want float64
	}{
		{`{"Response":{"RestartFailed":"` + text200 + `"}}`, 1},
		{`{"Response":{"RestartFailed":"a\nb"}}`, 2},
	} {
		p := []byte(tt.in)
		if n := testing.AllocsPerRun(100, func() { decodeMessage(p) }); n > tt.want {
			t.Errorf("decodeMessage(%.40q...): %v allocs, want at most %v", tt.in, n, tt.want)
		}
	}
}

// wireRefDecode is a reference decoder built on encoding/json, for checking
// decodeMessage. It applies serde_json's rules for RestartMessage where
// encoding/json differs from serde_json:
//   - encoding/json replaces invalid UTF-8 in strings with U+FFFD; serde_json
//     refuses it. Invalid UTF-8 outside strings is a syntax error in both, so
//     the whole payload must be valid UTF-8.
//   - encoding/json replaces an unpaired surrogate escape with U+FFFD;
//     serde_json refuses it. wireRefLoneSurrogate checks.
//   - encoding/json keeps the last of duplicate keys; an enum object must
//     have exactly one key, so the keys are counted with Decoder.Token.
//   - encoding/json has no enums: the two forms of a unit variant and the
//     object form of a newtype variant are spelt out below, and a u32 is
//     checked against the JSON integer grammar (which has no "-0").
//
// Whitespace, literals, escapes and the rule against raw control characters
// are the same in both and left to encoding/json.
func wireRefDecode(p []byte) (message, error) {
	if !utf8.Valid(p) {
		return message{}, errors.New("invalid UTF-8")
	}
	if !json.Valid(p) {
		return message{}, errors.New("invalid JSON")
	}
	if wireRefLoneSurrogate(p) {
		return message{}, errors.New("unpaired surrogate")
	}
	name, value, isObject, err := wireRefEnum(p)
	if err != nil {
		return message{}, err
	}
	if !isObject {
		return message{}, errors.New("RestartMessage variants carry a value")
	}
	inner, innerValue, innerIsObject, err := wireRefEnum(value)
	if err != nil {
		return message{}, err
	}
	switch name {
	case "Request":
		if inner != "TryRestart" {
			return message{}, errors.New("unknown RestartRequest variant")
		}
		if innerIsObject && string(innerValue) != "null" {
			return message{}, errors.New("a unit variant's value is null")
		}
		return message{kind: msgTryRestart}, nil
	case "Response":
		if !innerIsObject {
			return message{}, errors.New("RestartResponse variants carry a value")
		}
		switch inner {
		case "RestartComplete":
			if !wireRefUint.Match(innerValue) {
				return message{}, errors.New("not a JSON integer without sign, fraction or exponent")
			}
			n, err := strconv.ParseUint(string(innerValue), 10, 32)
			if err != nil {
				return message{}, err
			}
			return message{kind: msgRestartComplete, pid: uint32(n)}, nil
		case "RestartFailed":
			if innerValue[0] != '"' {
				return message{}, errors.New("not a string")
			}
			var s string
			if err := json.Unmarshal(innerValue, &s); err != nil {
				return message{}, err
			}
			return message{kind: msgRestartFailed, text: s}, nil
		}
		return message{}, errors.New("unknown RestartResponse variant")
	}
	return message{}, errors.New("unknown RestartMessage variant")
}

var wireRefUint = regexp.MustCompile(`^(0|[1-9][0-9]*)$`)

// wireRefEnum splits an externally tagged enum, valid JSON, into its variant
// name and, for the object form, the value (without surrounding whitespace).
func wireRefEnum(raw []byte) (name string, value []byte, isObject bool, err error) {
	raw = bytes.Trim(raw, " \t\r\n")
	switch raw[0] {
	case '"':
		err = json.Unmarshal(raw, &name)
		return name, nil, false, err
	case '{':
		dec := json.NewDecoder(bytes.NewReader(raw))
		if _, err := dec.Token(); err != nil { // '{'
			return "", nil, false, err
		}
		tok, err := dec.Token()
		if err != nil {
			return "", nil, false, err
		}
		name, ok := tok.(string)
		if !ok {
			return "", nil, false, errors.New("an enum object needs a key")
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return "", nil, false, err
		}
		if tok, err := dec.Token(); err != nil || tok != json.Delim('}') {
			return "", nil, false, errors.New("an enum object has one key")
		}
		return name, bytes.Trim(v, " \t\r\n"), true, nil
	}
	return "", nil, false, errors.New("an enum is a string or an object")
}

// wireRefLoneSurrogate reports whether valid JSON p has a \u escape for a
// surrogate that is not part of a high-low pair.
func wireRefLoneSurrogate(p []byte) bool {
	surrogate := func(i int) (r rune, ok bool) { // the \uXXXX at p[i:], if any
		if i+6 > len(p) || p[i] != '\\' || p[i+1] != 'u' {
			return 0, false
		}
		n, err := strconv.ParseUint(string(p[i+2:i+6]), 16, 32)
		if err != nil {
			return 0, false
		}
		return rune(n), true
	}
	inString := false
	for i := 0; i < len(p); i++ {
		switch {
		case p[i] == '"':
			inString = !inString
		case inString && p[i] == '\\':
			r, ok := surrogate(i)
			if !ok { // a one-character escape
				i++
				continue
			}
			switch {
			case 0xdc00 <= r && r <= 0xdfff:
				return true
			case 0xd800 <= r && r <= 0xdbff:
				lo, ok := surrogate(i + 6)
				if !ok || lo < 0xdc00 || lo > 0xdfff {
					return true
				}
				i += 6
			}
			i += 5
		}
	}
	return false
}

// FuzzWireDecode checks decodeMessage against the encoding/json reference:
// both must accept the same payloads and agree on the message. What is
// accepted must also survive a re-encoding unchanged.
func FuzzWireDecode(f *testing.F) {
	wireFuzzAgainst(f, "reference", wireRefDecode, func(t *testing.T, p []byte, got message, err error) {
		if err != nil {
			if !strings.HasPrefix(err.Error(), "wire: ") {
				t.Fatalf("error %q lacks the package prefix", err)
			}
			return
		}
		// serde_json's form is never longer than any other, so a payload
		// that fits in a frame re-encodes without being cut short.
		// decodeMessage itself takes longer ones; readFrame would not.
		if len(p) > maxFrameLen {
			return
		}
		frame := wireAppend(nil, got)
		again, err := decodeMessage(frame[4:])
		if err != nil || again != got {
			t.Fatalf("re-encoded %+v as %q, which decodes to %+v, %v", got, frame, again, err)
		}
	})
}

// FuzzWireRoundTrip encodes arbitrary messages, reads them back through
// readFrame and decodeMessage, and checks the text against the reference
// lossy conversion and truncation rule, and the bytes against encoding/json.
func FuzzWireRoundTrip(f *testing.F) {
	for _, tt := range wireEscapes {
		f.Add(tt.in, uint32(len(tt.in)))
	}
	for _, tt := range wireAccepted {
		f.Add(tt.want.text, tt.want.pid)
	}
	f.Add(strings.Repeat("\x01", 20000), uint32(1<<32-1))
	f.Add(strings.Repeat("a", maxFrameLen-34)+"é", uint32(0))
	f.Fuzz(func(t *testing.T, text string, pid uint32) {
		var stream []byte
		stream = appendRestartFailed(stream, text)
		stream = appendRestartComplete(stream, pid)
		stream = appendTryRestart(stream)
		r := bytes.NewReader(stream)
		scratch := make([]byte, 0, 256)

		payload, err := readFrame(r, scratch)
		if err != nil {
			t.Fatal(err)
		}
		if len(payload) > maxFrameLen {
			t.Fatalf("payload of %d bytes", len(payload))
		}
		m, err := decodeMessage(payload)
		if err != nil || m.kind != msgRestartFailed {
			t.Fatalf("decode(%q) = %+v, %v", payload, m, err)
		}
		full := wireRefLossy(text)
		if !strings.HasPrefix(full, m.text) {
			t.Fatalf("text %q came back as %q, not a prefix of %q", text, m.text, full)
		}
		if len(m.text) < len(full) {
			// Cut short: the next character must not have fit.
			next, _ := utf8.DecodeRuneInString(full[len(m.text):])
			if len(payload)+wireRefEscapedLen(next) <= maxFrameLen {
				t.Fatalf("text cut at %d of %d bytes, but %q would fit in a %d-byte payload", len(m.text), len(full), next, len(payload))
			}
		}
		if !strings.ContainsAny(full, "\u2028\u2029") {
			if want := wireRefPayloadFailed(m.text); string(payload) != want {
				t.Fatalf("payload %q, encoding/json writes %q", payload, want)
			}
		}
		var ref map[string]map[string]string
		if err := json.Unmarshal(payload, &ref); err != nil || ref["Response"]["RestartFailed"] != m.text {
			t.Fatalf("encoding/json reads %q as %v, %v", payload, ref, err)
		}

		payload, err = readFrame(r, scratch)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf(`{"Response":{"RestartComplete":%d}}`, pid); string(payload) != want {
			t.Fatalf("payload %q, want %q", payload, want)
		}
		if m, err := decodeMessage(payload); err != nil || m != (message{kind: msgRestartComplete, pid: pid}) {
			t.Fatalf("decode(%q) = %+v, %v", payload, m, err)
		}

		payload, err = readFrame(r, scratch)
		if err != nil {
			t.Fatal(err)
		}
		if m, err := decodeMessage(payload); err != nil || m != (message{kind: msgTryRestart}) {
			t.Fatalf("decode(%q) = %+v, %v", payload, m, err)
		}
		if _, err := readFrame(r, scratch); err != io.EOF {
			t.Fatalf("at the end: %v, want io.EOF", err)
		}
	})
}

// wireRefEscapedLen is how many bytes serde_json writes for r in a string.
func wireRefEscapedLen(r rune) int {
	switch {
	case r == '"' || r == '\\' || r == '\b' || r == '\f' || r == '\n' || r == '\r' || r == '\t':
		return 2
	case r < 0x20:
		return 6
	}
	return utf8.RuneLen(r)
}

// FuzzWireReadFrame feeds readFrame arbitrary streams and checks each result
// against a direct reading of the stream's headers.
func FuzzWireReadFrame(f *testing.F) {
	f.Add([]byte{}, uint16(0))
	f.Add([]byte{0, 0, 0}, uint16(64))
	f.Add([]byte{0, 0, 0, 0}, uint16(64))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff}, uint16(64))
	f.Add([]byte{0, 1, 0, 1}, uint16(64))
	f.Add([]byte{0, 0, 0, 5, 'a'}, uint16(2))
	for _, tt := range wireAccepted {
		f.Add(wireFrameOf(tt.in), uint16(16))
	}
	for _, tt := range wireRejected {
		f.Add(wireFrameOf(tt.in), uint16(64))
	}
	f.Add(appendTryRestart(appendRestartComplete(appendRestartFailed(nil, "x"), 1)), uint16(32))
	f.Fuzz(func(t *testing.T, data []byte, scratchCap uint16) {
		r := bytes.NewReader(data)
		scratch := make([]byte, 0, int(scratchCap))
		rest := data
		for {
			payload, err := readFrame(r, scratch)
			switch {
			case len(rest) == 0:
				if err != io.EOF || payload != nil {
					t.Fatalf("at the end: %q, %v; want io.EOF", payload, err)
				}
				return
			case len(rest) < 4:
				if !errors.Is(err, io.ErrUnexpectedEOF) || payload != nil {
					t.Fatalf("%d header bytes: %q, %v", len(rest), payload, err)
				}
				return
			}
			n := binary.BigEndian.Uint32(rest)
			switch {
			case n > maxFrameLen:
				if err == nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
					!strings.Contains(err.Error(), strconv.FormatUint(uint64(n), 10)) || payload != nil {
					t.Fatalf("length %d: %q, %v", n, payload, err)
				}
				return
			case uint64(len(rest)-4) < uint64(n):
				if !errors.Is(err, io.ErrUnexpectedEOF) || payload != nil {
					t.Fatalf("length %d with %d bytes left: %q, %v", n, len(rest)-4, payload, err)
				}
				return
			}
			if err != nil || !bytes.Equal(payload, rest[4:4+n]) || payload == nil {
				t.Fatalf("length %d: %q, %v; want %q", n, payload, err, rest[4:4+n])
			}
			rest = rest[4+n:]
			// Whatever the payload, decoding it must not panic, and what it
			// accepts must encode to something it accepts again.
			if m, err := decodeMessage(payload); err == nil {
				if again, err := decodeMessage(wireAppend(nil, m)[4:]); err != nil || again != m {
					t.Fatalf("%+v: re-decoded as %+v, %v", m, again, err)
				}
			}
		}
	})
}

// wireSeeds returns every payload the tests and fuzz seeds in this file
// decode or encode, to seed the decoding fuzzers.
func wireSeeds() [][]byte {
	var seeds [][]byte
	add := func(p string) { seeds = append(seeds, []byte(p)) }
	for _, tt := range wireAccepted {
		add(tt.in)
	}
	for _, tt := range wireRejected {
		add(tt.in)
	}
	for _, tt := range wireErrors {
		add(tt.in)
	}
	// From TestWireAllocs and TestWireDecodeCopiesText.
	add(" { \"Req\\u0075est\" : { \"Try\\u0052estart\" : null } } ")
	add(`{"Response":{"RestartFailed":"` + strings.Repeat("restart failed: ", 12) + "12345678" + `"}}`)
	add(`{"Response":{"RestartFailed":"a\nb"}}`)
	add(`{"Response":{"RestartFailed":"a\nc"}}`)
	// What the encoders write for the texts and PIDs of the other tests and
	// fuzz seeds.
	texts := []string{"fork/exec /usr/bin/app: permission denied", "line 1\nline 2\t\"quoted\" \\ \x00 é 😀",
		strings.Repeat("\x01", 20000), strings.Repeat("a", maxFrameLen-34) + "é"}
	for _, tt := range wireEscapes {
		texts = append(texts, tt.in)
	}
	for _, pid := range []uint32{0, 1, 7, 1234, 4294967295} {
		seeds = append(seeds, appendRestartComplete(nil, pid)[4:])
	}
	seeds = append(seeds, appendTryRestart(nil)[4:])
	for _, text := range texts {
		seeds = append(seeds, appendRestartFailed(nil, text)[4:])
	}
	// Longer than a frame, which decodeMessage does not check (FuzzWireDecode
	// found that its re-encoding is cut short).
	add(`{"Response":{"RestartFailed":"` + strings.Repeat(`\u0001`, maxFrameLen/6) + `"}}`)
	// FuzzWireReadFrame's raw streams, as payloads.
	for _, p := range []string{"", "\x00\x00\x00", "\x00\x00\x00\x00", "\xff\xff\xff\xff", "\x00\x01\x00\x01", "\x00\x00\x00\x05a"} {
		add(p)
	}
	return seeds
}

// FuzzWireDecodeMatchesOld checks decodeMessage against oldDecodeMessage, the
// decoder it replaced: they must accept the same payloads and return the same
// message. The new one must not accept more or less than the old one did,
// since Rust and Go peers already rely on it.
func FuzzWireDecodeMatchesOld(f *testing.F) {
	wireFuzzAgainst(f, "old decoder", oldDecodeMessage, nil)
}

// wireFuzzAgainst fuzzes decodeMessage, from wireSeeds, against ref, a
// decoder that must accept the same payloads and return the same message;
// then, if check is set, checks more of each outcome.
func wireFuzzAgainst(f *testing.F, refName string, ref func([]byte) (message, error), check func(t *testing.T, p []byte, got message, err error)) {
	for _, p := range wireSeeds() {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		got, err := decodeMessage(p)
		want, refErr := ref(p)
		if (err == nil) != (refErr == nil) || got != want {
			t.Fatalf("decodeMessage(%q) = %+v, %v; %s: %+v, %v", p, got, err, refName, want, refErr)
		}
		if check != nil {
			check(t, p, got, err)
		}
	})
}

// The decoder as it was in wire.go before issue 10 made it smaller, kept
// verbatim, names aside, as the reference for FuzzWireDecodeMatchesOld.

// oldDecodeMessage decodes one payload. It accepts exactly the payloads that
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
// PIDs that are not a u32 written as a JSON integer (see oldWireParser.pid);
// anything but whitespace after the value (Deserializer::end); and the empty
// payload.
func oldDecodeMessage(payload []byte) (message, error) {
	if len(payload) == 0 {
		return message{}, errors.New("wire: empty message")
	}
	d := oldWireParser{p: payload}
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

// oldWireParser is a cursor over one payload. Its methods advance i past what
// they consume and, on error, leave it where the problem is.
type oldWireParser struct {
	p []byte
	i int
}

// oldWireName holds a decoded object key or variant name. The longest name in
// the protocol, "RestartComplete", has 15 bytes; longer names cannot match
// anything, so only a prefix of them is kept, for the error message. Names
// live on the caller's stack: comparing them allocates nothing.
type oldWireName struct {
	buf  [32]byte
	n    int
	long bool // the name was longer than buf; buf holds its first bytes
	off  int  // where the name starts in the payload, for errors
}

func (nm *oldWireName) is(s string) bool {
	return !nm.long && string(nm.buf[:nm.n]) == s
}

// message parses a RestartMessage.
func (d *oldWireParser) message() (message, error) {
	var nm oldWireName
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
func (d *oldWireParser) request() error {
	var nm oldWireName
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
func (d *oldWireParser) response() (message, error) {
	var nm oldWireName
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
func (d *oldWireParser) variant(nm *oldWireName) (isObject bool, err error) {
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
func (d *oldWireParser) newtypeValue(nm *oldWireName, isObject bool) error {
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
func (d *oldWireParser) endVariant() error {
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

func (d *oldWireParser) colon() error {
	d.skipSpace()
	if d.i < len(d.p) && d.p[d.i] == ':' {
		d.i++
		return nil
	}
	return d.unexpected("':'")
}

// null consumes the literal null, the only JSON form of a unit (serde_json's
// deserialize_unit).
func (d *oldWireParser) null() error {
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
func (d *oldWireParser) pid() (uint32, error) {
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
func (d *oldWireParser) text() (string, error) {
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
	again := oldWireParser{p: d.p, i: start}
	out, _, _ := again.str(make([]byte, 0, len(raw)))
	return string(out), nil
}

// name parses a string into nm. The caller has checked that d.p[d.i] is '"'.
func (d *oldWireParser) name(nm *oldWireName) error {
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
func (d *oldWireParser) str(dst []byte) (out []byte, whole bool, err error) {
	w := oldWireCapped{b: dst}
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
			return nil, false, fmt.Errorf("wire: invalid escape \\%s in string at offset %d", oldWireQuoteByte(c), esc)
		}
	}
}

// hex4 decodes the four hex digits of a \u escape that starts at esc.
func (d *oldWireParser) hex4(esc int) (rune, error) {
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
func (d *oldWireParser) skipSpace() {
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
func (d *oldWireParser) unexpected(want string) error {
	if d.i >= len(d.p) {
		return fmt.Errorf("wire: message ends at offset %d, expected %s", d.i, want)
	}
	return fmt.Errorf("wire: unexpected %s at offset %d, expected %s", oldWireQuoteByte(d.p[d.i]), d.i, want)
}

func (d *oldWireParser) unknownVariant(nm *oldWireName, want string) error {
	return fmt.Errorf("wire: unknown variant %s at offset %d, expected %s", nm.quote(), nm.off, want)
}

// quote quotes the name for an error message. (oldWireName is not a
// fmt.Stringer on purpose: handing it to fmt would move it to the heap.)
func (nm *oldWireName) quote() string {
	if nm.long {
		return strconv.Quote(string(nm.buf[:nm.n])) + "..."
	}
	return strconv.Quote(string(nm.buf[:nm.n]))
}

// oldWireQuoteByte shows a byte in an error message: printable ASCII quoted,
// anything else in hex.
func oldWireQuoteByte(c byte) string {
	if 0x20 <= c && c < 0x7f {
		return strconv.QuoteRune(rune(c))
	}
	return fmt.Sprintf("byte 0x%02x", c)
}

// oldWireCapped appends to a buffer without ever growing it: what does not fit
// is dropped, so b always holds a prefix of what was added.
type oldWireCapped struct {
	b     []byte
	short bool // something was dropped
}

func (w *oldWireCapped) add(s []byte) {
	n := copy(w.b[len(w.b):cap(w.b)], s)
	w.b = w.b[:len(w.b)+n]
	if n < len(s) {
		w.short = true
	}
}
