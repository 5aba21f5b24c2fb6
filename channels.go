package caddysse

import (
	"errors"
	"net/http"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
)

// reservedPrefix starts the names the module uses in Redis for itself (the
// channels resumable events travel on, history, markers): no request may
// subscribe or publish to one.
const reservedPrefix = "sse:"

// channelError is why a request's channels are refused, with its status.
type channelError struct {
	status int
	reason string
}

func (e *channelError) Error() string { return e.reason }

func badChannel(reason string) *channelError {
	return &channelError{status: http.StatusBadRequest, reason: reason}
}

// isListTemplate reports whether a template is one placeholder and nothing
// else: only then may its value name several channels, comma-separated
// (say, {http.reverse_proxy.header.X-Sse-Channel} set by the app).
func isListTemplate(tmpl string) bool {
	return len(tmpl) > 2 && tmpl[0] == '{' && tmpl[len(tmpl)-1] == '}' &&
		strings.Count(tmpl, "{") == 1 && strings.Count(tmpl, "}") == 1
}

// expandChannels expands one channel template for a request. A placeholder's
// value is data, never syntax: in a template with text around a placeholder
// (room:{query.room}) the value must be one non-blank name without a comma
// or a control character, however it reached the placeholder (a repeated
// query parameter is joined with commas by Caddy, a path segment is
// percent-decoded). Only a list template may name several channels, each
// item checked the same way.
func expandChannels(repl *caddy.Replacer, tmpl string, list bool) ([]string, error) {
	if repl == nil {
		return checkNames([]string{tmpl})
	}
	v, err := repl.ReplaceFunc(tmpl, func(_ string, val any) (any, error) {
		s := caddy.ToString(val)
		if strings.TrimSpace(s) == "" {
			return nil, badChannel("no channel: a placeholder in the channel template is empty")
		}
		if !list && strings.ContainsRune(s, ',') {
			return nil, badChannel("comma in channel value")
		}
		return s, nil
	})
	if err != nil {
		var ce *channelError
		if errors.As(err, &ce) {
			return nil, ce
		}
		return nil, badChannel("bad channel value")
	}
	if !list {
		return checkNames([]string{v})
	}
	names := strings.Split(v, ",")
	for i, n := range names {
		names[i] = strings.TrimSpace(n)
	}
	return checkNames(names)
}

// checkNames refuses names that are empty, not UTF-8, hold a control
// character (a lone CR or NUL means nothing good in a channel name), or
// fall in the module's reserved namespace.
func checkNames(names []string) ([]string, error) {
	for _, n := range names {
		switch {
		case n == "":
			return nil, badChannel("no channel: empty channel name")
		case !utf8.ValidString(n):
			return nil, badChannel("channel name is not UTF-8")
		case strings.IndexFunc(n, unicode.IsControl) >= 0:
			return nil, badChannel("control character in channel name")
		case strings.HasPrefix(n, reservedPrefix):
			return nil, &channelError{status: http.StatusForbidden, reason: "channel not allowed"}
		}
	}
	return names, nil
}
