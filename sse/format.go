package sse

import (
	"fmt"
	"strconv"
)

// ParseFormat returns the Format named s: "raw" or "envelope". The empty
// string is FormatRaw, so that an omitted JSON config field means raw.
func ParseFormat(s string) (Format, error) {
	switch s {
	case "", "raw":
		return FormatRaw, nil
	case "envelope":
		return FormatEnvelope, nil
	}
	return FormatRaw, fmt.Errorf("unknown format %q (want raw or envelope)", s)
}

// String returns the name ParseFormat accepts for f.
func (f Format) String() string {
	switch f {
	case FormatRaw:
		return "raw"
	case FormatEnvelope:
		return "envelope"
	}
	return "Format(" + strconv.Itoa(int(f)) + ")"
}
