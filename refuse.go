package caddysse

// This file answers requests refused before their stream opens: nothing is
// subscribed yet, and browsers never retry a 4xx or 5xx.

import (
	"errors"
	"net/http"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-sse/caddy-sse/auth"
)

// refuse refuses a stream request with status and a short reason, counted
// under label in caddy_sse_streams_rejected_total. Headers the refusal
// needs (Allow, Retry-After, WWW-Authenticate) are set before the call.
func refuse(w http.ResponseWriter, r *http.Request, status int, label, reason string) error {
	proc().metrics.streamsRejected.WithLabelValues(label).Inc()
	return refusal(w, r, status, reason)
}

// refusal hands a refusal to Caddy as a caddyhttp.Error, so that the
// server's handle_errors routes answer it ({http.error.status_code},
// {http.error.message} is the reason) and Caddy logs it as any handler
// error. Caddy answers an error with its status and an empty body when the
// server has no handle_errors routes: then the reason is written here, as
// a short plain-text body, and the request logged by the access log only.
func refusal(w http.ResponseWriter, r *http.Request, status int, reason string) error {
	if handlesErrors(r) {
		return caddyhttp.Error(status, errors.New(reason))
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(reason + "\n"))
	return nil
}

// handlesErrors reports whether the server serving r has handle_errors
// routes.
func handlesErrors(r *http.Request) bool {
	srv, _ := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	return srv != nil && srv.Errors != nil && len(srv.Errors.Routes) > 0
}

// refuseAuth refuses an authentication (401) or authorization (403)
// failure; the answer says how to authenticate (RFC 6750).
func (h *Handler) refuseAuth(w http.ResponseWriter, r *http.Request, status int, reason string) error {
	if ce := h.logger.Check(zap.DebugLevel, "stream unauthorized"); ce != nil {
		ce.Write(zap.Int("status", status), zap.String("reason", reason))
	}
	if h.JWT != nil {
		if c := (&auth.Refusal{Status: status, Reason: reason}).Challenge(); c != "" {
			w.Header().Set("WWW-Authenticate", c)
		}
	}
	return refuse(w, r, status, "auth", reason)
}

// refuseIdentity refuses a request whose presence identity is unusable.
func refuseIdentity(w http.ResponseWriter, r *http.Request, ce *channelError) error {
	return refuse(w, r, ce.status, "identity", ce.reason)
}
