package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Client talks to a running egressd over its control socket.
type Client struct {
	http *http.Client
}

// NewClient returns a Client for the socket at path.
func NewClient(path string) *Client {
	return &Client{http: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}}
}

func (c *Client) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://egressd"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("ask egressd (is `egressd run` running?): %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("ask egressd: %s", resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// Status asks for the daemon's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.get(ctx, "/v1/status", &s)
}

// Explain asks whether a name or address[:port] is allowed, and why.
func (c *Client) Explain(ctx context.Context, q string) (Explanation, error) {
	var e Explanation
	return e, c.get(ctx, "/v1/explain?"+url.Values{"q": {q}}.Encode(), &e)
}

// List asks for the learned addresses.
func (c *Client) List(ctx context.Context) ([]Entry, error) {
	var l []Entry
	return l, c.get(ctx, "/v1/list", &l)
}
