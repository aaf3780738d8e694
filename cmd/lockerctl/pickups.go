package main

import (
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/lockergate/lockergate/client"
)

// Pickup and webhook commands (docs/api.md, "Pickups" and "Webhooks"): what
// a store or a delivery platform does through the API, from a terminal.

const handoffUsage = `  pickups list [--site S] [--state S] | pickups show ID | pickups cancel ID
  pickups create --site S --order REF [--size S] [--zone ambient] [--platform P | --customer NAME] [--expires-in D]
  codes create PICKUP [PICKUP...] [--kind pin|qr]
  webhooks list | webhooks create URL [--events pickup.ready,pickup.credential_changed,pickup.picked_up] | webhooks delete ID
  webhooks deliveries ID
`

// isHandoffCommand reports whether key is one of these commands.
func isHandoffCommand(key string) bool {
	switch key {
	case "pickups list", "pickups show", "pickups cancel", "pickups create", "codes create",
		"webhooks list", "webhooks create", "webhooks delete", "webhooks deliveries":
		return true
	}
	return false
}

func (c *cli) handoffCommand(key string, args []string) error {
	switch key {
	case "pickups list":
		fs := c.flags("pickups list")
		site := fs.String("site", "", "site")
		state := fs.String("state", "", "staging, ready, picked_up, expired or cancelled")
		if err := parseFlagsOnly(fs, args); err != nil {
			return err
		}
		return c.list("/v1/pickups", url.Values{"site": {*site}, "state": {*state}},
			[]string{"id", "site", "order_ref", "state", "locker", "compartment", "platform", "expires_at"})
	case "pickups show":
		return c.oneArg(args, func(id string) error { return c.show("/v1/pickups/" + url.PathEscape(id)) })
	case "pickups cancel":
		return c.postOne(args, "/v1/pickups/%s/cancel")
	case "pickups create":
		return c.pickupsCreate(args)
	case "codes create":
		return c.codesCreate(args)
	case "webhooks list":
		return c.list("/v1/webhooks", nil, []string{"id", "url", "events", "site", "platform", "created_at"})
	case "webhooks create":
		return c.webhooksCreate(args)
	case "webhooks delete":
		return c.oneArg(args, func(id string) error {
			_, err := c.c.Do(c.ctx, client.Request{Method: http.MethodDelete, Path: "/v1/webhooks/" + url.PathEscape(id)}, nil)
			return err
		})
	case "webhooks deliveries":
		return c.oneArg(args, func(id string) error {
			return c.list("/v1/webhooks/"+url.PathEscape(id)+"/deliveries", nil,
				[]string{"seq", "type", "subject", "state", "attempts", "last_status", "last_error", "next_attempt"})
		})
	}
	return usageError("unknown command: " + key)
}

func (c *cli) pickupsCreate(args []string) error {
	fs := c.flags("pickups create")
	site := fs.String("site", "", "site")
	ref := fs.String("order", "", "the order's reference (order_ref)")
	size := fs.String("size", "S", "smallest compartment size: S, M, L or XL")
	zone := fs.String("zone", "ambient", "ambient, chilled or heated")
	platform := fs.String("platform", "", "a driver of this delivery platform collects it")
	customer := fs.String("customer", "", "the customer (name) collects it")
	expires := fs.Duration("expires-in", 0, "how long the pickup may wait to be collected (default: the gateway's, 2h)")
	if err := parseFlagsOnly(fs, args); err != nil {
		return err
	}
	if *site == "" || *ref == "" {
		return usageError("pickups create needs --site and --order")
	}
	if *platform != "" && *customer != "" {
		return usageError("--platform and --customer exclude each other")
	}
	body := map[string]any{"site": *site, "order_ref": *ref, "size": *size, "zone": *zone}
	// Neither: left to the gateway (a platform token's own driver, else a
	// customer).
	switch {
	case *platform != "":
		body["recipient"] = map[string]string{"kind": "driver", "platform": *platform}
	case *customer != "":
		body["recipient"] = map[string]string{"kind": "customer", "name": *customer}
	}
	if *expires > 0 {
		body["expires_at"] = time.Now().Add(*expires).UTC()
	}
	return c.create("/v1/pickups", body)
}

// parseFlagsOnly parses args that hold flags only (positional): a stray
// argument is a usage error, not silently ignored.
func parseFlagsOnly(fs *flag.FlagSet, args []string) error {
	pos, err := positional(fs, args)
	if err == nil && len(pos) > 0 {
		err = usageError(fmt.Sprintf("unexpected argument %q", pos[0]))
	}
	return err
}

func (c *cli) codesCreate(args []string) error {
	fs := c.flags("codes create")
	kind := fs.String("kind", "", "pin or qr (default: both forms of one code)")
	ids, err := positional(fs, args)
	if err != nil {
		return err
	}
	if len(ids) == 0 {
		return usageError("codes create needs the pickups it opens")
	}
	body := map[string]any{"pickups": ids}
	if *kind != "" {
		body["kind"] = *kind
	}
	return c.create("/v1/credentials", body)
}

func (c *cli) webhooksCreate(args []string) error {
	fs := c.flags("webhooks create")
	events := fs.String("events", "", "comma-separated event types (default: every pickup event)")
	pos, err := positional(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageError("webhooks create needs one URL")
	}
	body := map[string]any{"url": pos[0]}
	if *events != "" {
		body["events"] = strings.Split(*events, ",")
	}
	return c.create("/v1/webhooks", body)
}
