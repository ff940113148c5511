// RedisBus beyond the EventBus contract (which event_bus_test.cpp runs against it): several
// nodes on one Redis, routing, and Redis going away and coming back. Every test starts its own
// redis-server (tests/redis_server.hpp).
#include <pushbook/redis_bus.hpp>

#include "redis_server.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <future>
#include <optional>
#include <random>
#include <set>
#include <thread>

using namespace pushbook;
using namespace std::chrono_literals;
using pushbook::test::Collector;
using pushbook::test::eventually;
using pushbook::test::RedisServer;

namespace {

struct Seen {
  Delivery::Kind kind;
  std::uint64_t seq;
  std::uint32_t epoch;
  std::uint64_t dropped;
};

DeliveryCallback record(Collector<Seen>& into) {
  return [&into](const Delivery& d) {
    into.push({d.kind, d.event ? d.event->seq() : 0, d.event ? d.event->epoch() : 0, d.dropped});
  };
}

std::vector<std::uint64_t> seqs(const std::vector<Seen>& items) {
  std::vector<std::uint64_t> out;
  for (auto& s : items) out.push_back(s.seq);
  return out;
}

boost::json::value num(int n) { return boost::json::object{{"n", n}}; }

// Options that notice a Redis that stopped answering within 300 ms and reconnect quickly.
RedisBusOptions quick_failure() {
  RedisBusOptions o;
  o.command_timeout = 300ms;
  o.connect_timeout = 300ms;
  o.reconnect_min = 10ms;
  o.reconnect_max = 100ms;
  return o;
}

// A node: a RedisBus with its own connections, on `server`.
std::unique_ptr<RedisBus> node(const RedisServer& server, RedisBusOptions o = {}) {
  o.address = server.address();
  o.key_prefix = "pb:";
  auto bus = std::make_unique<RedisBus>(o);
  REQUIRE(bus->wait_connected(10s));
  return bus;
}

}  // namespace

TEST_CASE("an address RedisBus cannot parse is refused with bad_request") {
  for (const char* address : {"http://x", "redis://", "unix:", "redis://h:6379/x"}) {
    RedisBusOptions o;
    o.address = address;
    try {
      RedisBus bus(o);
      FAIL("accepted " << address);
    } catch (const Exception& e) {
      CHECK(e.code() == make_error_code(errc::bad_request));
    }
  }
}

TEST_CASE("addresses: a unix socket, a database number and a password") {
  RedisServer server("s3cret-password");
  RedisBusOptions by_socket;
  by_socket.address = "unix:" + server.unix_socket();
  by_socket.password = "s3cret-password";
  by_socket.database = 2;
  RedisBus local(by_socket);
  REQUIRE(local.wait_connected(10s));
  REQUIRE(local.publish("user/u", num(1)));

  RedisBusOptions by_url;
  by_url.address = "redis://:s3cret-password@127.0.0.1:" + std::to_string(server.port()) + "/3";
  RedisBus remote(by_url);
  REQUIRE(remote.wait_connected(10s));
  REQUIRE(remote.publish("user/u", num(1)).value()->seq() == 1);  // another database: its own seq
  const auto keyspace = server.command({"INFO", "keyspace"});
  CHECK(keyspace.find("db2:keys=") != std::string::npos);
  CHECK(keyspace.find("db3:keys=") != std::string::npos);
  CHECK(keyspace.find("db0:") == std::string::npos);

  RedisBusOptions wrong = by_url;
  wrong.address = "redis://:not-the-password@127.0.0.1:" + std::to_string(server.port());
  wrong.command_timeout = 200ms;
  RedisBus refused(wrong);
  CHECK_FALSE(refused.wait_connected(300ms));
  auto r = refused.publish("user/u", num(1));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().is(errc::bus_unavailable));
  MESSAGE("wrong password: " << r.error().message);
}

TEST_CASE("two nodes on one Redis: publish on one, subscribe on the other, with and without since") {
  RedisServer server;
  auto a = node(server);
  auto b = node(server);
  for (int i = 1; i <= 3; ++i) REQUIRE(a->publish("booking/x", num(i)));

  Collector<Seen> late, resumed;
  auto s1 = b->subscribe("booking/x", record(late)).value();  // a late subscriber: the snapshot
  SubscribeOptions o;
  o.since_seq = 1;
  o.since_epoch = a->last("booking/x")->epoch();
  auto s2 = b->subscribe("booking/x", record(resumed), o).value();  // replay of 2, 3
  REQUIRE(a->publish("booking/x", num(4)));

  auto got = late.wait_for(2);
  REQUIRE(got.size() == 2);
  CHECK(got[0].kind == Delivery::Kind::snapshot);
  CHECK(seqs(got) == std::vector<std::uint64_t>{3, 4});
  CHECK(seqs(resumed.wait_for(3)) == std::vector<std::uint64_t>{2, 3, 4});
  CHECK(b->last("booking/x")->data().at("n") == 4);
  CHECK(b->history("booking/x", 2).size() == 2);
}

TEST_CASE("a topic is one sequence whichever node publishes, also concurrently") {
  RedisServer server;
  auto a = node(server);
  auto b = node(server);
  Collector<Seen> got;
  SubscribeOptions o;
  o.max_queue = 10000;
  auto sub = a->subscribe("resource/hall", record(got), o).value();
  REQUIRE(a->publish("resource/hall", num(0)).value()->seq() == 1);
  REQUIRE(b->publish("resource/hall", num(0)).value()->seq() == 2);
  REQUIRE(a->publish("resource/hall", num(0)).value()->seq() == 3);

  std::vector<std::thread> publishers;
  std::mutex mutex;
  std::set<std::uint64_t> assigned;
  for (auto* bus : {a.get(), b.get(), a.get(), b.get()})
    publishers.emplace_back([&, bus] {
      for (int i = 0; i < 250; ++i) {
        auto r = bus->publish("resource/hall", num(i));
        REQUIRE(r);
        std::lock_guard lock(mutex);
        CHECK(assigned.insert(r.value()->seq()).second);  // never the same seq twice
      }
    });
  for (auto& t : publishers) t.join();
  CHECK(assigned.size() == 1000);
  CHECK(*assigned.begin() == 4);
  CHECK(*assigned.rbegin() == 1003);
  // The subscriber on node a saw all of them, in order, including those node b published.
  auto items = got.wait_for(1003);
  REQUIRE(items.size() == 1003);
  for (std::size_t i = 0; i < items.size(); ++i) REQUIRE(items[i].seq == i + 1);
}

TEST_CASE("two nodes relaying the same numbered events: subscribers on both see each once") {
  RedisServer server;
  auto a = node(server);
  auto b = node(server);
  Collector<Seen> on_a, on_b;
  auto sa = a->subscribe("booking/x", record(on_a)).value();
  auto sb = b->subscribe("booking/x", record(on_b)).value();
  constexpr std::uint64_t events = 40;
  std::atomic<int> accepted{0};
  auto relay = [&](RedisBus& bus) {
    for (std::uint64_t n = 1; n <= events; ++n) {
      auto r = bus.publish("booking/x", num(static_cast<int>(n)), {.seq = n});
      if (r)
        accepted.fetch_add(1);
      else
        CHECK(r.error().is(errc::already_exists));
    }
  };
  std::thread ta([&] { relay(*a); }), tb([&] { relay(*b); });
  ta.join();
  tb.join();
  CHECK(accepted.load() == static_cast<int>(events));
  std::vector<std::uint64_t> expected;
  for (std::uint64_t n = 1; n <= events; ++n) expected.push_back(n);
  CHECK(seqs(on_a.wait_for(events)) == expected);
  CHECK(seqs(on_b.wait_for(events)) == expected);
  // The counter in Redis is the publishers' last number; an unnumbered publish goes on from it.
  CHECK(server.command({"GET", "pb:{booking/x}:seq"}) == std::to_string(events));
  auto next = b->publish("booking/x", num(0));
  REQUIRE(next);
  CHECK((*next)->seq() == events + 1);
  CHECK(on_a.wait_for(events + 1).size() == events + 1);
}

TEST_CASE("routing: a node receives only the topics its local subscribers follow") {
  RedisServer server;
  auto a = node(server);
  auto b = node(server);
  auto publisher = node(server);
  Collector<Seen> on_a, on_b, wild;
  auto sa = a->subscribe("booking/1", record(on_a)).value();
  auto sb = b->subscribe("booking/2", record(on_b)).value();
  for (int i = 0; i < 10; ++i) {
    REQUIRE(publisher->publish("booking/1", num(i)));
    REQUIRE(publisher->publish("booking/2", num(i)));
    REQUIRE(publisher->publish("user/u", num(i)));
  }
  REQUIRE(on_a.wait_for(10).size() == 10);
  REQUIRE(on_b.wait_for(10).size() == 10);
  CHECK(a->stats().received == 10);
  CHECK(b->stats().received == 10);
  CHECK(publisher->stats().received == 0);
  CHECK(a->stats().channels == 1);

  // Several local subscribers of a topic: still one Redis subscription, received once.
  Collector<Seen> second;
  SubscribeOptions live_only;
  live_only.snapshot = false;
  auto sa2 = a->subscribe("booking/1", record(second), live_only).value();
  CHECK(server.command({"PUBSUB", "NUMSUB", "pb:ev:booking/1"}) == "pb:ev:booking/1 1");
  REQUIRE(publisher->publish("booking/1", num(11)));
  REQUIRE(second.wait_for(1).size() == 1);
  REQUIRE(on_a.wait_for(11).size() == 11);
  CHECK(a->stats().received == 11);

  // The last local subscriber leaves: the node unsubscribes and receives nothing of the topic.
  sa.cancel();
  sa2.cancel();
  CHECK(a->stats().channels == 0);
  REQUIRE(eventually([&] {
    return server.command({"PUBSUB", "NUMSUB", "pb:ev:booking/1"}) == "pb:ev:booking/1 0";
  }));
  // A wildcard: PSUBSCRIBE, matching only below its prefix.
  auto sw = a->subscribe("user/*", record(wild)).value();
  REQUIRE(publisher->publish("booking/1", num(12)));  // no longer followed by a
  REQUIRE(publisher->publish("booking/3", num(1)));
  REQUIRE(publisher->publish("user/u", num(11)));
  // Redis delivers a node's messages in publish order: once user/u's event arrived, anything
  // of booking/1 would have arrived before it.
  auto w = wild.wait_for(1);
  REQUIRE(w.size() == 1);
  CHECK(w[0].seq == 11);
  CHECK(a->stats().received == 12);
  CHECK(on_a.size() == 11);
  CHECK(server.command({"PUBSUB", "NUMPAT"}) == "1");
}

TEST_CASE(
    "Redis killed and restarted: publish fails with bus_unavailable, then the bus reconnects and "
    "subscribers are told") {
  RedisServer server;
  RedisBusOptions o;
  o.reconnect_min = 10ms;
  o.reconnect_max = 200ms;
  o.command_timeout = 1s;
  Collector<std::string> log;
  o.log = [&log](const std::string& line) { log.push(line); };
  auto bus = node(server, o);
  Collector<Seen> exact, wild;
  SubscribeOptions so;
  so.snapshot_source = [] {
    return std::make_shared<const boost::json::value>(boost::json::object{{"from", "store"}});
  };
  auto s1 = bus->subscribe("booking/r", record(exact), so).value();
  auto s2 = bus->subscribe("booking/*", record(wild)).value();
  for (int i = 1; i <= 3; ++i) REQUIRE(bus->publish("booking/r", num(i)));
  auto before = exact.wait_for(4);  // the snapshot from the source (seq 0), then 1, 2, 3
  REQUIRE(seqs(before) == std::vector<std::uint64_t>{0, 1, 2, 3});
  CHECK(before[0].kind == Delivery::Kind::snapshot);
  REQUIRE(wild.wait_for(3).size() == 3);
  const auto old_epoch = before.back().epoch;
  CHECK(bus->available());  // what /healthz reports

  server.kill();
  const auto start = std::chrono::steady_clock::now();
  auto failed = bus->publish("booking/r", num(4));
  REQUIRE_FALSE(failed.has_value());
  CHECK(failed.error().is(errc::bus_unavailable));
  CHECK(std::chrono::steady_clock::now() - start < 3s);  // never blocks beyond command_timeout
  CHECK(bus->last("booking/r") == nullptr);              // unreachable: nothing to say
  CHECK(bus->stats().publish_failures >= 1);
  CHECK(eventually([&] { return !bus->available(); }));  // the connections are gone
  MESSAGE("while down: " << failed.error().message);

  server.start();  // empty: the restart lost every key
  // Resubscribed and caught up by itself: Redis has nothing of the topic any more (a new epoch),
  // so the exact subscriber gets the current state from its snapshot source.
  REQUIRE(exact.wait_for(5).size() == 5);
  CHECK(eventually([&] { return bus->stats().resyncs >= 1; }));
  REQUIRE(eventually([&] { return bus->publish("booking/r", num(5)).has_value(); }, 10s));
  CHECK(bus->stats().reconnects >= 1);
  CHECK(eventually([&] { return bus->available(); }));
  // Then the new numbering, in the new epoch.
  auto after = exact.wait_for(6);
  REQUIRE(after.size() >= 6);
  CHECK(after[4].kind == Delivery::Kind::snapshot);
  CHECK(after[4].epoch != old_epoch);
  CHECK(after[5].kind == Delivery::Kind::event);
  CHECK(after[5].seq == 1);
  CHECK(after[5].epoch == after[4].epoch);
  CHECK(bus->last("booking/r")->epoch() != old_epoch);
  // The wildcard subscriber cannot be caught up: a gap of unknown size, then live events.
  auto w = wild.wait_for(5);
  REQUIRE(w.size() >= 5);
  CHECK(w[3].kind == Delivery::Kind::gap);
  CHECK(w[3].dropped == 0);
  CHECK(w[4].seq == 1);
  // What happened, logged: each connection lost, then established again.
  auto lines = log.items();
  auto logged = [&](const std::string& text) {
    return std::count_if(lines.begin(), lines.end(),
                         [&](const std::string& l) { return l.find(text) != std::string::npos; });
  };
  CHECK(logged("subscriber connection to Redis at 127.0.0.1:" + std::to_string(server.port()) + " lost: ") ==
        1);
  CHECK(logged("command connection to Redis at 127.0.0.1:" + std::to_string(server.port()) + " lost: ") == 1);
  CHECK(logged(" established again after ") == 2);
  for (auto& l : lines) MESSAGE(l);
}

TEST_CASE(
    "a subscriber connection lost while another node publishes: caught up from history, no gap, "
    "no duplicate") {
  const auto seed = std::random_device{}();
  MESSAGE("seed " << seed);
  std::mt19937 random(seed);
  RedisServer server;
  RedisBusOptions o;
  o.reconnect_min = 1ms;
  o.reconnect_max = 20ms;
  o.history_limit = 1000;  // this test is about joining history and live, not about its bound
  auto a = node(server, o);
  auto b = node(server, o);
  Collector<Seen> got;
  SubscribeOptions so;
  so.since_seq = 0;
  so.max_queue = 100000;
  auto sub = a->subscribe("booking/k", record(got), so).value();
  constexpr int total = 600;
  for (int i = 1; i <= total; ++i) {
    // Kill every subscriber connection at random moments: node a misses what b publishes until
    // it has resubscribed.
    if (i % 150 == 75 || random() % 100 == 0)
      CHECK(server.command({"CLIENT", "KILL", "TYPE", "pubsub"}) != "");
    REQUIRE(eventually([&] { return b->publish("booking/k", num(i)).has_value(); }));
  }
  CHECK(eventually([&] { return !got.items().empty() && got.items().back().seq == total; }, 20s));
  auto items = got.items();
  for (std::size_t i = 0; i < items.size(); ++i) {
    INFO("delivery " << i << " of " << items.size());
    REQUIRE(items[i].kind == Delivery::Kind::event);
    REQUIRE(items[i].seq == i + 1);
  }
  CHECK(items.size() == total);
  CHECK(a->stats().resyncs >= 1);
  MESSAGE("reconnects " << a->stats().reconnects << ", resyncs " << a->stats().resyncs);
}

TEST_CASE("publish_async while Redis stops answering, and while it is gone: every callback gets an outcome") {
  RedisServer server;
  auto bus = node(server, quick_failure());
  Collector<std::string> outcomes;
  auto report = [&outcomes](result<EventPtr> r) {
    outcomes.push(r ? "ok" : std::string(r.error().is(errc::bus_unavailable) ? "unavailable" : "other"));
  };
  bus->publish_async("booking/p", std::make_shared<const boost::json::value>(num(1)), report);
  REQUIRE(outcomes.wait_for(1) == std::vector<std::string>{"ok"});

  // Stopped: nothing answers, and nobody waits in publish_async; the stall watch gives up on the
  // connection within about two command_timeouts and the pending callbacks fail.
  server.pause();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 10; ++i)
    bus->publish_async("booking/p", std::make_shared<const boost::json::value>(num(2 + i)), report);
  auto got = outcomes.wait_for(11, 5s);
  server.resume();
  REQUIRE(got.size() == 11);
  for (std::size_t i = 1; i < got.size(); ++i) CHECK(got[i] == "unavailable");
  CHECK(std::chrono::steady_clock::now() - start < 3s);

  // Gone: refused at once.
  server.kill();
  REQUIRE(eventually([&] { return !bus->wait_connected(0ms); }));
  bus->publish_async("booking/p", std::make_shared<const boost::json::value>(num(99)), report);
  got = outcomes.wait_for(12, 5s);
  REQUIRE(got.size() == 12);
  CHECK(got.back() == "unavailable");
  CHECK(bus->stats().publish_failures >= 11);
}

TEST_CASE("a Redis that stops answering: publish fails with bus_unavailable in time, then recovers") {
  RedisServer server;
  auto bus = node(server, quick_failure());
  Collector<Seen> got;
  auto sub = bus->subscribe("booking/s", record(got)).value();
  REQUIRE(bus->publish("booking/s", num(1)));
  REQUIRE(got.wait_for(1).size() == 1);

  server.pause();
  const auto start = std::chrono::steady_clock::now();
  auto failed = bus->publish("booking/s", num(2));
  REQUIRE_FALSE(failed.has_value());
  CHECK(failed.error().is(errc::bus_unavailable));
  CHECK(std::chrono::steady_clock::now() - start < 2s);
  MESSAGE("while stopped: " << failed.error().message);
  // The overdue reply makes the bus give up the command connection (checked on its I/O thread
  // just after the publish returned): wait for that before Redis answers again, or the late
  // reply would keep the connection.
  REQUIRE(eventually([&] { return !bus->wait_connected(0ms); }, 5s));
  server.resume();

  // The stalled connection was given up and a new one made; everything works again.
  std::uint64_t last_seq = 0;
  REQUIRE(eventually(
      [&] {
        auto r = bus->publish("booking/s", num(3));
        if (r) last_seq = r.value()->seq();
        return r.has_value();
      },
      10s));
  // Not always 3: Redis may run a publish that reported failure once it goes on (publish()
  // cannot know), which is why the failure says "may or may not have been executed".
  CHECK(last_seq >= 2);
  REQUIRE(eventually([&] { return !got.items().empty() && got.items().back().seq == last_seq; }));
  CHECK(got.items().size() == last_seq);  // every event once, none lost
  CHECK(bus->stats().reconnects >= 1);    // the stalled command connection was replaced
}

TEST_CASE("an inline callback runs on the I/O thread and may not call the bus: an error, not a deadlock") {
  RedisServer server;
  auto bus = node(server);
  Collector<Error> errors;
  SubscribeOptions o;
  o.executor = inline_executor();
  o.snapshot = false;
  auto sub = bus->subscribe(
                    "booking/i",
                    [&](const Delivery&) {
                      auto r = bus->publish("booking/other", num(1));
                      errors.push(r ? Error() : r.error());
                    },
                    o)
                 .value();
  REQUIRE(bus->publish("booking/i", num(1)));
  auto e = errors.wait_for(1);
  REQUIRE(e.size() == 1);
  CHECK(e[0].is(errc::bad_request));
  REQUIRE(bus->publish("booking/i", num(2)));  // the I/O thread still runs
  CHECK(errors.wait_for(2).size() == 2);
}

// --- subscribe_async -----------------------------------------------------------------------------

namespace {

// subscribe() or subscribe_async() (waiting for its `done`, with a deadline), so that one test
// runs through both paths.
result<Subscription> subscribe_via(bool async, EventBus& bus, std::string_view topic, DeliveryCallback cb,
                                   SubscribeOptions o = {}) {
  if (!async) return bus.subscribe(topic, std::move(cb), std::move(o));
  auto promise = std::make_shared<std::promise<result<Subscription>>>();
  auto future = promise->get_future();
  bus.subscribe_async(topic, std::move(cb), std::move(o),
                      [promise](result<Subscription> r) { promise->set_value(std::move(r)); });
  REQUIRE(future.wait_for(10s) == std::future_status::ready);
  return future.get();
}

}  // namespace

TEST_CASE(
    "subscribe and subscribe_async: replay, snapshot and live join with no gap and no duplicate while "
    "another node publishes") {
  const auto seed = std::random_device{}();
  MESSAGE("seed " << seed);
  std::mt19937 random(seed);
  RedisServer server;
  RedisBusOptions o;
  o.history_limit = 1000;
  auto a = node(server, o);
  auto b = node(server, o);
  for (bool async : {false, true}) {
    CAPTURE(async);
    const std::string topic = async ? "booking/async" : "booking/blocking";
    constexpr int total = 400;
    std::atomic<bool> stop{false};
    std::atomic<int> published{0};
    std::thread publisher([&] {
      for (int i = 1; i <= total; ++i) {
        REQUIRE(a->publish(topic, num(i)));
        published = i;
        if (i % 8 == 0) std::this_thread::yield();
      }
      stop = true;
    });
    struct joiner {
      std::optional<std::uint64_t> since;
      std::unique_ptr<Collector<Seen>> got = std::make_unique<Collector<Seen>>();
      Subscription sub;
    };
    std::vector<joiner> joiners;
    while (!stop && joiners.size() < 40) {
      joiner j;
      const int now = published.load();
      // Half resume from a recent position (replay from history), half want the current state.
      if (random() % 2 == 0 && now > 0) j.since = static_cast<std::uint64_t>(random() % (now + 1));
      SubscribeOptions so;
      so.since_seq = j.since;
      so.max_queue = 10000;
      j.sub = subscribe_via(async, *b, topic, record(*j.got), so).value();
      joiners.push_back(std::move(j));
    }
    publisher.join();
    REQUIRE(joiners.size() >= 2);
    for (auto& j : joiners) {
      CAPTURE(j.since.value_or(0));
      REQUIRE(eventually([&] { return !j.got->items().empty() && j.got->items().back().seq == total; }));
      auto items = j.got->items();
      std::uint64_t expect;
      std::size_t i = 0;
      if (j.since) {
        expect = *j.since + 1;
      } else if (items[0].kind == Delivery::Kind::snapshot) {
        expect = items[0].seq + 1;
        i = 1;
      } else {
        expect = 1;  // nothing was published yet: live from the first event
      }
      for (; i < items.size(); ++i, ++expect) {
        INFO("delivery " << i << " of " << items.size());
        REQUIRE(items[i].kind == Delivery::Kind::event);
        REQUIRE(items[i].seq == expect);
      }
    }
    const std::string how = async ? "subscribe_async: " : "subscribe: ";
    MESSAGE(how << joiners.size() << " joiners");
  }
}

TEST_CASE("2,000 subscribe_async calls in flight at once, from one thread that never waits") {
  RedisServer server;
  RedisBusOptions o;
  o.command_timeout = 8s;
  auto bus = node(server, o);
  constexpr int n = 2000;
  for (int i = 0; i < n; i += 2) REQUIRE(bus->publish("booking/m" + std::to_string(i), num(i)));
  std::vector<std::unique_ptr<Collector<Seen>>> got;
  for (int i = 0; i < n; ++i) got.push_back(std::make_unique<Collector<Seen>>());
  std::mutex mutex;
  std::vector<Subscription> subs;
  std::atomic<int> done{0}, failed{0};

  // Redis stopped: every call must return without waiting for it (a blocking subscribe would
  // wait command_timeout on the first one).
  server.pause();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i)
    bus->subscribe_async("booking/m" + std::to_string(i), record(*got[i]), {}, [&](result<Subscription> r) {
      if (!r) {
        ++failed;
      } else {
        std::lock_guard lock(mutex);
        subs.push_back(std::move(*r));
      }
      ++done;
    });
  const auto took = std::chrono::steady_clock::now() - start;
  MESSAGE("2,000 calls took " << std::chrono::duration_cast<std::chrono::microseconds>(took).count()
                              << " us");
  CHECK(took < 2s);
  CHECK(done.load() == 0);  // nothing can be confirmed while Redis is stopped
  server.resume();
  REQUIRE(eventually([&] { return done.load() == n; }, 20s));
  CHECK(failed.load() == 0);
  // Each got its topic's state: a snapshot where one was published, nothing where none was.
  for (int i = 0; i < n; i += 2) {
    auto items = got[i]->wait_for(1);
    REQUIRE(items.size() == 1);
    CHECK(items[0].kind == Delivery::Kind::snapshot);
    CHECK(items[0].seq == 1);
  }
  for (int i = 1; i < n; i += 2) CHECK(got[i]->items().empty());
  CHECK(bus->stats().subscriptions == n);
  CHECK(bus->stats().channels == n);
  // And they are live.
  REQUIRE(bus->publish("booking/m1", num(1)));
  CHECK(seqs(got[1]->wait_for(1)) == std::vector<std::uint64_t>{1});
}

TEST_CASE(
    "subscribe_async while Redis stops answering: bus_unavailable within command_timeout, nothing after") {
  RedisServer server;
  auto bus = node(server, quick_failure());
  REQUIRE(bus->publish("booking/t", num(1)));
  Collector<Seen> got;
  Collector<Error> outcome;
  server.pause();
  const auto start = std::chrono::steady_clock::now();
  bus->subscribe_async("booking/t", record(got), {}, [&](result<Subscription> r) {
    outcome.push(r ? Error() : r.error());  // a Subscription dropped here would cancel itself
  });
  auto e = outcome.wait_for(1, 5s);
  const auto took = std::chrono::steady_clock::now() - start;
  server.resume();
  REQUIRE(e.size() == 1);
  CHECK(e[0].is(errc::bus_unavailable));
  MESSAGE("after " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                   << " ms: " << e[0].message);
  CHECK(took >= 250ms);
  CHECK(took < 2s);
  CHECK(got.items().empty());
  CHECK(bus->stats().subscriptions == 0);

  // Redis is back: a witness subscribed after it sees a new event; the failed one saw nothing.
  Collector<Seen> witness;
  REQUIRE(bus->wait_connected(10s));
  auto sub = subscribe_via(true, *bus, "booking/t", record(witness));
  REQUIRE(sub);
  REQUIRE(eventually([&] { return bus->publish("booking/t", num(2)).has_value(); }));
  REQUIRE(eventually([&] { return !witness.items().empty() && witness.items().back().seq >= 2; }));
  CHECK(got.items().empty());
  CHECK(outcome.items().size() == 1);  // done ran once
}

TEST_CASE("subscribe_async: cancelled in done, and pending when the bus is destroyed") {
  RedisServer server;
  auto bus = node(server);
  REQUIRE(bus->publish("booking/c", num(1)));

  // Dropped in `done` (a caller no longer interested): unsubscribed, nothing after it.
  Collector<Seen> dropped;
  std::atomic<bool> was_active{false};
  Collector<int> finished;
  SubscribeOptions inline_o;
  inline_o.executor = inline_executor();
  bus->subscribe_async("booking/c", record(dropped), inline_o, [&](result<Subscription> r) {
    REQUIRE(r);
    was_active = r->active();
    r->cancel();
    finished.push(1);
  });
  REQUIRE(finished.wait_for(1).size() == 1);
  CHECK(was_active.load());
  // Inline: its snapshot was delivered before `done` ran, and nothing after the cancel.
  auto first = dropped.items();
  REQUIRE(first.size() == 1);
  CHECK(first[0].kind == Delivery::Kind::snapshot);
  CHECK(first[0].seq == 1);
  Collector<Seen> witness;
  auto w = subscribe_via(true, *bus, "booking/c", record(witness)).value();
  REQUIRE(bus->publish("booking/c", num(2)));
  REQUIRE(witness.wait_for(2).size() == 2);
  CHECK(dropped.items().size() == 1);
  w.cancel();

  // Pending (Redis stopped) when the bus is destroyed: each done gets shutting_down, at the
  // latest from the destructor, and nothing is delivered.
  Collector<Seen> never;
  std::atomic<int> shutting_down{0}, other{0};
  server.pause();
  for (int i = 0; i < 100; ++i)
    bus->subscribe_async("booking/p" + std::to_string(i % 10), record(never), {},
                         [&](result<Subscription> r) {
                           if (!r && r.error().is(errc::shutting_down))
                             ++shutting_down;
                           else
                             ++other;
                         });
  bus.reset();
  server.resume();
  CHECK(shutting_down.load() == 100);
  CHECK(other.load() == 0);
  CHECK(never.items().empty());
}

TEST_CASE("subscribe_async from the bus's own I/O thread (an inline callback) is allowed") {
  RedisServer server;
  auto bus = node(server);
  REQUIRE(bus->publish("booking/other", num(7)));
  Collector<Seen> inner;
  Collector<Error> outcome;
  std::mutex mutex;
  Subscription inner_sub;
  SubscribeOptions o;
  o.executor = inline_executor();
  o.snapshot = false;
  auto outer = bus->subscribe(
                      "booking/i",
                      [&](const Delivery&) {
                        bus->subscribe_async("booking/other", record(inner), {}, [&](result<Subscription> r) {
                          Error error = r ? Error() : r.error();
                          {
                            std::lock_guard lock(mutex);
                            if (r) inner_sub = std::move(*r);
                          }
                          // After `inner_sub` is kept: the test may end once it sees this.
                          outcome.push(std::move(error));
                        });
                      },
                      o)
                   .value();
  REQUIRE(bus->publish("booking/i", num(1)));
  auto e = outcome.wait_for(1);
  REQUIRE(e.size() == 1);
  CHECK_FALSE(e[0].code);
  CHECK(seqs(inner.wait_for(1)) == std::vector<std::uint64_t>{1});  // the snapshot
  outer.cancel();
  std::lock_guard lock(mutex);
  inner_sub.cancel();
}

TEST_CASE("subscribe_async calls a snapshot_source off the I/O thread: a slow source holds up nothing else") {
  RedisServer server;
  auto bus = node(server);
  std::promise<void> release;
  auto released = release.get_future().share();
  std::atomic<bool> in_source{false};
  std::atomic<bool> source_on_io_thread{false};
  std::thread::id io_thread;
  // The bus's I/O thread, as an inline callback sees it.
  {
    Collector<std::thread::id> where;
    SubscribeOptions o;
    o.executor = inline_executor();
    auto probe = bus->subscribe(
                        "t/probe", [&](const Delivery&) { where.push(std::this_thread::get_id()); }, o)
                     .value();
    REQUIRE(bus->publish("t/probe", num(1)));
    auto ids = where.wait_for(1);
    REQUIRE(ids.size() >= 1);
    io_thread = ids.back();
  }
  Collector<Delivery::Kind> kinds;
  Collector<std::string> data;
  Collector<Error> outcome;
  Subscription sub;
  std::mutex mutex;
  SubscribeOptions o;
  o.snapshot_source = [&]() -> std::shared_ptr<const boost::json::value> {
    source_on_io_thread = std::this_thread::get_id() == io_thread;
    in_source = true;
    released.wait();  // a store read that takes its time
    return std::make_shared<const boost::json::value>(boost::json::object{{"from", "source"}});
  };
  bus->subscribe_async(
      "t/empty",
      [&](const Delivery& d) {
        kinds.push(d.kind);
        if (d.event) data.push(std::string(d.event->data().at("from").as_string()));
      },
      o,
      [&](result<Subscription> r) {
        Error error = r ? Error() : r.error();
        {
          std::lock_guard lock(mutex);
          if (r) sub = std::move(*r);
        }
        outcome.push(std::move(error));  // after `sub` is kept: the test may end once it sees this
      });
  REQUIRE(eventually([&] { return in_source.load(); }));
  CHECK_FALSE(source_on_io_thread.load());
  // The I/O thread is free meanwhile: a publish (and its reply) goes through.
  CHECK(bus->publish("t/other", num(1)));
  CHECK(outcome.items().empty());
  release.set_value();
  auto e = outcome.wait_for(1);
  REQUIRE(e.size() == 1);
  CHECK_FALSE(e[0].code);
  CHECK(kinds.wait_for(1).front() == Delivery::Kind::snapshot);
  CHECK(data.wait_for(1).front() == "source");
  std::lock_guard lock(mutex);
  sub.cancel();
}

TEST_CASE(
    "the last reference to the bus dropped in its own done callback, on its I/O thread: torn down, no "
    "abort") {
  // A host (the gateway's TopicHub, say) may hold the bus only through a callback that is still
  // pending when everything else has let go: the bus is then destroyed on its own I/O thread,
  // which cannot join itself.
  RedisServer server;
  RedisBusOptions o;
  o.address = server.address();
  o.key_prefix = "pb:";
  auto bus = std::make_shared<RedisBus>(o);
  REQUIRE(bus->wait_connected(10s));
  std::promise<void> released;
  auto released_f = released.get_future().share();
  Collector<std::thread::id> ran_on;
  std::weak_ptr<RedisBus> watch = bus;
  bus->subscribe_async(
      "booking/last", [](const Delivery&) {}, {},
      [keep = bus, released_f, &ran_on](result<Subscription> r) mutable {
        CHECK(r.has_value());
        // Wait (bounded) until the test has let go, so that `keep` is the last.
        CHECK(released_f.wait_for(10s) == std::future_status::ready);
        ran_on.push(std::this_thread::get_id());
        if (r) r->cancel();
        keep.reset();  // destroys the bus here, on its I/O thread
      });
  bus.reset();
  released.set_value();
  REQUIRE(ran_on.wait_for(1).size() == 1);
  CHECK(ran_on.items()[0] != std::this_thread::get_id());
  CHECK(eventually([&] { return watch.expired(); }));
  // Its two connections close once the teardown has run: only the asking one is left.
  auto clients = [&] {
    auto list = server.command({"CLIENT", "LIST"});
    return std::count(list.begin(), list.end(), '\n');
  };
  CHECK(eventually([&] { return clients() == 1; }));
  // And the server is still fine for another node.
  auto other = node(server);
  REQUIRE(other->publish("booking/last", num(1)));
}
