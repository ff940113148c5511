// The EventBus contract, one suite run against every implementation: each CONTRACT_CASE runs
// once with LocalBus and once with RedisBus (on a redis-server of the test's own).
#include <pushbook/event_bus.hpp>
#include <pushbook/redis_bus.hpp>

#include "detail/json_text.hpp"
#include "detail/string_hash.hpp"
#include "redis_server.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <algorithm>
#include <atomic>
#include <latch>
#include <optional>
#include <set>
#include <thread>

using namespace pushbook;
using namespace std::chrono_literals;
using pushbook::test::Collector;
using pushbook::test::eventually;

namespace {

// What a test sees of a delivery, comparable with literals.
struct Seen {
  Delivery::Kind kind;
  std::string topic;
  std::uint64_t seq;  // 0 for gap / ended
  std::uint64_t dropped;
  friend bool operator==(const Seen&, const Seen&) = default;
};

Seen seen(const Delivery& d) {
  return {d.kind, d.event ? d.event->topic() : "", d.event ? d.event->seq() : 0, d.dropped};
}

constexpr auto ev = Delivery::Kind::event;
constexpr auto snap = Delivery::Kind::snapshot;

boost::json::value num(int n) { return boost::json::object{{"n", n}}; }

DeliveryCallback record(Collector<Seen>& into) {
  return [&into](const Delivery& d) { into.push(seen(d)); };
}

// The options the contract varies, whatever the bus.
struct BusLimits {
  std::size_t history_limit = 256;
  std::chrono::milliseconds history_max_age = std::chrono::minutes(10);
};

struct LocalFactory {
  std::unique_ptr<EventBus> make(BusLimits limits = {}) {
    LocalBusOptions o;
    o.history_limit = limits.history_limit;
    o.history_max_age = limits.history_max_age;
    return std::make_unique<LocalBus>(o);
  }
  static std::uint64_t dropped(EventBus& bus) { return dynamic_cast<LocalBus&>(bus).stats().dropped; }
  static std::uint64_t slow_ends(EventBus& bus) {
    return dynamic_cast<LocalBus&>(bus).stats().slow_consumer_ends;
  }
};

// Each bus gets a key prefix of its own on one shared server: a fresh Redis for every bus.
struct RedisFactory {
  std::unique_ptr<EventBus> make(BusLimits limits = {}) {
    static pushbook::test::RedisServer server;
    static std::atomic<int> buses{0};
    RedisBusOptions o;
    o.address = server.address();
    o.key_prefix = "contract" + std::to_string(++buses) + ":";
    o.history_limit = limits.history_limit;
    o.history_max_age = limits.history_max_age;
    auto bus = std::make_unique<RedisBus>(o);
    REQUIRE(bus->wait_connected(10s));
    return bus;
  }
  static std::uint64_t dropped(EventBus& bus) { return dynamic_cast<RedisBus&>(bus).stats().dropped; }
  static std::uint64_t slow_ends(EventBus& bus) {
    return dynamic_cast<RedisBus&>(bus).stats().slow_consumer_ends;
  }
};

}  // namespace

#define CONTRACT_CASE(name) TEST_CASE_TEMPLATE(name, F, LocalFactory, RedisFactory)

CONTRACT_CASE("publish assigns per-topic sequence numbers from 1 and a timestamp") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  // Whole milliseconds: a bus may take the time from another clock of coarser resolution.
  const auto before = std::chrono::floor<std::chrono::milliseconds>(std::chrono::system_clock::now());
  auto a1 = bus.publish("booking/a", num(1));
  auto a2 = bus.publish("booking/a", num(2));
  auto b1 = bus.publish("booking/b", num(3));
  REQUIRE(a1);
  REQUIRE(a2);
  REQUIRE(b1);
  CHECK((*a1)->seq() == 1);
  CHECK((*a2)->seq() == 2);
  CHECK((*b1)->seq() == 1);
  CHECK((*a1)->topic() == "booking/a");
  CHECK((*a1)->time() >= before);
  CHECK((*a2)->data().at("n").as_int64() == 2);
  // An equal event (a bus across processes cannot hand back the same object).
  auto last = bus.last("booking/a");
  REQUIRE(last);
  CHECK(last->seq() == 2);
  CHECK(last->epoch() == (*a2)->epoch());
  CHECK(last->time() == (*a2)->time());
  CHECK(last->data() == (*a2)->data());
  CHECK(bus.last("booking/none") == nullptr);
}

CONTRACT_CASE("a publisher-given seq: delivered once, may jump, never goes back") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Collector<Seen> got;
  auto sub = bus.subscribe("booking/a", record(got)).value();
  auto first = bus.publish("booking/a", num(1), {.seq = 1});
  REQUIRE(first);
  CHECK((*first)->seq() == 1);
  // The same seq again (a relay of an event already published): dropped, nothing delivered.
  auto again = bus.publish("booking/a", num(1), {.seq = 1});
  REQUIRE_FALSE(again.has_value());
  CHECK(again.error().is(errc::already_exists));
  CHECK(again.error().message.find("already has seq 1") != std::string::npos);
  // A jump: the counter follows the publisher's numbering.
  auto jumped = bus.publish("booking/a", num(4), {.seq = 4});
  REQUIRE(jumped);
  CHECK((*jumped)->seq() == 4);
  CHECK((*jumped)->epoch() == (*first)->epoch());
  // Below the current seq: refused too, however far below.
  CHECK(bus.publish("booking/a", num(3), {.seq = 3}).error().is(errc::already_exists));
  CHECK(bus.publish("booking/a", num(4), {.seq = 4}).error().is(errc::already_exists));
  // An unnumbered publish goes on from the publisher's last number.
  auto next = bus.publish("booking/a", num(5));
  REQUIRE(next);
  CHECK((*next)->seq() == 5);
  // Each event once, in order: the duplicates never reached the subscriber.
  auto items = got.wait_for(3);
  CHECK(items ==
        std::vector<Seen>{{ev, "booking/a", 1, 0}, {ev, "booking/a", 4, 0}, {ev, "booking/a", 5, 0}});
  CHECK(bus.last("booking/a")->seq() == 5);
  std::vector<std::uint64_t> kept;
  for (const auto& e : bus.history("booking/a")) kept.push_back(e->seq());
  CHECK(kept == std::vector<std::uint64_t>{1, 4, 5});
  // history_if_local: LocalBus answers from memory, the same events; RedisBus would have to ask
  // Redis, so it does not answer.
  if (auto local = bus.history_if_local("booking/a", 1)) {
    CHECK(dynamic_cast<LocalBus*>(&bus) != nullptr);
    REQUIRE(local->size() == 2);
    CHECK((*local)[0]->seq() == 4);
    CHECK((*local)[1] == bus.history("booking/a", 1)[1]);
    CHECK(bus.history_if_local("booking/none", 0) == std::vector<EventPtr>{});
  } else {
    CHECK(dynamic_cast<RedisBus*>(&bus) != nullptr);
  }
  // A topic's first event may have any number (a relay after the bus forgot the topic).
  auto fresh = bus.publish("booking/b", num(7), {.seq = 7});
  REQUIRE(fresh);
  CHECK((*fresh)->seq() == 7);
  // Nothing more came (the next publish to a.. is delivered after any stray one would be).
  REQUIRE(bus.publish("booking/a", num(6)));
  CHECK(got.wait_for(4).size() == 4);
  CHECK(got.items().back() == Seen{ev, "booking/a", 6, 0});
}

CONTRACT_CASE("a publisher-given seq of 0 or beyond 2^53 is refused with bad_request") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  CHECK(bus.publish("booking/a", num(1), {.seq = 0}).error().is(errc::bad_request));
  CHECK(bus.publish("booking/a", num(1), {.seq = max_publish_seq + 1}).error().is(errc::bad_request));
  CHECK(bus.last("booking/a") == nullptr);
  auto top = bus.publish("booking/a", num(1), {.seq = max_publish_seq});
  REQUIRE(top);
  CHECK((*top)->seq() == max_publish_seq);
  CHECK(bus.last("booking/a")->seq() == max_publish_seq);
  CHECK(bus.publish("booking/a", num(1), {.seq = max_publish_seq}).error().is(errc::already_exists));
}

CONTRACT_CASE("concurrent publishes of the same numbered events: each delivered once, in order") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Collector<Seen> got;
  auto sub = bus.subscribe("booking/c", record(got)).value();
  constexpr int events = 50;
  std::atomic<int> accepted{0}, duplicates{0};
  std::vector<std::thread> relays;
  for (int t = 0; t < 3; ++t)
    relays.emplace_back([&] {
      for (int n = 1; n <= events; ++n) {
        auto r = bus.publish("booking/c", num(n), {.seq = static_cast<std::uint64_t>(n)});
        if (r) {
          accepted.fetch_add(1);
        } else {
          CHECK(r.error().is(errc::already_exists));
          duplicates.fetch_add(1);
        }
      }
    });
  for (auto& t : relays) t.join();
  CHECK(accepted.load() == events);
  CHECK(duplicates.load() == 2 * events);
  auto items = got.wait_for(events);
  REQUIRE(items.size() == events);
  for (int n = 1; n <= events; ++n)
    CHECK(items[static_cast<std::size_t>(n - 1)].seq == static_cast<std::uint64_t>(n));
  REQUIRE(bus.publish("booking/c", num(0)));
  CHECK(got.wait_for(events + 1).size() == events + 1);
}

CONTRACT_CASE("publish_async publishes in the order of the calls and reports each outcome") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Collector<Seen> got;
  auto sub = bus.subscribe("booking/async", record(got), {}).value();
  Collector<std::uint64_t> outcomes;
  constexpr int n = 500;
  for (int i = 1; i <= n; ++i)
    bus.publish_async("booking/async", std::make_shared<const boost::json::value>(num(i)),
                      [&outcomes](result<EventPtr> r) { outcomes.push(r ? r.value()->seq() : 0); });
  auto seqs = outcomes.wait_for(n);
  REQUIRE(seqs.size() == n);
  for (int i = 0; i < n; ++i) CHECK(seqs[i] == static_cast<std::uint64_t>(i + 1));
  auto seen = got.wait_for(n);
  REQUIRE(seen.size() == n);
  CHECK(seen.back().seq == n);
  // Bad input is reported through the callback too; an empty callback is allowed.
  Collector<std::string> errors;
  bus.publish_async("a//b", std::make_shared<const boost::json::value>(num(0)),
                    [&errors](result<EventPtr> r) { errors.push(r ? "ok" : r.error().code.message()); });
  bus.publish_async("booking/async", nullptr,
                    [&errors](result<EventPtr> r) { errors.push(r ? "ok" : r.error().code.message()); });
  bus.publish_async("booking/async", std::make_shared<const boost::json::value>(num(0)), {});
  auto e = errors.wait_for(2);
  REQUIRE(e.size() == 2);
  CHECK(e[0] != "ok");
  CHECK(e[1] != "ok");
  CHECK(got.wait_for(n + 1).size() == n + 1);
  // A publisher-given seq the topic already has: refused through the callback too.
  Collector<bool> duplicate;
  bus.publish_async(
      "booking/async", std::make_shared<const boost::json::value>(num(0)), PublishOptions{.seq = 3},
      [&duplicate](result<EventPtr> r) { duplicate.push(!r && r.error().is(errc::already_exists)); });
  CHECK(duplicate.wait_for(1) == std::vector<bool>{true});
}

CONTRACT_CASE(
    "subscribe_async: done runs once, after the replay or snapshot (delivered already with an inline "
    "executor), then live events follow") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  for (int i = 1; i <= 3; ++i) REQUIRE(bus.publish("booking/a", num(i)));
  Collector<Seen> replay, state;
  Collector<std::size_t> seen_at_done;
  Collector<std::shared_ptr<Subscription>> subs;
  auto keep = [&](Collector<Seen>& c) {
    return [&](result<Subscription> r) {
      REQUIRE(r);
      const auto seen = c.size();
      subs.push(std::make_shared<Subscription>(std::move(*r)));  // kept before the test is told
      seen_at_done.push(seen);
    };
  };
  SubscribeOptions o;
  o.executor = inline_executor();
  o.since_seq = 1;
  bus.subscribe_async("booking/a", record(replay), o, keep(replay));
  REQUIRE(seen_at_done.wait_for(1).size() == 1);
  o.since_seq.reset();
  bus.subscribe_async("booking/a", record(state), o, keep(state));
  auto at_done = seen_at_done.wait_for(2);
  REQUIRE(at_done.size() == 2);
  CHECK(at_done == std::vector<std::size_t>{2, 1});  // 2 and 3 replayed; 3 as a snapshot
  REQUIRE(bus.publish("booking/a", num(4)));
  CHECK(replay.wait_for(3) ==
        std::vector<Seen>{{ev, "booking/a", 2, 0}, {ev, "booking/a", 3, 0}, {ev, "booking/a", 4, 0}});
  CHECK(state.wait_for(2) == std::vector<Seen>{{snap, "booking/a", 3, 0}, {ev, "booking/a", 4, 0}});
  CHECK(seen_at_done.items().size() == 2);  // once each
  REQUIRE(subs.items().size() == 2);
  for (auto& s : subs.items()) CHECK(s->active());

  // A wildcard: done once it is live; then it sees every matching topic.
  Collector<Seen> all;
  Collector<std::shared_ptr<Subscription>> wild;
  bus.subscribe_async("booking/*", record(all), {}, [&](result<Subscription> r) {
    REQUIRE(r);
    wild.push(std::make_shared<Subscription>(std::move(*r)));
  });
  REQUIRE(wild.wait_for(1).size() == 1);
  REQUIRE(bus.publish("booking/b", num(1)));
  CHECK(all.wait_for(1) == std::vector<Seen>{{ev, "booking/b", 1, 0}});
}

CONTRACT_CASE("subscribe_async reports subscribe's argument errors through done, before returning") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  auto error_of = [&](std::string_view pattern, DeliveryCallback cb, SubscribeOptions o) {
    std::optional<Error> error;
    bus.subscribe_async(pattern, std::move(cb), std::move(o), [&](result<Subscription> r) {
      error = r ? Error() : r.error();  // called before subscribe_async returns: `error` is alive
    });
    REQUIRE(error.has_value());
    return *error;
  };
  auto nothing = [](const Delivery&) {};
  CHECK(error_of("a//b", nothing, {}).is(errc::invalid_topic));
  CHECK(error_of("booking/a", nullptr, {}).is(errc::bad_request));
  SubscribeOptions since;
  since.since_seq = 0;
  CHECK(error_of("booking/*", nothing, since).is(errc::bad_request));
}

CONTRACT_CASE("invalid topics and patterns are refused with invalid_topic") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  for (const char* t : {"", "/a", "a/", "a//b", "a b", "a/*", "*", "booking/\"x"}) {
    auto r = bus.publish(t, num(1));
    CHECK_FALSE(r.has_value());
    CHECK(r.error().is(errc::invalid_topic));
  }
  auto s = bus.subscribe("a/*/b", [](const Delivery&) {});
  CHECK(s.error().is(errc::invalid_topic));
  CHECK(is_valid_topic("user/alice@example.com"));
  CHECK_FALSE(is_valid_topic(std::string(257, 'a')));
}

TEST_CASE("string_hash: every byte and the length count, and keys spread over shards and buckets") {
  using pushbook::detail::hash_bytes;
  // Every length up to 80 (each of hash_bytes's paths: 0, 1-3, 4-7, 8-16, blocks of 16 and a
  // tail): changing any one byte changes the hash.
  std::string base;
  for (std::size_t length = 0; length <= 80; ++length) {
    const auto h = hash_bytes(base);
    for (std::size_t i = 0; i < length; ++i)
      for (unsigned char delta : {1, 2, 0x80, 0xff}) {
        std::string changed = base;
        changed[i] = static_cast<char>(static_cast<unsigned char>(changed[i]) ^ delta);
        CHECK_MESSAGE(hash_bytes(changed) != h, "length " << length << ", byte " << i);
      }
    base += static_cast<char>('a' + (length * 7) % 26);
  }
  // Strings of zero bytes differ by length alone.
  std::set<std::uint64_t> zeros;
  for (std::size_t length = 0; length <= 64; ++length) zeros.insert(hash_bytes(std::string(length, '\0')));
  CHECK(zeros.size() == 65);
  // Keys like the bus's (booking/<id>, user/<name>) spread evenly over LocalBus's 32 shards
  // (hash % 32) and over 1,024 buckets from the high bits (as an open-addressing map uses them):
  // no shard or bucket gets more than 1.5 times its share.
  std::vector<int> shards(32), buckets(1024);
  const int keys = 102'400;
  for (int i = 0; i < keys; ++i) {
    const std::string key =
        i % 2 ? "booking/01M90A4WT1JBHX8TR0" + std::to_string(1000000 + i) : "user/u" + std::to_string(i);
    const auto h = hash_bytes(key);
    ++shards[h % 32];
    ++buckets[h >> 54];
  }
  CHECK(*std::max_element(shards.begin(), shards.end()) < keys / 32 * 3 / 2);
  CHECK(*std::max_element(buckets.begin(), buckets.end()) < keys / 1024 * 3 / 2);
  CHECK(*std::min_element(shards.begin(), shards.end()) > keys / 32 / 2);
}

TEST_CASE("is_valid_topic: segments of [A-Za-z0-9-_.:@+=~] joined by single slashes, 1-256 bytes") {
  // The rule written plainly, against every string of up to 4 bytes over an alphabet with each
  // kind of byte (allowed, separator, space, quote, NUL, high bytes, neighbours of the ranges).
  const auto reference = [](std::string_view t) {
    if (t.empty() || t.size() > 256) return false;
    for (const auto& segment : [&] {
           std::vector<std::string_view> parts;
           std::size_t from = 0;
           for (std::size_t i = 0; i <= t.size(); ++i)
             if (i == t.size() || t[i] == '/') parts.push_back(t.substr(from, i - from)), from = i + 1;
           return parts;
         }()) {
      if (segment.empty()) return false;
      for (char c : segment)
        if (!std::isalnum(static_cast<unsigned char>(c)) &&
            std::string_view("-_.:@+=~").find(c) == std::string_view::npos)
          return false;
    }
    return true;
  };
  using namespace std::string_literals;
  const std::string alphabet = "aZ09-_.:@+=~/ \"*\x7f\x80\xff`{[\0"s;  // with the NUL
  std::size_t checked = 0;
  std::string t;
  const auto all = [&](auto& self, std::size_t left) -> void {
    if (is_valid_topic(t) != reference(t))
      FAIL_CHECK("topic bytes: ", boost::json::serialize(boost::json::value(t)));
    ++checked;
    if (left == 0) return;
    for (char c : alphabet) {
      t.push_back(c);
      self(self, left - 1);
      t.pop_back();
    }
  };
  all(all, 4);
  CHECK(checked > 100'000);
  CHECK(is_valid_topic(std::string(256, 'a')));
  CHECK(is_valid_topic("a/" + std::string(254, 'b')));
  CHECK_FALSE(is_valid_topic("a/" + std::string(255, 'b')));
}

CONTRACT_CASE("the wire form is serialized once and shared") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  auto e = bus.publish("resource/r1", boost::json::object{{"available", 3}}).value();
  auto w1 = e->wire();
  auto w2 = e->wire();
  CHECK(w1 == w2);  // the same buffer
  auto parsed = boost::json::parse(*w1).as_object();
  CHECK(parsed.at("type") == "event");
  CHECK(parsed.at("topic") == "resource/r1");
  CHECK(parsed.at("seq") == 1);
  CHECK(parsed.at("data") == boost::json::parse(R"({"available":3})"));
  CHECK_FALSE(parsed.contains("snapshot"));
  CHECK(parsed.at("epoch").as_string() == format_epoch(e->epoch()));
  CHECK(w1->starts_with(R"({"type":"event","topic":"resource/r1","seq":1,"epoch":")" +
                        format_epoch(e->epoch()) + R"(","ts":)"));
  CHECK(w1->ends_with(R"(,"data":{"available":3}})"));
  auto snapshot = boost::json::parse(*e->wire(true)).as_object();
  CHECK(snapshot.at("snapshot") == true);
}

CONTRACT_CASE("wire_once: the kept form when there is one, else a form of its own that is not kept") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  auto e = bus.publish("booking/b1", boost::json::object{{"status", "confirmed"}}).value();
  auto once1 = e->wire_once();
  auto once2 = e->wire_once();
  CHECK(once1 != once2);  // made for each caller: nothing kept
  CHECK(*once1 == *once2);
  auto kept = e->wire();
  CHECK(kept != once1);  // wire() made and kept its own
  CHECK(*kept == *once1);
  CHECK(e->wire_once() == kept);  // now the kept one, shared
  auto snapshot_once = e->wire_once(true);
  CHECK(*snapshot_once == *e->wire(true));
  CHECK(e->wire_once(true) == e->wire(true));
}

CONTRACT_CASE("publish_json: the payload's text is kept, sent as it is and parsed only when asked for") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Collector<std::string> got;
  auto sub = bus.subscribe("booking/j",
                           [&](const Delivery& d) {
                             if (d.event) got.push(boost::json::serialize(d.event->data()));
                           })
                 .value();
  const auto text = std::make_shared<const std::string>(R"({"status":"confirmed","n":[1,2.5,"\u00e9"]})");
  auto e = bus.publish_json("booking/j", text, {}).value();
  CHECK(e->seq() == 1);
  CHECK(e->data_text() == text);  // kept, not copied
  CHECK(e->wire()->ends_with(R"(,"data":)" + *text + "}"));
  CHECK(e->data() == boost::json::parse(*text));
  CHECK(e->shared_data() == e->shared_data());  // parsed once
  CHECK(got.wait_for(1).at(0) == boost::json::serialize(boost::json::parse(*text)));
  CHECK(bus.last("booking/j")->data() == boost::json::parse(*text));

  // Numbered like publish, and in the order of the calls with publish_async.
  PublishOptions numbered;
  numbered.seq = 5;
  CHECK(bus.publish_json("booking/j", std::make_shared<const std::string>("5"), numbered).value()->seq() ==
        5);
  CHECK(bus.publish_json("booking/j", std::make_shared<const std::string>("5"), numbered)
            .error()
            .is(errc::already_exists));
  Collector<std::uint64_t> order;
  auto note = [&](result<EventPtr> r) { order.push(r ? (*r)->seq() : 0); };
  bus.publish_async("booking/j", std::make_shared<const boost::json::value>(6), {}, note);
  bus.publish_json_async("booking/j", std::make_shared<const std::string>("7"), {}, note);
  bus.publish_async("booking/j", std::make_shared<const boost::json::value>(8), {}, note);
  CHECK(order.wait_for(3) == std::vector<std::uint64_t>{6, 7, 8});
  const auto h = bus.history("booking/j", 5);
  REQUIRE(h.size() == 3);
  for (std::size_t i = 0; i < h.size(); ++i)
    CHECK(h[i]->data() == boost::json::value(6 + static_cast<int>(i)));

  // Anything but one JSON value is refused, and nothing is published.
  for (const char* bad : {"", "{", "{} {}", "{}x", "[1,]", "\"\xff\""}) {
    CAPTURE(bad);
    auto r = bus.publish_json("booking/j", std::make_shared<const std::string>(bad), {});
    REQUIRE_FALSE(r);
    CHECK(r.error().is(errc::bad_request));
    Collector<std::error_code> async_error;
    bus.publish_json_async(
        "booking/j", std::make_shared<const std::string>(bad), {},
        [&](result<EventPtr> a) { async_error.push(a ? std::error_code{} : a.error().code); });
    CHECK(async_error.wait_for(1).at(0) == make_error_code(errc::bad_request));
  }
  CHECK(bus.publish_json("booking/j", nullptr, {}).error().is(errc::bad_request));
  CHECK(bus.publish_json("bad topic", std::make_shared<const std::string>("1"), {})
            .error()
            .is(errc::invalid_topic));
  PublishOptions zero;
  zero.seq = 0;
  CHECK(bus.publish_json("booking/j", std::make_shared<const std::string>("1"), zero)
            .error()
            .is(errc::bad_request));
  CHECK(bus.last("booking/j")->seq() == 8);
  CHECK(got.wait_for(5).size() == 5);
}

namespace {
// A bus that implements only what EventBus requires: publish_json is EventBus's default.
struct MinimalBus final : EventBus {
  LocalBus inner;
  using EventBus::publish;
  result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                           const PublishOptions& options) override {
    return inner.publish(topic, std::move(data), options);
  }
  result<Subscription> subscribe(std::string_view pattern, DeliveryCallback callback,
                                 SubscribeOptions options) override {
    return inner.subscribe(pattern, std::move(callback), std::move(options));
  }
  EventPtr last(std::string_view topic) const override { return inner.last(topic); }
  std::vector<EventPtr> history(std::string_view topic, std::uint64_t since) const override {
    return inner.history(topic, since);
  }
};
}  // namespace

TEST_CASE("EventBus's default publish_json parses the text and publishes the value") {
  MinimalBus bus;
  auto e = bus.publish_json("t", std::make_shared<const std::string>(R"( {"a":1} )"), {}).value();
  CHECK_FALSE(e->data_text());  // a value, as publish() made it
  CHECK(e->data() == boost::json::parse(R"({"a":1})"));
  CHECK(bus.publish_json("t", std::make_shared<const std::string>("{"), {}).error().is(errc::bad_request));
  CHECK(bus.publish_json("t", nullptr, {}).error().is(errc::bad_request));
  Collector<std::uint64_t> seqs;
  bus.publish_json_async("t", std::make_shared<const std::string>("2"), {},
                         [&](result<EventPtr> r) { seqs.push(r ? (*r)->seq() : 0); });
  bus.publish_json_async("t", std::make_shared<const std::string>("[2"), {},
                         [&](result<EventPtr> r) { seqs.push(r ? (*r)->seq() : 0); });
  CHECK(seqs.wait_for(2) == std::vector<std::uint64_t>{2, 0});
}

TEST_CASE("text the library wrote itself: kept unchecked by LocalBus, checked by a host's bus") {
  // BookingEngine publishes its payloads through detail::TrustedJson (valid by construction).
  const auto text = std::make_shared<const std::string>(R"({"status":"confirmed"})");
  Collector<EventPtr> got;
  auto keep = [&](result<EventPtr> r) { got.push(r ? *r : nullptr); };
  LocalBus local;
  pushbook::detail::TrustedJson::publish_async(local, "booking/t", text, {}, keep);
  auto e = got.wait_for(1).at(0);
  REQUIRE(e);
  CHECK(e->data_text() == text);
  CHECK(e->data().at("status") == "confirmed");
  MinimalBus host;  // EventBus's defaults: the text is checked and parsed as for publish_json
  pushbook::detail::TrustedJson::publish_async(host, "booking/t", text, {}, keep);
  pushbook::detail::TrustedJson::publish_async(host, "booking/t", std::make_shared<const std::string>("{"),
                                               {}, keep);
  const auto both = got.wait_for(3);
  REQUIRE(both.at(1));
  CHECK_FALSE(both.at(1)->data_text());
  CHECK(both.at(1)->data().at("status") == "confirmed");
  CHECK_FALSE(both.at(2));
}

TEST_CASE("an event kept as text is parsed once, whichever of several threads asks first") {
  // Labelled concurrency: ThreadSanitizer runs it.
  for (int round = 0; round < 50; ++round) {
    const Event e("t", 1, std::chrono::system_clock::now(),
                  std::make_shared<const std::string>(R"({"k":[1,2,3],"s":"text"})"));
    std::vector<const boost::json::value*> seen(4);
    std::vector<std::thread> readers;
    for (std::size_t i = 0; i < seen.size(); ++i)
      readers.emplace_back([&, i] {
        seen[i] = &e.data();
        (void)e.wire();
      });
    for (auto& t : readers) t.join();
    for (const auto* v : seen) CHECK(v == seen[0]);
    CHECK(e.data().at("s") == "text");
  }
}

TEST_CASE("several threads asking a fresh event for its wire form get equal forms, and one is kept") {
  // Labelled concurrency: ThreadSanitizer runs it. The event makes the block that keeps its wire
  // forms on first use: the threads race to make it, and each must end up with the same block.
  for (int round = 0; round < 50; ++round) {
    const bool as_text = round % 2 == 0;
    const auto text = std::make_shared<const std::string>(R"({"n":1})");
    const auto value = std::make_shared<const boost::json::value>(boost::json::parse(*text));
    const auto e = as_text ? std::make_shared<const Event>("t", 1, std::chrono::system_clock::now(), text)
                           : std::make_shared<const Event>("t", 1, std::chrono::system_clock::now(), value);
    std::vector<std::shared_ptr<const std::string>> forms(4), snapshots(4);
    std::vector<std::thread> askers;
    for (std::size_t i = 0; i < forms.size(); ++i)
      askers.emplace_back([&, i] {
        forms[i] = e->wire();
        snapshots[i] = e->wire(true);
      });
    for (auto& t : askers) t.join();
    const auto kept = e->wire();
    CHECK(e->wire() == kept);
    CHECK(e->wire_once() == kept);
    for (std::size_t i = 0; i < forms.size(); ++i) {
      CHECK(*forms[i] == *kept);
      CHECK(*snapshots[i] == *e->wire(true));
    }
    CHECK(kept->find(R"("data":{"n":1})") != std::string::npos);
    CHECK(e->data().at("n") == 1);
  }
}

TEST_CASE("epochs: on the wire as 8 hex digits, parsed back, and bad text refused") {
  CHECK(format_epoch(0) == "00000000");
  CHECK(format_epoch(0xdeadbeef) == "deadbeef");
  CHECK(parse_epoch("deadbeef") == 0xdeadbeefu);
  CHECK(parse_epoch("DEADBEEF") == 0xdeadbeefu);
  CHECK(parse_epoch("1f") == 0x1fu);
  CHECK_FALSE(parse_epoch(""));
  CHECK_FALSE(parse_epoch("123456789"));
  CHECK_FALSE(parse_epoch("12g4"));
  CHECK_FALSE(parse_epoch("-1"));
}

CONTRACT_CASE("a since from another epoch gets a snapshot, never a replay of the wrong numbering") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  for (int i = 1; i <= 5; ++i) REQUIRE(bus.publish("t", boost::json::value(i)));
  const auto epoch = bus.last("t")->epoch();
  auto other_owner = f.make();  // another bus (a restarted process): the same topic, another epoch
  auto& other = *other_owner;
  REQUIRE(other.publish("t", boost::json::value(100)));
  CHECK(other.last("t")->epoch() != epoch);

  Collector<Seen> same, stale;
  SubscribeOptions o;
  o.since_seq = 3;
  o.since_epoch = epoch;
  auto s1 = bus.subscribe("t", record(same), o).value();
  auto got = same.wait_for(2);
  REQUIRE(got.size() == 2);
  CHECK(got[0].seq == 4);  // replayed: the same numbering
  CHECK(got[0].kind == Delivery::Kind::event);

  auto s2 = other.subscribe("t", record(stale), o).value();  // since 3 of an old epoch
  auto got2 = stale.wait_for(1);
  REQUIRE(got2.size() == 1);
  CHECK(got2[0].kind == Delivery::Kind::snapshot);
  CHECK(got2[0].seq == 1);
}

CONTRACT_CASE("a topic the bus has nothing of takes its snapshot from snapshot_source") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  std::atomic<int> calls{0};
  SubscribeOptions o;
  o.snapshot_source = [&] {
    ++calls;
    return std::make_shared<const boost::json::value>(boost::json::object{{"status", "confirmed"}});
  };
  Collector<Seen> fresh, resumed;
  auto s1 = bus.subscribe("booking/b1", record(fresh), o).value();
  auto got = fresh.wait_for(1);
  REQUIRE(got.size() == 1);
  CHECK(got[0].kind == Delivery::Kind::snapshot);
  CHECK(got[0].seq == 0);
  CHECK(calls.load() == 1);
  // A client resuming with a seq from before a restart: a snapshot too, never silence.
  o.since_seq = 7;
  auto s2 = bus.subscribe("booking/b1", record(resumed), o).value();
  REQUIRE(resumed.wait_for(1).size() == 1);
  CHECK(resumed.items()[0].kind == Delivery::Kind::snapshot);
  // Once the bus has the topic's events, they are the truth and the source is not asked.
  REQUIRE(bus.publish("booking/b1", boost::json::object{{"status", "cancelled"}}));
  Collector<Seen> later;
  o.since_seq.reset();
  auto s3 = bus.subscribe("booking/b1", record(later), o).value();
  REQUIRE(later.wait_for(1).size() == 1);
  CHECK(later.items()[0].seq == 1);
  CHECK(calls.load() == 2);
  // A source with nothing to say (no such booking): no snapshot, live events only.
  SubscribeOptions none;
  none.snapshot_source = [] { return std::shared_ptr<const boost::json::value>(); };
  Collector<Seen> empty;
  auto s4 = bus.subscribe("booking/b2", record(empty), none).value();
  REQUIRE(bus.publish("booking/b2", boost::json::value(1)));
  REQUIRE(empty.wait_for(1).size() == 1);
  CHECK(empty.items()[0].kind == Delivery::Kind::event);
}

CONTRACT_CASE("a subscriber sees live events of its topic in order") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Collector<Seen> got;
  auto sub = bus.subscribe("booking/a", [&](const Delivery& d) { got.push(seen(d)); }).value();
  for (int i = 1; i <= 3; ++i) REQUIRE(bus.publish("booking/a", num(i)));
  REQUIRE(bus.publish("booking/b", num(9)));
  auto items = got.wait_for(3);
  CHECK(items ==
        std::vector<Seen>{{ev, "booking/a", 1, 0}, {ev, "booking/a", 2, 0}, {ev, "booking/a", 3, 0}});
}

CONTRACT_CASE("subscribing without since delivers the last event as a snapshot, then live ones") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  REQUIRE(bus.publish("booking/a", num(1)));
  REQUIRE(bus.publish("booking/a", num(2)));
  Collector<Seen> got;
  auto sub = bus.subscribe("booking/a", [&](const Delivery& d) { got.push(seen(d)); }).value();
  REQUIRE(bus.publish("booking/a", num(3)));
  CHECK(got.wait_for(2) == std::vector<Seen>{{snap, "booking/a", 2, 0}, {ev, "booking/a", 3, 0}});

  SUBCASE("no snapshot when asked for none") {
    Collector<Seen> live;
    SubscribeOptions o;
    o.snapshot = false;
    auto s2 = bus.subscribe(
                     "booking/a", [&](const Delivery& d) { live.push(seen(d)); }, o)
                  .value();
    REQUIRE(bus.publish("booking/a", num(4)));
    CHECK(live.wait_for(1) == std::vector<Seen>{{ev, "booking/a", 4, 0}});
  }
}

CONTRACT_CASE("since replays the missed events from history, then goes live") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  for (int i = 1; i <= 5; ++i) REQUIRE(bus.publish("user/u1", num(i)));
  Collector<Seen> got;
  SubscribeOptions o;
  o.since_seq = 2;
  auto sub = bus.subscribe(
                    "user/u1", [&](const Delivery& d) { got.push(seen(d)); }, o)
                 .value();
  REQUIRE(bus.publish("user/u1", num(6)));
  CHECK(got.wait_for(4) ==
        std::vector<Seen>{
            {ev, "user/u1", 3, 0}, {ev, "user/u1", 4, 0}, {ev, "user/u1", 5, 0}, {ev, "user/u1", 6, 0}});
  SUBCASE("since equal to the current seq replays nothing") {
    Collector<Seen> none;
    o.since_seq = 6;
    auto s2 = bus.subscribe(
                     "user/u1", [&](const Delivery& d) { none.push(seen(d)); }, o)
                  .value();
    REQUIRE(bus.publish("user/u1", num(7)));
    CHECK(none.wait_for(1) == std::vector<Seen>{{ev, "user/u1", 7, 0}});
  }
}

CONTRACT_CASE("where history no longer reaches back, the last event comes as a snapshot") {
  BusLimits bo;
  bo.history_limit = 3;
  F f;
  auto owner = f.make(bo);
  auto& bus = *owner;
  for (int i = 1; i <= 10; ++i) REQUIRE(bus.publish("booking/x", num(i)));
  CHECK(bus.history("booking/x").size() == 3);
  CHECK(bus.history("booking/x").front()->seq() == 8);

  Collector<Seen> got;
  SubscribeOptions o;
  o.since_seq = 2;  // needs 3..10, history has 8..10
  auto sub = bus.subscribe(
                    "booking/x", [&](const Delivery& d) { got.push(seen(d)); }, o)
                 .value();
  CHECK(got.wait_for(1) == std::vector<Seen>{{snap, "booking/x", 10, 0}});

  Collector<Seen> exact;
  o.since_seq = 7;  // needs 8..10: history reaches
  auto sub2 = bus.subscribe(
                     "booking/x", [&](const Delivery& d) { exact.push(seen(d)); }, o)
                  .value();
  CHECK(exact.wait_for(3) ==
        std::vector<Seen>{{ev, "booking/x", 8, 0}, {ev, "booking/x", 9, 0}, {ev, "booking/x", 10, 0}});
}

CONTRACT_CASE("history is also bounded by age") {
  BusLimits bo;
  bo.history_max_age = 0ms;
  F f;
  auto owner = f.make(bo);
  auto& bus = *owner;
  REQUIRE(bus.publish("booking/x", num(1)));
  CHECK(eventually([&] { return bus.history("booking/x").empty(); }));
  CHECK(bus.last("booking/x") != nullptr);  // the last value outlives history
}

CONTRACT_CASE("replay and live join without gap or duplicate while publishing goes on") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  constexpr int total = 20000;
  std::atomic<int> published{0};
  std::thread publisher([&] {
    for (int i = 1; i <= total; ++i) {
      REQUIRE(bus.publish("booking/race", num(i)));
      published.store(i);
    }
  });
  REQUIRE(eventually([&] { return published.load() > 100; }));
  Collector<std::uint64_t> got;
  SubscribeOptions o;
  o.since_seq = 0;
  o.max_queue = total;
  auto sub = bus.subscribe(
                    "booking/race", [&](const Delivery& d) { got.push(d.event->seq()); }, o)
                 .value();
  publisher.join();
  // History holds only 256 events, so a replay from 0 after >100 publishes may start with a
  // snapshot; either way what follows must be contiguous up to `total`.
  auto items = got.wait_for(1);
  REQUIRE(eventually([&] { return !got.items().empty() && got.items().back() == std::uint64_t{total}; }));
  items = got.items();
  for (std::size_t i = 1; i < items.size(); ++i) REQUIRE(items[i] == items[i - 1] + 1);
}

CONTRACT_CASE("wildcards match every topic below a prefix and are live only") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Collector<Seen> bookings, all;
  auto s1 = bus.subscribe("booking/*", [&](const Delivery& d) { bookings.push(seen(d)); }).value();
  auto s2 = bus.subscribe("*", [&](const Delivery& d) { all.push(seen(d)); }).value();
  REQUIRE(bus.publish("booking/a", num(1)));
  REQUIRE(bus.publish("user/u", num(2)));
  REQUIRE(bus.publish("booking/b", num(3)));
  REQUIRE(bus.publish("booking/a", num(4)));
  CHECK(bookings.wait_for(3) ==
        std::vector<Seen>{{ev, "booking/a", 1, 0}, {ev, "booking/b", 1, 0}, {ev, "booking/a", 2, 0}});
  CHECK(all.wait_for(4).size() == 4);

  SubscribeOptions o;
  o.since_seq = 0;
  auto bad = bus.subscribe(
      "booking/*", [](const Delivery&) {}, o);
  CHECK(bad.error().is(errc::bad_request));
}

CONTRACT_CASE("callbacks of one subscription never overlap, even on a multi-threaded executor") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  auto pool = std::make_shared<ThreadPool>(4);
  std::atomic<int> inside{0}, max_inside{0};
  Collector<std::uint64_t> got;
  SubscribeOptions o;
  o.executor = pool;
  o.max_queue = 100000;
  auto sub = bus.subscribe(
                    "booking/a",
                    [&](const Delivery& d) {
                      int now = ++inside;
                      int prev = max_inside.load();
                      while (prev < now && !max_inside.compare_exchange_weak(prev, now)) {
                      }
                      got.push(d.event->seq());
                      --inside;
                    },
                    o)
                 .value();
  std::vector<std::thread> publishers;
  for (int t = 0; t < 4; ++t)
    publishers.emplace_back([&] {
      for (int i = 0; i < 500; ++i) REQUIRE(bus.publish("booking/a", num(i)));
    });
  for (auto& t : publishers) t.join();
  auto items = got.wait_for(2000);
  REQUIRE(items.size() == 2000);
  CHECK(max_inside.load() == 1);
  for (std::size_t i = 0; i < items.size(); ++i) CHECK(items[i] == i + 1);
}

TEST_CASE("a callback may run on the publisher's thread with inline_executor") {
  LocalBus bus;
  std::thread::id where;
  SubscribeOptions o;
  o.executor = inline_executor();
  auto sub = bus.subscribe(
                    "booking/a", [&](const Delivery&) { where = std::this_thread::get_id(); }, o)
                 .value();
  REQUIRE(bus.publish("booking/a", num(1)));
  CHECK(where == std::this_thread::get_id());
}

namespace {
// A subscriber whose first callback blocks until released, so events pile up behind it.
struct Blocked {
  std::latch entered{1};
  std::latch release{1};
  std::atomic<bool> first{true};
  Collector<Seen> got;
  DeliveryCallback callback() {
    return [this](const Delivery& d) {
      if (first.exchange(false)) {
        entered.count_down();
        release.wait();
      }
      got.push(seen(d));
    };
  }
};
}  // namespace

CONTRACT_CASE("a slow subscriber with drop_oldest gets a gap marker and the newest events") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Blocked slow;
  Collector<std::uint64_t> fast;
  SubscribeOptions o;
  o.max_queue = 4;
  auto s = bus.subscribe("booking/a", slow.callback(), o).value();
  SubscribeOptions fo;
  fo.executor = std::make_shared<ThreadPool>(1);
  auto fast_sub = bus.subscribe(
                         "booking/a", [&](const Delivery& d) { fast.push(d.event->seq()); }, fo)
                      .value();
  REQUIRE(bus.publish("booking/a", num(1)));
  slow.entered.wait();
  for (int i = 2; i <= 11; ++i) REQUIRE(bus.publish("booking/a", num(i)));  // never blocks
  // Both subscriptions are given each event at once: once the fast one has all 11, so has the
  // slow one's queue (a bus may hand events over asynchronously after publish returns).
  CHECK(fast.wait_for(11).size() == 11);  // the fast subscriber lost nothing
  slow.release.count_down();
  auto items = slow.got.wait_for(6);
  CHECK(items == std::vector<Seen>{{ev, "booking/a", 1, 0},
                                   {Delivery::Kind::gap, "", 0, 6},
                                   {ev, "booking/a", 8, 0},
                                   {ev, "booking/a", 9, 0},
                                   {ev, "booking/a", 10, 0},
                                   {ev, "booking/a", 11, 0}});
  CHECK(F::dropped(bus) == 6);
}

CONTRACT_CASE("a slow subscriber with end_subscription is ended with slow_consumer") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Blocked slow;
  Collector<Error> reasons;
  SubscribeOptions o;
  o.max_queue = 2;
  o.overflow = OverflowPolicy::end_subscription;
  auto s = bus.subscribe(
                  "booking/a",
                  [&, cb = slow.callback()](const Delivery& d) {
                    if (d.kind == Delivery::Kind::ended) reasons.push(d.reason);
                    cb(d);
                  },
                  o)
               .value();
  REQUIRE(bus.publish("booking/a", num(1)));
  slow.entered.wait();
  for (int i = 2; i <= 5; ++i) REQUIRE(bus.publish("booking/a", num(i)));
  CHECK(eventually([&] { return !s.active(); }));
  slow.release.count_down();
  auto r = reasons.wait_for(1);
  REQUIRE(r.size() == 1);
  CHECK(r[0].is(errc::slow_consumer));
  CHECK(r[0].message == "subscriber to 'booking/a' fell 2 events behind");
  auto items = slow.got.wait_for(2);
  CHECK(items == std::vector<Seen>{{ev, "booking/a", 1, 0}, {Delivery::Kind::ended, "", 0, 0}});
  CHECK(F::slow_ends(bus) == 1);
}

CONTRACT_CASE("unsubscribe from inside the callback stops further deliveries") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Subscription sub;
  std::atomic<int> calls{0};
  std::latch third{1};
  sub = bus.subscribe("booking/a",
                      [&](const Delivery& d) {
                        ++calls;
                        if (d.event->seq() == 3) {
                          sub.cancel();
                          third.count_down();
                        }
                      })
            .value();
  for (int i = 1; i <= 10; ++i) REQUIRE(bus.publish("booking/a", num(i)));
  third.wait();
  // Flush the delivery thread: a later subscription's callback runs after ours would have.
  Collector<int> flush;
  auto probe = bus.subscribe("booking/b", [&](const Delivery&) { flush.push(1); }).value();
  REQUIRE(bus.publish("booking/b", num(1)));
  REQUIRE(flush.wait_for(1).size() == 1);
  CHECK(calls.load() == 3);
  CHECK_FALSE(sub.active());
}

CONTRACT_CASE("after cancel() returns no callback runs, even with publishers racing") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  std::atomic<bool> cancelled{false};
  std::atomic<int> after_cancel{0};
  std::atomic<int> calls{0};
  auto sub = bus.subscribe("booking/a",
                           [&](const Delivery&) {
                             ++calls;
                             if (cancelled.load()) ++after_cancel;
                           })
                 .value();
  std::atomic<bool> stop{false};
  std::vector<std::thread> publishers;
  for (int t = 0; t < 3; ++t)
    publishers.emplace_back([&] {
      while (!stop.load()) (void)bus.publish("booking/a", num(1));
    });
  REQUIRE(eventually([&] { return calls.load() > 50; }));
  sub.cancel();
  cancelled.store(true);
  const int frozen = calls.load();
  stop.store(true);
  for (auto& t : publishers) t.join();
  CHECK(after_cancel.load() == 0);
  CHECK(calls.load() == frozen);
}

CONTRACT_CASE("destroying the bus ends subscriptions; handles outliving it stay safe") {
  Subscription survivor;
  std::atomic<int> calls{0};
  F f;
  {
    auto owner = f.make();
    auto& bus = *owner;
    survivor = bus.subscribe("booking/a", [&](const Delivery&) { ++calls; }).value();
    REQUIRE(bus.publish("booking/a", num(1)));
    REQUIRE(eventually([&] { return calls.load() == 1; }));
  }
  CHECK_FALSE(survivor.active());
  survivor.cancel();
  CHECK(calls.load() == 1);
}

CONTRACT_CASE("a throwing callback does not stop later deliveries") {
  F f;
  auto owner = f.make();
  auto& bus = *owner;
  Collector<std::uint64_t> got;
  auto sub = bus.subscribe("booking/a",
                           [&](const Delivery& d) {
                             got.push(d.event->seq());
                             if (d.event->seq() == 1) throw std::runtime_error("boom");
                           })
                 .value();
  REQUIRE(bus.publish("booking/a", num(1)));
  REQUIRE(bus.publish("booking/a", num(2)));
  CHECK(got.wait_for(2) == std::vector<std::uint64_t>{1, 2});
}

TEST_CASE("idle topics without subscribers are forgotten after topic_idle_ttl") {
  LocalBusOptions bo;
  bo.topic_idle_ttl = 0ms;
  LocalBus bus(bo);
  Collector<std::uint64_t> got;
  auto keep = bus.subscribe("booking/kept", [&](const Delivery& d) { got.push(d.event->seq()); }).value();
  REQUIRE(bus.publish("booking/kept", num(1)));
  REQUIRE(bus.publish("booking/gone", num(1)));
  CHECK(bus.last("booking/gone") == nullptr);
  CHECK(bus.last("booking/kept") != nullptr);
  REQUIRE(bus.publish("booking/kept", num(2)));
  CHECK(got.wait_for(2) == std::vector<std::uint64_t>{1, 2});
  CHECK(bus.stats().topics == 1);
}

TEST_CASE("at most max_topics topics are kept; the least recently active go first") {
  LocalBusOptions bo;
  bo.max_topics = 64;  // 2 per shard
  LocalBus bus(bo);
  Collector<std::uint64_t> got;
  auto keep = bus.subscribe("booking/kept", [&](const Delivery& d) { got.push(d.event->seq()); }).value();
  for (int i = 0; i < 10000; ++i) REQUIRE(bus.publish("booking/" + std::to_string(i), num(i)));
  CHECK(bus.stats().topics <= 64 + 1);
  CHECK(bus.last("booking/9999") != nullptr);  // the most recent survive
  CHECK(bus.last("booking/0") == nullptr);
  REQUIRE(bus.publish("booking/kept", num(1)));  // a topic with a subscriber is never forgotten
  CHECK(got.wait_for(1) == std::vector<std::uint64_t>{1});
}
