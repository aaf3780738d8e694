// Lockergate's tests of its patches to this package (PATCHES.md); run by
// ./upstream-test with upstream's own.

package mqtt

import (
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestSubscriptionsHoldCopies: patch 9 keeps subscriptions by pointer; no
// caller may share one with the map or with another caller.
func TestSubscriptionsHoldCopies(t *testing.T) {
	s := NewSubscriptions()
	if s.Len() != 0 || len(s.GetAll()) != 0 {
		t.Fatal("a new Subscriptions is not empty")
	}
	if _, ok := s.Get("a"); ok {
		t.Fatal("Get found a subscription in an empty map")
	}
	s.Delete("a") // on the map not yet made (patch 8)

	sub := packets.Subscription{Filter: "a/b", Qos: 1}
	s.Add("a", sub)
	sub.Qos = 2 // the caller's value is not the stored one
	got, ok := s.Get("a")
	if !ok || got.Filter != "a/b" || got.Qos != 1 {
		t.Fatalf("Get = %+v, %v; want a/b at QoS 1", got, ok)
	}
	got.Qos = 0 // nor is the one Get returned
	all := s.GetAll()
	all["a"] = packets.Subscription{Filter: "changed"} // nor GetAll's
	if again, _ := s.Get("a"); again.Filter != "a/b" || again.Qos != 1 {
		t.Errorf("stored subscription changed through a copy: %+v", again)
	}
	s.Add("a", packets.Subscription{Filter: "a/b", Qos: 0})
	if again, _ := s.Get("a"); again.Qos != 0 || s.Len() != 1 {
		t.Errorf("Add did not replace: %+v, len %d", again, s.Len())
	}
	s.Delete("a")
	if s.Len() != 0 {
		t.Errorf("Len after Delete = %d", s.Len())
	}
}

// TestLazyMaps: patch 8 makes maps on their first write; reads and deletes
// before it see an empty collection, and the first write works.
func TestLazyMaps(t *testing.T) {
	sh := NewSharedSubscriptions()
	sh.Delete("g", "c")
	if _, ok := sh.Get("g", "c"); ok || sh.Len() != 0 || sh.GroupLen() != 0 || len(sh.GetAll()) != 0 {
		t.Error("new SharedSubscriptions not empty")
	}
	sh.Add("g", "c", packets.Subscription{Filter: "x"})
	if got, ok := sh.Get("g", "c"); !ok || got.Filter != "x" {
		t.Errorf("SharedSubscriptions.Get = %+v, %v", got, ok)
	}

	in := NewInlineSubscriptions()
	in.Delete(1)
	if _, ok := in.Get(1); ok || in.Len() != 0 || len(in.GetAll()) != 0 {
		t.Error("new InlineSubscriptions not empty")
	}
	in.Add(InlineSubscription{Subscription: packets.Subscription{Identifier: 1, Filter: "x"}})
	if got, ok := in.Get(1); !ok || got.Filter != "x" {
		t.Errorf("InlineSubscriptions.Get = %+v, %v", got, ok)
	}

	ps := newParticles()
	if ps.get("x") != nil || ps.len() != 0 || len(ps.getAll()) != 0 {
		t.Error("new particles not empty")
	}
	ps.delete("x")
	ps.add(newParticle("x", nil))
	if ps.get("x") == nil || ps.len() != 1 {
		t.Error("particles.add did not add")
	}

	ia := NewInboundTopicAliases(5)
	if got := ia.Set(1, "a/b"); got != "a/b" {
		t.Errorf("inbound Set = %q", got)
	}
	if got := ia.Set(1, ""); got != "a/b" {
		t.Errorf("inbound alias lookup = %q, want a/b", got)
	}
	oa := NewOutboundTopicAliases(5)
	if id, existed := oa.Set("a/b"); id != 1 || existed {
		t.Errorf("outbound Set = %d, %v", id, existed)
	}
	if id, existed := oa.Set("a/b"); id != 1 || !existed {
		t.Errorf("outbound Set again = %d, %v", id, existed)
	}

	fl := NewInflights()
	if fl.Delete(1) || fl.Len() != 0 || fl.Clone().Len() != 0 {
		t.Error("new Inflight not empty")
	}
	if !fl.Set(packets.Packet{PacketID: 1}) || fl.Clone().Len() != 1 {
		t.Error("Inflight.Set or Clone lost the packet")
	}
}
