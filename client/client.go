// Package client is a small Go client of the Lockergate HTTP API, used by
// lockerctl, the simulator and the end-to-end tests.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client calls the API with a bearer token.
type Client struct {
	BaseURL string
	Token   string
	HTTP    *http.Client
}

// New returns a client for baseURL (e.g. http://127.0.0.1:8080).
func New(baseURL, token string) *Client {
	return &Client{BaseURL: strings.TrimRight(baseURL, "/"), Token: token, HTTP: &http.Client{Timeout: 2 * time.Minute}}
}

// Error is a problem detail answer (RFC 9457).
type Error struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail"`
}

func (e *Error) Error() string {
	if e.Detail != "" {
		return fmt.Sprintf("%d %s: %s", e.Status, e.Title, e.Detail)
	}
	return fmt.Sprintf("%d %s", e.Status, e.Title)
}

// Request describes one call.
type Request struct {
	Method string
	Path   string
	Query  url.Values
	Body   any
	Header http.Header
}

// Do sends req and decodes a 2xx JSON answer into out (when not nil). A
// non-2xx answer is returned as *Error. It returns the HTTP status.
func (c *Client) Do(ctx context.Context, req Request, out any) (int, error) {
	u := c.BaseURL + req.Path
	if len(req.Query) > 0 {
		u += "?" + req.Query.Encode()
	}
	var body io.Reader
	switch b := req.Body.(type) {
	case nil:
	case []byte: // sent as is, e.g. to test malformed input
		body = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return 0, err
		}
		body = bytes.NewReader(j)
	}
	hr, err := http.NewRequestWithContext(ctx, req.Method, u, body)
	if err != nil {
		return 0, err
	}
	for k, v := range req.Header {
		hr.Header[k] = v
	}
	if req.Body != nil {
		hr.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		hr.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.HTTP.Do(hr)
	if err != nil {
		return 0, fmt.Errorf("%s %s: %w (is the gateway running? check LOCKERGATE_URL)", req.Method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return resp.StatusCode, err
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		e := &Error{Status: resp.StatusCode, Title: http.StatusText(resp.StatusCode)}
		json.Unmarshal(b, e)
		return resp.StatusCode, e
	}
	if out != nil && len(b) > 0 {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("decode answer of %s %s: %w", req.Method, req.Path, err)
		}
	}
	return resp.StatusCode, nil
}

// Get is Do with GET.
func (c *Client) Get(ctx context.Context, path string, q url.Values, out any) error {
	_, err := c.Do(ctx, Request{Method: http.MethodGet, Path: path, Query: q}, out)
	return err
}

// Post is Do with POST and a JSON body.
func (c *Client) Post(ctx context.Context, path string, body, out any) error {
	_, err := c.Do(ctx, Request{Method: http.MethodPost, Path: path, Body: body}, out)
	return err
}
