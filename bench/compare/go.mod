module github.com/shellflip-go/shellflip/bench/compare

go 1.26.0

require (
	github.com/cloudflare/tableflip v1.2.3
	github.com/shellflip-go/shellflip v0.0.0
	golang.org/x/sys v0.50.0
)

replace github.com/shellflip-go/shellflip => ../..
