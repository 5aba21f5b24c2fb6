package caddysse_test

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"strings"
	"testing"
)

// apacheLicenseSHA256 is the SHA-256 of the Apache License 2.0 exactly as
// the Apache Software Foundation publishes it
// (https://www.apache.org/licenses/LICENSE-2.0.txt), the file Caddy ships
// as its LICENSE. Tools that detect licenses (pkg.go.dev, GitHub) recognise
// it best unchanged, so the copyright line lives in NOTICE, not in the text.
const apacheLicenseSHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"

// The repository is under the Apache License 2.0, the standard text
// unchanged, with the copyright line in NOTICE and both named in the README.
func TestLicenseIsApache2(t *testing.T) {
	b, err := os.ReadFile("LICENSE")
	if err != nil {
		t.Fatalf("no LICENSE file: %v", err)
	}
	text := string(b)
	for _, want := range []string{
		"Apache License\n                           Version 2.0, January 2004\n",
		"TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
		"9. Accepting Warranty or Additional Liability.",
		"END OF TERMS AND CONDITIONS",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("LICENSE lacks %q", want)
		}
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != apacheLicenseSHA256 {
		t.Errorf("LICENSE is not the standard Apache License 2.0 text unchanged: SHA-256 %s, want %s", got, apacheLicenseSHA256)
	}

	notice, err := os.ReadFile("NOTICE")
	if err != nil {
		t.Fatalf("no NOTICE file: %v", err)
	}
	if !strings.Contains(string(notice), "\nCopyright 2026 The caddy-sse Authors\n") {
		t.Errorf("NOTICE lacks the line %q:\n%s", "Copyright 2026 The caddy-sse Authors", notice)
	}

	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "## License\n\nApache License 2.0: see [LICENSE](LICENSE) and [NOTICE](NOTICE).") {
		t.Error("the README has no License section naming the Apache License 2.0, LICENSE and NOTICE")
	}
}
