package caddysse

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// withServer returns r as served by a Caddy server with or without
// handle_errors routes.
func withServer(r *http.Request, errorRoutes bool) *http.Request {
	srv := &caddyhttp.Server{}
	if errorRoutes {
		srv.Errors = &caddyhttp.HTTPErrorConfig{Routes: caddyhttp.RouteList{{}}}
	}
	return r.WithContext(context.WithValue(r.Context(), caddyhttp.ServerCtxKey, srv))
}

func TestRefuseWithoutHandleErrors(t *testing.T) {
	for _, r := range []*http.Request{
		httptest.NewRequest(http.MethodGet, "/events", nil),
		withServer(httptest.NewRequest(http.MethodGet, "/events", nil), false),
	} {
		w := httptest.NewRecorder()
		w.Header().Set("Retry-After", "3")
		if err := refuse(w, r, http.StatusServiceUnavailable, "max_connections", "too many streams; retry later"); err != nil {
			t.Fatalf("refuse returned %v: Caddy would answer again", err)
		}
		if w.Code != http.StatusServiceUnavailable || w.Body.String() != "too many streams; retry later\n" {
			t.Errorf("answer %d %q", w.Code, w.Body.String())
		}
		for name, want := range map[string]string{
			"Content-Type":           "text/plain; charset=utf-8",
			"X-Content-Type-Options": "nosniff",
			"Retry-After":            "3",
		} {
			if got := w.Header().Get(name); got != want {
				t.Errorf("%s: %q, want %q", name, got, want)
			}
		}
	}
}

func TestRefuseWithHandleErrors(t *testing.T) {
	r := withServer(httptest.NewRequest(http.MethodGet, "/events", nil), true)
	w := httptest.NewRecorder()
	err := refuse(w, r, http.StatusForbidden, "channels", "channel not allowed")
	var he caddyhttp.HandlerError
	if !errors.As(err, &he) || he.StatusCode != http.StatusForbidden || he.Err.Error() != "channel not allowed" {
		t.Fatalf("refuse returned %#v, want a caddyhttp.HandlerError 403 \"channel not allowed\"", err)
	}
	if w.Body.Len() != 0 || w.Code != http.StatusOK || len(w.Header()) != 0 {
		t.Fatalf("refuse wrote %d %v %q: the handle_errors routes answer", w.Code, w.Header(), w.Body.String())
	}
}

func TestRefuseAuthChallenge(t *testing.T) {
	h := jwtHandler(t, &JWTConfig{Key: testSecret})
	for _, tt := range []struct {
		status int
		reason string
		want   string
	}{
		{http.StatusUnauthorized, "missing token", `Bearer realm="sse"`},
		{http.StatusUnauthorized, "token expired", `Bearer realm="sse", error="invalid_token"`},
		{http.StatusForbidden, "token does not grant channel", `Bearer realm="sse", error="insufficient_scope"`},
	} {
		for _, errorRoutes := range []bool{false, true} {
			w := httptest.NewRecorder()
			r := withServer(httptest.NewRequest(http.MethodGet, "/events", nil), errorRoutes)
			_ = h.refuseAuth(w, r, tt.status, tt.reason)
			if got := w.Header().Get("WWW-Authenticate"); got != tt.want {
				t.Errorf("%d %s (handle_errors %v): WWW-Authenticate %q, want %q", tt.status, tt.reason, errorRoutes, got, tt.want)
			}
		}
	}
	// Without jwt a 403 is allow's, not a token's: no challenge.
	open := &Handler{logger: zap.NewNop()}
	w := httptest.NewRecorder()
	_ = open.refuseAuth(w, httptest.NewRequest(http.MethodGet, "/events", nil), http.StatusForbidden, "channel not allowed")
	if got := w.Header().Get("WWW-Authenticate"); got != "" {
		t.Errorf("403 without jwt: WWW-Authenticate %q", got)
	}
}
