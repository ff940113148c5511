// TopicHub: one bus subscription per topic per gateway node, fanned out to its followers with the
// bus's resume rules. Each HUB_CASE runs over LocalBus and over RedisBus (on a redis-server of
// the test's own).
#include "gateway/topic_hub.hpp"

#include <pushbook/redis_bus.hpp>

#include "redis_server.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <condition_variable>
#include <thread>

using namespace pushbook;
using namespace pushbook::detail;
using namespace std::chrono_literals;
using pushbook::test::Collector;
using pushbook::test::eventually;

namespace {

struct Seen {
  Delivery::Kind kind;
  std::uint64_t seq;
  friend bool operator==(const Seen&, const Seen&) = default;
};

constexpr auto ev = Delivery::Kind::event;
constexpr auto snap = Delivery::Kind::snapshot;

DeliveryCallback record(Collector<Seen>& into) {
  return [&into](const Delivery& d) { into.push({d.kind, d.event ? d.event->seq() : 0}); };
}

boost::json::value num(int n) { return boost::json::object{{"n", n}}; }

struct LocalFactory {
  std::shared_ptr<EventBus> make() { return std::make_shared<LocalBus>(); }
  static std::uint64_t bus_subscriptions(EventBus& bus) {
    return dynamic_cast<LocalBus&>(bus).stats().subscriptions;
  }
};

struct RedisFactory {
  std::shared_ptr<EventBus> make() {
    static pushbook::test::RedisServer server;
    static std::atomic<int> buses{0};
    RedisBusOptions o;
    o.address = server.address();
    o.key_prefix = "hub" + std::to_string(++buses) + ":";
    auto bus = std::make_shared<RedisBus>(o);
    REQUIRE(bus->wait_connected(10s));
    return bus;
  }
  static std::uint64_t bus_subscriptions(EventBus& bus) {
    return dynamic_cast<RedisBus&>(bus).stats().subscriptions;
  }
};

SubscribeOptions since(std::optional<std::uint64_t> seq, std::optional<std::uint32_t> epoch = std::nullopt) {
  SubscribeOptions o;
  o.since_seq = seq;
  o.since_epoch = epoch;
  return o;
}

std::uint64_t F_bus_subscriptions(EventBus& bus) {
  return dynamic_cast<RedisBus&>(bus).stats().subscriptions;
}

}  // namespace

#define HUB_CASE(name) TEST_CASE_TEMPLATE(name, F, LocalFactory, RedisFactory)

HUB_CASE("a thousand followers of one topic are one bus subscription, and each gets every event once") {
  F f;
  auto bus = f.make();
  TopicHub hub(bus);
  REQUIRE(bus->publish("resource/hall", num(0)));  // seq 1: what each follower starts with
  constexpr int n = 1000;
  std::vector<std::unique_ptr<Collector<Seen>>> seen;
  std::vector<Subscription> subs;
  for (int i = 0; i < n; ++i) {
    seen.push_back(std::make_unique<Collector<Seen>>());
    auto s = hub.subscribe("resource/hall", record(*seen.back()), {});
    REQUIRE(s);
    subs.push_back(std::move(*s));
  }
  // The hub's bus subscription may still be being made (RedisBus: subscribe_async): every
  // follower is served its snapshot once it is.
  for (auto& c : seen) REQUIRE(c->wait_for(1) == std::vector<Seen>{{snap, 1}});
  CHECK(F::bus_subscriptions(*bus) == 1);
  CHECK(hub.stats().topics == 1);
  CHECK(hub.stats().followers == n);
  CHECK(hub.stats().shared_joins == n - 1);
  for (int i = 1; i <= 5; ++i) REQUIRE(bus->publish("resource/hall", num(i)));
  const std::vector<Seen> want{{snap, 1}, {ev, 2}, {ev, 3}, {ev, 4}, {ev, 5}, {ev, 6}};
  for (auto& c : seen) CHECK(c->wait_for(want.size()) == want);
  subs.clear();
  CHECK(eventually([&] { return F::bus_subscriptions(*bus) == 0 && hub.stats().topics == 0; }));
  CHECK(hub.stats().followers == 0);
}

HUB_CASE("a follower joining a followed topic gets the bus's resume rules from the hub") {
  F f;
  auto bus = f.make();
  TopicHub hub(bus);
  std::uint32_t epoch = 0;
  for (int i = 1; i <= 5; ++i) epoch = (*bus->publish("resource/r", num(i)))->epoch();
  Collector<Seen> first;
  auto s0 = hub.subscribe("resource/r", record(first), {});
  REQUIRE(s0);
  CHECK(first.wait_for(1) == std::vector<Seen>{{snap, 5}});

  Collector<Seen> fresh, from3, from5, ahead, other_epoch, no_snapshot;
  auto s1 = hub.subscribe("resource/r", record(fresh), {});
  auto s2 = hub.subscribe("resource/r", record(from3), since(3, epoch));
  auto s3 = hub.subscribe("resource/r", record(from5), since(5));
  // Seen seq 7 of this numbering on another node: the hub is behind; 6 and 7 are not sent again.
  auto s4 = hub.subscribe("resource/r", record(ahead), since(7, epoch));
  auto s5 = hub.subscribe("resource/r", record(other_epoch), since(3, epoch + 1));
  auto opts = since(std::nullopt);
  opts.snapshot = false;
  auto s6 = hub.subscribe("resource/r", record(no_snapshot), opts);
  for (auto* s : {&s1, &s2, &s3, &s4, &s5, &s6}) REQUIRE(*s);
  CHECK(F::bus_subscriptions(*bus) == 1);
  CHECK(hub.stats().private_subscriptions == 0);
  for (int i = 6; i <= 8; ++i) REQUIRE(bus->publish("resource/r", num(i)));

  CHECK(first.wait_for(4) == std::vector<Seen>{{snap, 5}, {ev, 6}, {ev, 7}, {ev, 8}});
  CHECK(fresh.wait_for(4) == std::vector<Seen>{{snap, 5}, {ev, 6}, {ev, 7}, {ev, 8}});
  CHECK(from3.wait_for(5) == std::vector<Seen>{{ev, 4}, {ev, 5}, {ev, 6}, {ev, 7}, {ev, 8}});
  CHECK(from5.wait_for(3) == std::vector<Seen>{{ev, 6}, {ev, 7}, {ev, 8}});
  CHECK(ahead.wait_for(1) == std::vector<Seen>{{ev, 8}});
  CHECK(other_epoch.wait_for(4) == std::vector<Seen>{{snap, 5}, {ev, 6}, {ev, 7}, {ev, 8}});
  CHECK(no_snapshot.wait_for(3) == std::vector<Seen>{{ev, 6}, {ev, 7}, {ev, 8}});
  // Nothing more arrives for anyone (no duplicate after the ones waited for).
  REQUIRE(bus->publish("resource/r", num(9)));
  CHECK(first.wait_for(5).back() == Seen{ev, 9});
  CHECK(ahead.wait_for(2) == std::vector<Seen>{{ev, 8}, {ev, 9}});
  CHECK(from3.wait_for(6).size() == 6);
}

HUB_CASE("a follower whose since is older than the hub's recent events gets its own bus subscription") {
  F f;
  auto bus = f.make();
  TopicHub hub(bus, /*replay_events=*/4);
  for (int i = 1; i <= 10; ++i) REQUIRE(bus->publish("user/alice", num(i)));
  Collector<Seen> first, old;
  auto s0 = hub.subscribe("user/alice", record(first), since(9));
  REQUIRE(s0);
  CHECK(first.wait_for(1) == std::vector<Seen>{{ev, 10}});
  // The hub kept events 10.. only; the bus's history reaches back to 3.
  auto s1 = hub.subscribe("user/alice", record(old), since(2));
  REQUIRE(s1);
  // Made with subscribe_async: counted once the bus has made it (at once with LocalBus).
  CHECK(eventually([&] { return hub.stats().private_subscriptions == 1; }));
  CHECK(F::bus_subscriptions(*bus) == 2);
  REQUIRE(bus->publish("user/alice", num(11)));
  std::vector<Seen> want;
  for (std::uint64_t s = 3; s <= 11; ++s) want.push_back({ev, s});
  CHECK(old.wait_for(want.size()) == want);
  CHECK(first.wait_for(2) == std::vector<Seen>{{ev, 10}, {ev, 11}});
  s1->cancel();
  CHECK(hub.stats().private_subscriptions == 0);
  CHECK(eventually([&] { return F::bus_subscriptions(*bus) == 1; }));
}

HUB_CASE(
    "the creator's replay comes from the bus's history, and a booking topic's snapshot from its source") {
  F f;
  auto bus = f.make();
  TopicHub hub(bus);
  for (int i = 1; i <= 100; ++i) REQUIRE(bus->publish("user/bob", num(i)));
  Collector<Seen> c;
  auto s = hub.subscribe("user/bob", record(c), since(20));
  REQUIRE(s);
  CHECK(c.wait_for(80).size() == 80);
  CHECK(c.items().front() == Seen{ev, 21});
  CHECK(c.items().back() == Seen{ev, 100});
  CHECK(hub.stats().private_subscriptions == 0);

  // Nothing on the bus of booking/b1 (a restart): the source gives its state, to every follower.
  std::atomic<int> asked{0};
  auto source = [&asked]() -> std::shared_ptr<const boost::json::value> {
    ++asked;
    return std::make_shared<const boost::json::value>(boost::json::object{{"status", "held"}});
  };
  Collector<Seen> a, b;
  SubscribeOptions o;
  o.snapshot_source = source;
  auto sa = hub.subscribe("booking/b1", record(a), o);
  auto sb = hub.subscribe("booking/b1", record(b), o);
  REQUIRE(sa);
  REQUIRE(sb);
  CHECK(a.wait_for(1) == std::vector<Seen>{{snap, 0}});
  CHECK(b.wait_for(1) == std::vector<Seen>{{snap, 0}});
  CHECK(asked.load() == 1);
  // A client resuming with since 0 (it saw nothing of this numbering) gets that state too, as
  // the bus would give it.
  Collector<Seen> resumed;
  auto sr = hub.subscribe("booking/b1", record(resumed), since(0));
  REQUIRE(sr);
  CHECK(resumed.wait_for(1) == std::vector<Seen>{{snap, 0}});
  // The first published event reaches all three.
  REQUIRE(bus->publish("booking/b1", num(1)));
  CHECK(a.wait_for(2).back() == Seen{ev, 1});
  CHECK(resumed.wait_for(2).back() == Seen{ev, 1});
}

HUB_CASE("a creator that resumes at the topic's last seq still leaves the hub the topic's state") {
  // The gateway follows a booking's topic from the version its book ACK reported (since = the
  // topic's last seq): nothing to replay for that creator. The hub must still hold the topic's
  // last event, for followers that join later and want the current state.
  F f;
  auto bus = f.make();
  TopicHub hub(bus);
  for (int i = 1; i <= 3; ++i) REQUIRE(bus->publish("user/carol", num(i)));
  Collector<Seen> creator, fresh, from2;
  auto s0 = hub.subscribe("user/carol", record(creator), since(3));
  REQUIRE(s0);
  auto s1 = hub.subscribe("user/carol", record(fresh), {});
  auto s2 = hub.subscribe("user/carol", record(from2), since(2));
  REQUIRE(s1);
  REQUIRE(s2);
  CHECK(fresh.wait_for(1) == std::vector<Seen>{{snap, 3}});
  CHECK(from2.wait_for(1) == std::vector<Seen>{{ev, 3}});
  CHECK(hub.stats().private_subscriptions == 0);
  REQUIRE(bus->publish("user/carol", num(4)));
  CHECK(creator.wait_for(1) == std::vector<Seen>{{ev, 4}});
  CHECK(fresh.wait_for(2) == std::vector<Seen>{{snap, 3}, {ev, 4}});
  CHECK(from2.wait_for(2) == std::vector<Seen>{{ev, 3}, {ev, 4}});
}

HUB_CASE("a follower cannot subscribe from inside its callback: refused, not a deadlock") {
  F f;
  auto bus = f.make();
  TopicHub hub(bus);
  Collector<std::string> errors;
  std::atomic<bool> ready{false};
  REQUIRE(bus->publish("resource/r", num(0)));
  auto s = hub.subscribe("resource/r",
                         [&](const Delivery& d) {
                           if (d.kind == snap) ready = true;
                           if (d.kind != ev) return;
                           auto inner = hub.subscribe("resource/other", [](const Delivery&) {}, {});
                           errors.push(inner ? "subscribed" : inner.error().message);
                         },
                         {});
  REQUIRE(s);
  REQUIRE(eventually([&] { return ready.load(); }));  // the hub's bus subscription is made
  REQUIRE(bus->publish("resource/r", num(1)));
  auto seen = errors.wait_for(1);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].find("inside a follower's callback") != std::string::npos);
}

HUB_CASE("followers leave at any moment, from inside their callback too, and the topic is unfollowed") {
  F f;
  auto bus = f.make();
  TopicHub hub(bus);
  constexpr int n = 50;
  std::vector<std::shared_ptr<Subscription>> subs(n);
  std::atomic<int> cancelled_inside{0};
  Collector<Seen> survivor;
  auto keep = hub.subscribe("resource/x", record(survivor), since(0));
  REQUIRE(keep);
  for (int i = 0; i < n; ++i) {
    auto slot = std::make_shared<Subscription>();
    subs[i] = slot;
    std::weak_ptr<Subscription> weak = slot;
    auto s = hub.subscribe(
        "resource/x",
        [weak, &cancelled_inside](const Delivery& d) {
          if (d.kind != ev) return;
          if (auto self = weak.lock(); self && self->active()) {
            self->cancel();  // from inside its own callback, under the hub's fan-out
            ++cancelled_inside;
          }
        },
        since(0));
    REQUIRE(s);
    *slot = std::move(*s);
  }
  REQUIRE(bus->publish("resource/x", num(1)));
  CHECK(eventually([&] { return cancelled_inside.load() == n; }));
  REQUIRE(bus->publish("resource/x", num(2)));
  CHECK(survivor.wait_for(2) == std::vector<Seen>{{ev, 1}, {ev, 2}});
  CHECK(cancelled_inside.load() == n);  // none was called again
  CHECK(eventually([&] { return hub.stats().followers == 1; }));
  keep->cancel();
  subs.clear();
  CHECK(eventually([&] { return hub.stats().topics == 0 && F::bus_subscriptions(*bus) == 0; }));
  // Followed anew later: a new bus subscription, from the topic's state.
  Collector<Seen> again;
  auto s = hub.subscribe("resource/x", record(again), {});
  REQUIRE(s);
  CHECK(again.wait_for(1) == std::vector<Seen>{{snap, 2}});
}

HUB_CASE("followers joining and leaving while events are published each see a gapless run") {
  F f;
  auto bus = f.make();
  TopicHub hub(bus);
  std::atomic<bool> stop{false};
  std::thread publisher([&] {
    for (int i = 1; i <= 3000 && !stop.load(); ++i) REQUIRE(bus->publish("resource/busy", num(i)));
  });
  std::atomic<int> broken{0}, checked{0};
  std::vector<std::thread> joiners;
  for (int t = 0; t < 3; ++t)
    joiners.emplace_back([&] {
      for (int round = 0; round < 60; ++round) {
        struct state {
          std::mutex m;
          std::uint64_t last = 0;
          bool bad = false;
        };
        auto st = std::make_shared<state>();
        auto s = hub.subscribe("resource/busy",
                               [st](const Delivery& d) {
                                 std::lock_guard lock(st->m);
                                 if (d.kind == snap) {
                                   st->last = d.event->seq();
                                 } else if (d.kind == ev) {
                                   if (st->last != 0 && d.event->seq() != st->last + 1) st->bad = true;
                                   st->last = d.event->seq();
                                 } else {
                                   st->bad = true;  // no gap or end expected at this rate
                                 }
                               },
                               {});
        REQUIRE(s);
        std::this_thread::yield();
        s->cancel();
        std::lock_guard lock(st->m);
        if (st->bad) ++broken;
        ++checked;
      }
    });
  for (auto& j : joiners) j.join();
  stop = true;
  publisher.join();
  CHECK(checked.load() == 180);
  CHECK(broken.load() == 0);
  CHECK(eventually([&] { return hub.stats().topics == 0 && F::bus_subscriptions(*bus) == 0; }));
}

namespace {
// A bus whose subscribe() fails at once (bus_unavailable), as a bus may before it ever answers:
// its subscribe_async is the default, which reports before returning.
struct RefusingBus final : EventBus {
  LocalBus inner;
  using EventBus::publish;
  result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                           const PublishOptions& options) override {
    return inner.publish(topic, std::move(data), options);
  }
  result<Subscription> subscribe(std::string_view, DeliveryCallback, SubscribeOptions) override {
    return Error(errc::bus_unavailable, "refused");
  }
  EventPtr last(std::string_view topic) const override { return inner.last(topic); }
  std::vector<EventPtr> history(std::string_view topic, std::uint64_t since_seq) const override {
    return inner.history(topic, since_seq);
  }
};
}  // namespace

TEST_CASE("a bus that refuses at once: the first follower gets the error, and nothing stays behind") {
  auto bus = std::make_shared<RefusingBus>();
  TopicHub hub(bus);
  Collector<Seen> c;
  auto s = hub.subscribe("resource/r", record(c), {});
  REQUIRE_FALSE(s.has_value());
  CHECK(s.error().is(errc::bus_unavailable));
  CHECK(hub.stats().topics == 0);
  CHECK(hub.stats().followers == 0);
  CHECK(c.items().empty());
  auto bad = hub.subscribe("resource/*", record(c), {});
  CHECK(bad.error().is(errc::invalid_topic));
}

TEST_CASE(
    "a Redis that is not there: followers' subscriptions end with bus_unavailable, nothing stays behind") {
  // subscribe_async fails after command_timeout: the hub has returned by then, so the followers
  // (the creator and one that joined meanwhile) are ended.
  RedisBusOptions o;
  o.address = "redis://127.0.0.1:1";
  o.command_timeout = 200ms;
  o.connect_timeout = 100ms;
  auto bus = std::make_shared<RedisBus>(o);
  TopicHub hub(bus);
  Collector<Delivery::Kind> first, second;
  auto kinds = [](Collector<Delivery::Kind>& into) {
    return [&into](const Delivery& d) { into.push(d.kind); };
  };
  auto s1 = hub.subscribe("resource/r", kinds(first), {});
  auto s2 = hub.subscribe("resource/r", kinds(second), {});
  REQUIRE(s1);
  REQUIRE(s2);
  CHECK(first.wait_for(1) == std::vector<Delivery::Kind>{Delivery::Kind::ended});
  CHECK(second.wait_for(1) == std::vector<Delivery::Kind>{Delivery::Kind::ended});
  CHECK_FALSE(s1->active());
  CHECK_FALSE(s2->active());
  CHECK(eventually([&] { return hub.stats().topics == 0 && hub.stats().followers == 0; }));
  CHECK(bus->stats().subscriptions == 0);
}

TEST_CASE(
    "when the hub's own subscription falls behind, followers get a gap and a joiner is not served stale "
    "state") {
  // A follower that blocks the fan-out while another thread publishes past the hub's queue bound.
  auto bus = std::make_shared<LocalBus>();
  TopicHub hub(bus, 64, /*max_queue=*/8);
  std::mutex m;
  std::condition_variable cv;
  bool entered = false, release = false;
  Collector<Seen> slow;
  auto s = hub.subscribe(
      "resource/r",
      [&](const Delivery& d) {
        slow.push({d.kind, d.event ? d.event->seq() : 0});
        if (d.kind != ev || d.event->seq() != 1) return;
        std::unique_lock lock(m);
        entered = true;
        cv.notify_all();
        cv.wait(lock, [&] { return release; });
      },
      since(0));
  REQUIRE(s);
  std::thread first([&] { REQUIRE(bus->publish("resource/r", num(1))); });  // blocks in the fan-out
  {
    std::unique_lock lock(m);
    REQUIRE(cv.wait_for(lock, 10s, [&] { return entered; }));
  }
  for (int i = 2; i <= 30; ++i) REQUIRE(bus->publish("resource/r", num(i)));  // queued: 8 kept
  {
    std::lock_guard lock(m);
    release = true;
  }
  cv.notify_all();
  first.join();
  auto got = slow.wait_for(10);
  REQUIRE(got.size() >= 3);
  CHECK(got[0] == Seen{ev, 1});
  CHECK(got[1].kind == Delivery::Kind::gap);
  CHECK(got.back() == Seen{ev, 30});
  // A client resuming from before the gap is served by the bus's history (a subscription of its
  // own), with every event after its since: nothing the hub dropped is lost to it.
  Collector<Seen> resumed;
  auto r = hub.subscribe("resource/r", record(resumed), since(1));
  REQUIRE(r);
  auto all = resumed.wait_for(29);
  REQUIRE(all.size() == 29);
  CHECK(all.front() == Seen{ev, 2});
  CHECK(all.back() == Seen{ev, 30});
  CHECK(hub.stats().private_subscriptions == 1);
}

TEST_CASE(
    "over RedisBus, following a topic never waits for Redis, followers joining meanwhile are served once it "
    "is ready, and a failure ends the subscription") {
  pushbook::test::RedisServer server;
  RedisBusOptions o;
  o.address = server.address();
  o.command_timeout = 1500ms;
  auto bus = std::make_shared<RedisBus>(o);
  REQUIRE(bus->wait_connected(10s));
  TopicHub hub(bus);

  // Redis stopped while a topic is first followed: subscribe() returns at once, nothing comes
  // yet; the follower joining meanwhile waits with the creator; both are served once Redis answers.
  REQUIRE(bus->publish("resource/p", num(1)));
  server.pause();
  Collector<Seen> creator, joiner;
  const auto paused_at = std::chrono::steady_clock::now();
  auto c1 = hub.subscribe("resource/p", record(creator), {});
  auto c2 = hub.subscribe("resource/p", record(joiner), {});
  const auto subscribing_took = std::chrono::steady_clock::now() - paused_at;
  REQUIRE(c1);
  REQUIRE(c2);
  CHECK(subscribing_took < 1s);
  CHECK(creator.items().empty());  // nothing can be read while Redis is stopped
  CHECK(joiner.items().empty());
  server.resume();
  CHECK(creator.wait_for(1) == std::vector<Seen>{{snap, 1}});
  CHECK(joiner.wait_for(1) == std::vector<Seen>{{snap, 1}});
  REQUIRE(bus->publish("resource/p", num(2)));
  CHECK(creator.wait_for(2).back() == Seen{ev, 2});
  CHECK(joiner.wait_for(2).back() == Seen{ev, 2});
  c1->cancel();
  c2->cancel();
  REQUIRE(eventually([&] { return hub.stats().topics == 0 && F_bus_subscriptions(*bus) == 0; }));

  REQUIRE(bus->publish("resource/r", num(1)));
  std::vector<std::unique_ptr<Collector<Seen>>> seen;
  std::vector<Subscription> subs;
  for (int i = 0; i < 20; ++i) {
    seen.push_back(std::make_unique<Collector<Seen>>());
    subs.push_back(hub.subscribe("resource/r", record(*seen.back()), {}).value());
  }
  for (auto& c : seen) CHECK(c->wait_for(1) == std::vector<Seen>{{snap, 1}});
  CHECK(F_bus_subscriptions(*bus) == 1);
  REQUIRE(bus->publish("resource/r", num(2)));
  for (auto& c : seen) CHECK(c->wait_for(2).back() == Seen{ev, 2});

  // Redis stops answering: subscribe() still returns at once; the subscription ends with
  // bus_unavailable once the bus gives up (command_timeout).
  server.pause();
  Collector<std::string> ended;
  const auto t0 = std::chrono::steady_clock::now();
  auto s = hub.subscribe("resource/other",
                         [&](const Delivery& d) {
                           if (d.kind == Delivery::Kind::ended) ended.push(d.reason.message);
                         },
                         {});
  const auto took = std::chrono::steady_clock::now() - t0;
  REQUIRE(s);
  CHECK(took < 1s);  // not the 1.5 s the bus waits for Redis
  auto why = ended.wait_for(1, 10s);
  server.resume();
  REQUIRE(why.size() == 1);
  CHECK_FALSE(s->active());
  CHECK(test::eventually([&] { return hub.stats().topics == 1; }));  // resource/r only
}
