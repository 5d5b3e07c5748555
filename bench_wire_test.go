package shellflip

import (
	"bytes"
	"strings"
	"testing"
)

// wireBenchText is a 200-byte RestartFailed text without escapes.
var wireBenchText = strings.Repeat("restart failed: ", 12) + "12345678"

func BenchmarkWireEncode(b *testing.B) {
	buf := make([]byte, 0, maxFrameLen+4)
	b.Run("TryRestart", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			buf = appendTryRestart(buf[:0])
		}
	})
	b.Run("RestartComplete", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			buf = appendRestartComplete(buf[:0], 4294967295)
		}
	})
	b.Run("RestartFailed/200B", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(wireBenchText)))
		for b.Loop() {
			buf = appendRestartFailed(buf[:0], wireBenchText)
		}
	})
	b.Run("RestartFailed/escapes", func(b *testing.B) {
		text := strings.Repeat("a\"\\\n\x01é\xff", 25) // 200 bytes
		b.ReportAllocs()
		b.SetBytes(int64(len(text)))
		for b.Loop() {
			buf = appendRestartFailed(buf[:0], text)
		}
	})
	b.Run("RestartFailed/truncated", func(b *testing.B) {
		text := strings.Repeat("x", 2*maxFrameLen)
		b.ReportAllocs()
		b.SetBytes(maxFrameLen)
		for b.Loop() {
			buf = appendRestartFailed(buf[:0], text)
		}
	})
}

func BenchmarkWireDecode(b *testing.B) {
	for _, bb := range []struct {
		name, in string
	}{
		{"TryRestart/string", `{"Request":"TryRestart"}`},
		{"TryRestart/object", `{"Request":{"TryRestart":null}}`},
		{"RestartComplete", `{"Response":{"RestartComplete":4294967295}}`},
		{"RestartFailed/200B", `{"Response":{"RestartFailed":"` + wireBenchText + `"}}`},
		{"RestartFailed/escapes", `{"Response":{"RestartFailed":"` + strings.Repeat(`a\"\\\n\u0001`, 20) + `"}}`},
	} {
		p := []byte(bb.in)
		b.Run(bb.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(p)))
			for b.Loop() {
				if _, err := decodeMessage(p); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkWireReadFrame(b *testing.B) {
	for _, bb := range []struct {
		name  string
		frame []byte
	}{
		{"TryRestart", appendTryRestart(nil)},
		{"RestartFailed/200B", appendRestartFailed(nil, wireBenchText)},
		{"RestartFailed/64KiB", appendRestartFailed(nil, strings.Repeat("x", maxFrameLen))},
	} {
		b.Run(bb.name, func(b *testing.B) {
			r := bytes.NewReader(bb.frame)
			scratch := make([]byte, 0, maxFrameLen)
			b.ReportAllocs()
			b.SetBytes(int64(len(bb.frame)))
			for b.Loop() {
				r.Reset(bb.frame)
				if _, err := readFrame(r, scratch); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
