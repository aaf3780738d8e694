// Lockergate's tests of its patches to this package (PATCHES.md); run by
// ../upstream-test with upstream's own.

package packets

import (
	"reflect"
	"testing"
)

// TestPacketsKeepWhatWasAdded: patch 9 keeps packets in a compact form when
// it can; every packet must come back exactly as it was added.
func TestPacketsKeepWhatWasAdded(t *testing.T) {
	plain := Packet{
		FixedHeader: FixedHeader{Type: Publish, Qos: 1, Retain: true, Remaining: 42},
		TopicName:   "lockers/v1/A/presence", Payload: []byte(`{"online":true}`),
		Origin: "A", Created: 1700000000, PacketID: 7, ProtocolVersion: 4,
		Mods: Mods{MaxSize: 1024},
	}
	withProps := plain
	withProps.ProtocolVersion = 5
	withProps.Properties = Properties{
		ContentType: "application/json", MessageExpiryInterval: 60,
		User: []UserProperty{{Key: "k", Val: "v"}}, CorrelationData: []byte{1, 2},
	}
	withProps.Expiry = 1700000060
	withConnect := plain
	withConnect.Connect = ConnectParams{ClientIdentifier: "A", Keepalive: 30}
	withFilters := plain
	withFilters.Filters = Subscriptions{{Filter: "a/#"}}
	withReasons := plain
	withReasons.ReasonCodes = []byte{0x80}

	p := NewPackets()
	cases := map[string]Packet{"plain": plain, "props": withProps, "connect": withConnect,
		"filters": withFilters, "reasons": withReasons}
	for id, pk := range cases {
		p.Add(id, pk)
	}
	for id, want := range cases {
		got, ok := p.Get(id)
		if !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("%s: Get = %+v, %v; want %+v", id, got, ok, want)
		}
	}
	all := p.GetAll()
	if !reflect.DeepEqual(all, cases) {
		t.Errorf("GetAll = %+v, want %+v", all, cases)
	}
	if n := p.Expiring(); n != 1 {
		t.Errorf("Expiring = %d, want 1", n)
	}
	if ids := p.Matching(func(pk *Packet) bool { return pk.Properties.ContentType != "" }); len(ids) != 1 || ids[0] != "props" {
		t.Errorf("Matching = %v, want [props]", ids)
	}
	p.Delete("props")
	if n := p.Expiring(); n != 0 {
		t.Errorf("Expiring after Delete = %d, want 0", n)
	}
	if _, ok := p.Get("props"); ok {
		t.Error("deleted packet still there")
	}
}

// TestPacketsKeepEveryField fills every field of a Packet, nested ones too,
// so a field a later mochi adds cannot be lost by the compact form unseen.
func TestPacketsKeepEveryField(t *testing.T) {
	var full Packet
	fill(reflect.ValueOf(&full).Elem())
	compact := full
	compact.Connect, compact.ReasonCodes, compact.Filters = ConnectParams{}, nil, nil

	p := NewPackets()
	for id, want := range map[string]Packet{"full": full, "compact": compact} {
		p.Add(id, want)
		got, ok := p.Get(id)
		if !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("%s: Get = %+v, %v; want %+v", id, got, ok, want)
		}
	}
	if s := p.internal["compact"]; s.full != nil {
		t.Error("a packet without CONNECT parameters, reason codes or filters was kept whole")
	}
}

// fill sets every settable field under v to a value other than its zero.
func fill(v reflect.Value) {
	switch v.Kind() {
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(7)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(7)
	case reflect.String:
		v.SetString("x")
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 1, 1))
		fill(v.Index(0))
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fill(k)
		fill(e)
		m.SetMapIndex(k, e)
		v.Set(m)
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		fill(v.Elem())
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if f := v.Field(i); f.CanSet() {
				fill(f)
			}
		}
	}
}
