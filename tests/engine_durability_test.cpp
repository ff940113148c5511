// The engine over a store: store first, then memory, then publish, at every commit point, with
// a store that fails on demand (inline and with completions on a thread of its own); recovery
// from what a crashed process left in the store. The crash itself (kill -9 of pushbook-server
// over SQLite) is tests/python/test_crash.py.
#include <pushbook/booking_engine.hpp>
#include <pushbook/redis_bus.hpp>
#include <pushbook/sqlite_store.hpp>

#include "redis_server.hpp"
#include "requests.hpp"
#include "temp_dir.hpp"
#include "test_store.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <random>
#include <thread>

using namespace pushbook;
using namespace std::chrono_literals;
using pushbook::test::eventually;
using pushbook::test::one;
using pushbook::test::TestStore;

namespace {

BookingStatus status_of(BookingEngine& engine, const std::string& id) {
  return engine.get(id).value().status;
}

bool reaches(BookingEngine& engine, const std::string& id, BookingStatus status) {
  return eventually([&] {
    auto b = engine.get(id);
    return b && b->status == status;
  });
}

// An engine over a TestStore, with a subscriber that records every booking event and checks,
// at the instant it is published, that the store already holds that version.
struct Fixture {
  std::shared_ptr<LocalBus> bus = std::make_shared<LocalBus>();
  std::shared_ptr<TestStore> store;
  std::unique_ptr<BookingEngine> engine;
  std::mutex mutex;
  std::map<std::string, std::vector<std::string>> statuses;  // booking id -> statuses published
  std::atomic<int> published_before_stored{0};
  Subscription sub;

  explicit Fixture(bool async, EngineOptions o = {}) : store(std::make_shared<TestStore>(async)) {
    o.store = store;
    engine = std::make_unique<BookingEngine>(bus, std::move(o));
    SubscribeOptions so;
    so.executor = inline_executor();  // runs inside publish: sees the store at that instant
    sub = bus->subscribe(
                 "booking/*",
                 [this](const Delivery& d) {
                   const auto& data = d.event->data().as_object();
                   const std::string id(data.at("booking_id").as_string());
                   if (store->stored_version(id) < static_cast<std::uint64_t>(data.at("version").as_int64()))
                     ++published_before_stored;
                   std::lock_guard lock(mutex);
                   statuses[id].emplace_back(data.at("status").as_string());
                 },
                 so)
              .value();
  }
  std::vector<std::string> events_of(const std::string& id) {
    std::lock_guard lock(mutex);
    return statuses[id];
  }
  ResourceState resource(const std::string& id) { return engine->resource(id).value(); }
};

}  // namespace

TEST_CASE("a refused processing commit: no ACK, no event, no queue slot, the key is free again") {
  for (bool async : {false, true}) {
    CAPTURE(async);
    Fixture f(async);
    REQUIRE(f.engine->add_resource("r", 2));
    f.store->fail_when([](const Booking& b) { return b.status == BookingStatus::processing; });
    auto r = f.engine->submit(one("u", "r", 1, "k1"));
    REQUIRE(!r);
    CHECK(r.error().is(errc::store_failed));
    CHECK(r.error().message == "disk full");
    const auto s = f.engine->stats();
    CHECK(s.accepted == 0);
    CHECK(s.in_flight == 0);
    CHECK(s.queue_depth == 0);
    CHECK(s.store_errors == 1);
    {
      std::lock_guard lock(f.mutex);
      CHECK(f.statuses.empty());
    }
    f.store->heal();
    auto ack = f.engine->submit(one("u", "r", 1, "k1")).value();
    CHECK(!ack.replayed);
    CHECK(reaches(*f.engine, ack.booking_id, BookingStatus::confirmed));
    CHECK(f.published_before_stored.load() == 0);
  }
}

TEST_CASE("a refused decision leaves the booking processing with its units set aside, and is retried") {
  for (bool async : {false, true}) {
    for (bool with_handler : {false, true}) {
      CAPTURE(async);
      CAPTURE(with_handler);
      EngineOptions o;
      if (with_handler) o.handler = [](const Booking&, Completion done) { done(Decision::approved()); };
      Fixture f(async, o);
      REQUIRE(f.engine->add_resource("r", 2));
      f.store->fail_when([](const Booking& b) { return b.status == BookingStatus::confirmed; });
      const auto id = f.engine->submit(one("u", "r")).value().booking_id;
      REQUIRE(eventually([&] { return f.store->failed_commits() >= 3; }));
      CHECK(status_of(*f.engine, id) == BookingStatus::processing);
      CHECK(f.events_of(id) == std::vector<std::string>{"processing"});
      CHECK(f.resource("r").available() == 1);  // nobody else gets the unit meanwhile
      f.store->heal();
      REQUIRE(reaches(*f.engine, id, BookingStatus::confirmed));
      REQUIRE(eventually([&] { return f.engine->stats().in_flight == 0; }));
      CHECK(f.events_of(id) == std::vector<std::string>{"processing", "confirmed"});
      const auto r = f.resource("r");
      CHECK(r.reserved == 0);
      CHECK(r.confirmed == 1);
      CHECK(f.engine->stats().confirmed == 1);
      CHECK(f.published_before_stored.load() == 0);
    }
  }
}

TEST_CASE("a refused rejection keeps the handler's units reserved until it is stored") {
  EngineOptions o;
  o.handler = [](const Booking&, Completion done) { done(Decision::declined("card declined")); };
  Fixture f(true, o);
  REQUIRE(f.engine->add_resource("r", 2));
  f.store->fail_when([](const Booking& b) { return b.status == BookingStatus::rejected; });
  const auto id = f.engine->submit(one("u", "r")).value().booking_id;
  REQUIRE(eventually([&] { return f.store->failed_commits() >= 2; }));
  CHECK(f.resource("r").reserved == 1);
  f.store->heal();
  REQUIRE(reaches(*f.engine, id, BookingStatus::rejected));
  // The store says rejected before the completion frees the unit and publishes: wait for it.
  REQUIRE(eventually([&] { return f.engine->stats().in_flight == 0; }));
  CHECK(f.resource("r").reserved == 0);
  CHECK(f.events_of(id) == std::vector<std::string>{"processing", "rejected"});
}

TEST_CASE("refused cancel, confirm, release: an error, and memory and events as they were") {
  for (bool async : {false, true}) {
    CAPTURE(async);
    Fixture f(async);
    REQUIRE(f.engine->add_resource("r", 5));
    const auto confirmed = f.engine->submit(one("u", "r")).value().booking_id;
    auto held_request = one("u", "r");
    held_request.hold_for = 10min;
    const auto held1 = f.engine->submit(held_request).value().booking_id;
    const auto held2 = f.engine->submit(held_request).value().booking_id;
    REQUIRE(reaches(*f.engine, confirmed, BookingStatus::confirmed));
    REQUIRE(reaches(*f.engine, held1, BookingStatus::held));
    REQUIRE(reaches(*f.engine, held2, BookingStatus::held));
    REQUIRE(eventually([&] { return f.engine->stats().in_flight == 0; }));
    f.store->fail_when(
        [](const Booking& b) { return b.version > 2; });  // every transition after the decision

    CHECK(f.engine->cancel(confirmed).error().is(errc::store_failed));
    CHECK(f.engine->confirm(held1).error().is(errc::store_failed));
    CHECK(f.engine->release(held2).error().is(errc::store_failed));
    CHECK(status_of(*f.engine, confirmed) == BookingStatus::confirmed);
    CHECK(status_of(*f.engine, held1) == BookingStatus::held);
    CHECK(status_of(*f.engine, held2) == BookingStatus::held);
    auto r = f.resource("r");
    CHECK(r.confirmed == 1);
    CHECK(r.reserved == 2);
    CHECK(f.events_of(confirmed).size() == 2);
    CHECK(f.events_of(held1).size() == 2);

    f.store->heal();
    CHECK(f.engine->cancel(confirmed).value().status == BookingStatus::cancelled);
    CHECK(f.engine->confirm(held1).value().status == BookingStatus::confirmed);
    CHECK(f.engine->release(held2).value().status == BookingStatus::released);
    r = f.resource("r");
    CHECK(r.confirmed == 1);
    CHECK(r.reserved == 0);
    CHECK(f.events_of(held2) == std::vector<std::string>{"processing", "held", "released"});
    CHECK(f.published_before_stored.load() == 0);
  }
}

TEST_CASE("a refused expiry keeps the hold, and the hold expires once the store takes it") {
  Fixture f(true);
  REQUIRE(f.engine->add_resource("r", 1));
  f.store->fail_when([](const Booking& b) { return b.status == BookingStatus::expired; });
  auto request = one("u", "r");
  request.hold_for = 20ms;
  const auto id = f.engine->submit(request).value().booking_id;
  REQUIRE(eventually([&] { return f.store->failed_commits() >= 2; }));
  CHECK(status_of(*f.engine, id) == BookingStatus::held);
  CHECK(f.resource("r").reserved == 1);
  f.store->heal();
  REQUIRE(reaches(*f.engine, id, BookingStatus::expired));
  CHECK(eventually([&] { return f.resource("r").reserved == 0; }));
  CHECK(eventually([&] { return f.engine->stats().expired == 1; }));
}

TEST_CASE("a refused capacity change leaves the capacity as it was") {
  Fixture f(false);
  REQUIRE(f.engine->add_resource("r", 4));
  f.store->fail_resources = true;
  CHECK(f.engine->set_capacity("r", 8).error().is(errc::store_failed));
  CHECK(f.engine->set_capacity("r", 2).error().is(errc::store_failed));
  CHECK(f.resource("r").capacity == 4);
  CHECK(f.engine->add_resource("s", 1).error().is(errc::store_failed));
  CHECK(f.engine->resource("s").error().is(errc::not_found));
  f.store->fail_resources = false;
  REQUIRE(f.engine->set_capacity("r", 2));
  CHECK(f.resource("r").capacity == 2);
}

TEST_CASE("a store that cannot be read: get() says store_failed, never not_found") {
  Fixture f(false);
  REQUIRE(f.engine->add_resource("r", 1));
  const auto id = f.engine->submit(one("u", "r")).value().booking_id;
  f.store->fail_reads = true;
  auto b = f.engine->get(id);
  CHECK(b.error().is(errc::store_failed));
  CHECK(f.engine->cancel(id).error().is(errc::store_failed));
  f.store->fail_reads = false;
}

// What a process that died left in its store, written the way the engine writes it.
void put(TestStore& store, Booking b) { REQUIRE(store.inner().commit(StateChange{b, {}, {}})); }

Booking stored(std::string id, BookingStatus status, std::string resource, std::uint32_t quantity) {
  Booking b;
  b.id = std::move(id);
  b.user = "u";
  b.lines.push_back({std::move(resource), quantity});
  b.status = status;
  b.version = status == BookingStatus::processing ? 1 : 2;
  b.created_at = b.updated_at = wall_clock::now();
  return b;
}

TEST_CASE("recovery: counts from stored bookings, processing ones decided in order, holds re-armed") {
  auto store = std::make_shared<TestStore>(true);
  REQUIRE(store->put_resource("r", 10));
  REQUIRE(store->put_resource("s", 3));
  REQUIRE(store->put_resource("t", 1));
  put(*store, stored("c1", BookingStatus::confirmed, "r", 2));
  put(*store, stored("x1", BookingStatus::rejected, "r", 5));
  put(*store, stored("x2", BookingStatus::cancelled, "r", 5));
  auto h1 = stored("h1", BookingStatus::held, "r", 1);
  h1.hold_for = 1h;
  h1.expires_at = wall_clock::now() + 1h;
  put(*store, h1);
  auto h2 = stored("h2", BookingStatus::held, "s", 1);
  h2.hold_for = 1s;
  h2.expires_at = wall_clock::now() - 1s;  // ran out while the process was down
  put(*store, h2);
  put(*store, stored("p1", BookingStatus::processing, "t", 1));  // first ACKed: gets the unit
  put(*store, stored("p2", BookingStatus::processing, "t", 1));
  put(*store, stored("p3", BookingStatus::processing, "r", 3));

  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.store = store;
  BookingEngine engine(bus, o);
  REQUIRE(reaches(engine, "p1", BookingStatus::confirmed));
  REQUIRE(reaches(engine, "p2", BookingStatus::rejected));
  CHECK(engine.get("p2").value().reason == RejectReason::sold_out);
  REQUIRE(reaches(engine, "p3", BookingStatus::confirmed));
  REQUIRE(reaches(engine, "h2", BookingStatus::expired));
  CHECK(status_of(engine, "h1") == BookingStatus::held);
  REQUIRE(eventually([&] { return engine.stats().in_flight == 0; }));
  auto r = engine.resource("r").value();
  CHECK(r.capacity == 10);
  CHECK(r.confirmed == 5);  // c1 + p3
  CHECK(r.reserved == 1);   // h1
  // The store says expired before the expiry's completion frees the unit in memory.
  CHECK(eventually([&] { return engine.resource("s").value().reserved == 0; }));
  CHECK(engine.resource("t").value().confirmed == 1);
  CHECK(engine.stats().recovered == 3);
  // The recovered hold is a hold like any other.
  CHECK(engine.confirm("h1").value().status == BookingStatus::confirmed);
  // Resource topics were published, so a late subscriber sees the recovered counts.
  CHECK(bus->last("resource/r") != nullptr);
}

TEST_CASE("recovery with RecoveryPolicy::reject rejects what was still processing") {
  auto store = std::make_shared<TestStore>(false);
  REQUIRE(store->put_resource("r", 1));
  put(*store, stored("p1", BookingStatus::processing, "r", 1));
  EngineOptions o;
  o.store = store;
  o.recovery = RecoveryPolicy::reject;
  BookingEngine engine(std::make_shared<LocalBus>(), o);
  REQUIRE(reaches(engine, "p1", BookingStatus::rejected));
  auto b = engine.get("p1").value();
  CHECK(b.reason == RejectReason::recovery);
  CHECK(b.reason_message == "found undecided after a restart (recovery policy: reject)");
  CHECK(engine.resource("r").value().available() == 1);
}

TEST_CASE("idempotency keys survive a restart: the same booking, and a conflict for another request") {
  auto store = std::make_shared<TestStore>(true);
  std::string id;
  {
    EngineOptions o;
    o.store = store;
    BookingEngine first(std::make_shared<LocalBus>(), o);
    REQUIRE(first.add_resource("r", 5));
    id = first.submit(one("u", "r", 1, "key-1")).value().booking_id;
    REQUIRE(reaches(first, id, BookingStatus::confirmed));
  }
  EngineOptions o;
  o.store = store;
  BookingEngine second(std::make_shared<LocalBus>(), o);
  auto again = second.submit(one("u", "r", 1, "key-1")).value();
  CHECK(again.booking_id == id);
  CHECK(again.replayed);
  CHECK(again.status == BookingStatus::confirmed);
  CHECK(second.submit(one("u", "r", 2, "key-1")).error().is(errc::idempotency_conflict));
  CHECK(second.resource("r").value().confirmed == 1);
  // Outside the window a key is forgotten.
  EngineOptions short_window;
  short_window.store = store;
  short_window.idempotency_window = 1ms;
  std::this_thread::sleep_for(5ms);  // lets the 1 ms window pass; not a synchronisation
  BookingEngine third(std::make_shared<LocalBus>(), short_window);
  CHECK(third.submit(one("u", "r", 1, "key-1")).value().booking_id != id);
}

TEST_CASE("resources given at start are reconciled with the store") {
  auto store = std::make_shared<TestStore>(false);
  REQUIRE(store->put_resource("r", 10));
  put(*store, stored("c1", BookingStatus::confirmed, "r", 4));
  EngineOptions o;
  o.store = store;
  {
    BookingEngine same(std::make_shared<LocalBus>(), o);
    CHECK(same.add_resource("r", 10));  // what the store says: nothing to do
    CHECK(same.add_resource("r", 10).error().is(errc::already_exists));
    CHECK(same.add_resource("new", 2));
  }
  {
    BookingEngine grow(std::make_shared<LocalBus>(), o);
    REQUIRE(grow.add_resource("r", 12));
    CHECK(grow.resource("r").value().capacity == 12);
    CHECK(grow.resource("new").value().capacity == 2);  // stored by the engine before
  }
  BookingEngine shrink(std::make_shared<LocalBus>(), o);
  auto r = shrink.add_resource("r", 3);
  CHECK(r.error().is(errc::capacity_in_use));
  CHECK(r.error().message == "'r' has 4 units reserved or confirmed; capacity cannot drop to 3");
  CHECK(shrink.resource("r").value().capacity == 12);
  CHECK(shrink.add_resource("r", 4));
  CHECK(shrink.resource("r").value().available() == 0);
}

TEST_CASE("an unreadable store stops the engine from starting, with a clear error") {
  auto store = std::make_shared<TestStore>(false);
  store->fail_reads = true;
  EngineOptions o;
  o.store = store;
  try {
    BookingEngine engine(std::make_shared<LocalBus>(), o);
    FAIL("the engine started over a store it could not read");
  } catch (const Exception& e) {
    CHECK(e.code() == make_error_code(errc::store_failed));
    CHECK(std::string(e.what()).find("recovery: I/O error") != std::string::npos);
  }
}

TEST_CASE("submit_async answers once; with a store of its own thread, on that thread") {
  for (bool async : {false, true}) {
    CAPTURE(async);
    Fixture f(async);
    REQUIRE(f.engine->add_resource("r", 1));
    test::Collector<std::pair<bool, std::thread::id>> answers;
    f.engine->submit_async(one("u", "r"), [&](result<Ack> r) {
      answers.push({r.has_value(), std::this_thread::get_id()});
    });
    f.engine->submit_async(one("u", "nope"), [&](result<Ack> r) {
      answers.push({r.has_value(), std::this_thread::get_id()});
    });
    auto got = answers.wait_for(2);
    REQUIRE(got.size() == 2);
    CHECK(got[0].first != got[1].first);
    const auto ok = got[0].first ? got[0] : got[1];
    const auto bad = got[0].first ? got[1] : got[0];
    CHECK(bad.second == std::this_thread::get_id());  // refused at once, on the caller's thread
    CHECK((ok.second == std::this_thread::get_id()) == !async);
    REQUIRE(eventually([&] { return f.engine->stats().in_flight == 0; }));
    CHECK(answers.size() == 2);
  }
}

TEST_CASE("with a store of its own thread, concurrent bookings never overbook and events stay in order") {
  Fixture f(true);
  REQUIRE(f.engine->add_resource("r", 300));
  std::vector<std::thread> threads;
  std::mutex ids_mutex;
  std::vector<std::string> ids;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 250; ++i) {
        auto ack = f.engine->submit(one("u", "r"));
        REQUIRE(ack);
        std::lock_guard lock(ids_mutex);
        ids.push_back(ack->booking_id);
      }
    });
  for (auto& t : threads) t.join();
  REQUIRE(eventually([&] { return f.engine->stats().in_flight == 0; }));
  int confirmed = 0;
  for (const auto& id : ids) {
    auto events = f.events_of(id);
    REQUIRE(events.size() == 2);
    CHECK(events[0] == "processing");
    confirmed += events[1] == "confirmed";
  }
  CHECK(confirmed == 300);
  CHECK(f.resource("r").confirmed == 300);
  CHECK(f.published_before_stored.load() == 0);
}

TEST_CASE("open_store: memory:, sqlite:PATH with its sync option, and clear errors for the rest") {
  const test::TempDir temp("pushbook-open-store");  // removed after the stores below closed
  const std::string dir = temp.path();
  CHECK(dynamic_cast<MemoryStore*>(open_store("memory:").value().get()) != nullptr);
  auto normal = open_store("sqlite:" + dir + "/a.db");
  REQUIRE(normal);
  CHECK(dynamic_cast<SqliteStore&>(**normal).sync() == SqliteSync::normal);
  auto full = open_store("sqlite:" + dir + "/b.db?sync=full");
  REQUIRE(full);
  CHECK(dynamic_cast<SqliteStore&>(**full).sync() == SqliteSync::full);
  CHECK(open_store("redis://x").error().is(errc::bad_request));
  CHECK(open_store("sqlite:").error().is(errc::bad_request));
  auto bad_option = open_store("sqlite:" + dir + "/c.db?sync=sometimes");
  CHECK(bad_option.error().is(errc::bad_request));
  CHECK(bad_option.error().message ==
        "unknown sqlite option 'sync=sometimes' (known: sync=normal, sync=full)");
  CHECK(open_store("sqlite:" + dir + "/missing/dir/d.db").error().is(errc::store_failed));
}

TEST_CASE("an engine over SQLite: what one engine stored, the next one recovers") {
  const test::TempDir temp("pushbook-engine-sqlite");
  const std::string path = temp.file("bookings.db");
  std::string confirmed, held;
  {
    EngineOptions o;
    o.store = SqliteStore::open(path).value();
    BookingEngine first(std::make_shared<LocalBus>(), o);
    REQUIRE(first.add_resource("r", 3));
    confirmed = first.submit(one("u", "r", 2, "k")).value().booking_id;
    auto request = one("u", "r");
    request.hold_for = 10min;
    held = first.submit(request).value().booking_id;
    REQUIRE(reaches(first, confirmed, BookingStatus::confirmed));
    REQUIRE(reaches(first, held, BookingStatus::held));
  }
  EngineOptions o;
  o.store = SqliteStore::open(path).value();
  BookingEngine second(std::make_shared<LocalBus>(), o);
  auto r = second.resource("r").value();
  CHECK(r.capacity == 3);
  CHECK(r.confirmed == 2);
  CHECK(r.reserved == 1);
  CHECK(second.submit(one("u", "r", 2, "k")).value().booking_id == confirmed);
  CHECK(second.release(held).value().status == BookingStatus::released);
  CHECK(second.resource("r").value().available() == 1);
}

// --- Published means relayed ------------------------------------------------------------------

namespace {

// A test bus over another one: blocking publishes, subscriptions and reads go to the inner bus.
class WrappingBus : public EventBus {
 public:
  explicit WrappingBus(EventBusPtr inner) : inner_(std::move(inner)) {}
  using EventBus::publish;
  result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                           const PublishOptions& options) override {
    return inner_->publish(topic, std::move(data), options);
  }
  result<Subscription> subscribe(std::string_view pattern, DeliveryCallback callback,
                                 SubscribeOptions options = {}) override {
    return inner_->subscribe(pattern, std::move(callback), std::move(options));
  }
  EventPtr last(std::string_view topic) const override { return inner_->last(topic); }
  std::vector<EventPtr> history(std::string_view topic, std::uint64_t since_seq = 0) const override {
    return inner_->history(topic, since_seq);
  }

 protected:
  EventBusPtr inner_;
};

// A bus that refuses publishes on demand (errc::bus_unavailable, as RedisBus while Redis is
// away) and otherwise hands them to `inner`; records what it accepted.
class FlakyBus final : public WrappingBus {
 public:
  explicit FlakyBus(EventBusPtr inner) : WrappingBus(std::move(inner)) {}
  std::atomic<bool> refuse{false};
  std::atomic<int> refused{0};

  using EventBus::publish;
  result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                           const PublishOptions& options) override {
    if (refuse.load()) {
      refused.fetch_add(1);
      return Error(errc::bus_unavailable, "the bus is away (test)");
    }
    auto r = inner_->publish(topic, std::move(data), options);
    if (options.seq && (r || r.error().is(errc::already_exists))) {
      std::lock_guard lock(mutex_);
      auto& top = taken_[std::string(topic)];
      top = std::max(top, *options.seq);
    }
    return r;
  }
  // Forwarded to the inner bus's publish_async (RedisBus: pipelined, answered on its thread).
  using EventBus::publish_async;
  void publish_async(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                     const PublishOptions& options, PublishCallback done) override {
    if (refuse.load()) {
      refused.fetch_add(1);
      if (done) done(Error(errc::bus_unavailable, "the bus is away (test)"));
      return;
    }
    inner_->publish_async(
        topic, std::move(data), options,
        [this, topic = std::string(topic), seq = options.seq, done = std::move(done)](result<EventPtr> r) {
          if (seq && (r || r.error().is(errc::already_exists))) {
            std::lock_guard lock(mutex_);
            auto& top = taken_[topic];
            top = std::max(top, *seq);
          }
          if (done) done(std::move(r));
        });
  }
  /// The highest seq the inner bus took (or already had) on `topic`.
  std::uint64_t taken(const std::string& topic) {
    std::lock_guard lock(mutex_);
    return taken_[topic];
  }

 private:
  std::mutex mutex_;
  std::map<std::string, std::uint64_t> taken_;
};

// A bus whose publish_async answers only when the test says: publishes wait in `in_flight`
// until answer() publishes one on the inner bus (or refuses it), in whatever order the test
// picks. publish() (blocking) goes straight to the inner bus.
class DelayedBus final : public WrappingBus {
 public:
  struct call {
    std::string topic;
    std::shared_ptr<const boost::json::value> data;
    PublishOptions options;
    PublishCallback done;
  };
  explicit DelayedBus(EventBusPtr inner) : WrappingBus(std::move(inner)) {}

  using EventBus::publish_async;
  void publish_async(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                     const PublishOptions& options, PublishCallback done) override {
    {
      std::lock_guard lock(mutex_);
      if (!released_) {
        calls_.push_back({std::string(topic), std::move(data), options, std::move(done)});
        cv_.notify_all();
        return;
      }
    }
    auto r = inner_->publish(topic, std::move(data), options);
    if (done) done(std::move(r));
  }
  /// From now on every publish is taken at once, those waiting too (a test that ends, or fails,
  /// with publishes unanswered would otherwise wait for them in the engine's destructor).
  void release() {
    {
      std::lock_guard lock(mutex_);
      released_ = true;
    }
    for (;;) {
      {
        std::lock_guard lock(mutex_);
        if (calls_.empty()) return;
      }
      answer(0);
    }
  }
  /// Topics of the publishes waiting for an answer, oldest first.
  std::vector<std::string> in_flight() {
    std::lock_guard lock(mutex_);
    std::vector<std::string> topics;
    for (const auto& c : calls_) topics.push_back(c.topic);
    return topics;
  }
  /// Waits (at most `timeout`) until at least `n` publishes wait for an answer.
  bool wait_in_flight(std::size_t n, std::chrono::milliseconds timeout = 10s) {
    std::unique_lock lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] { return calls_.size() >= n; });
  }
  /// Answers the i-th waiting publish: published on the inner bus, or refused (bus_unavailable).
  void answer(std::size_t i, bool take = true) {
    call c;
    {
      std::lock_guard lock(mutex_);
      if (i >= calls_.size()) return;
      c = std::move(calls_[i]);
      calls_.erase(calls_.begin() + static_cast<std::ptrdiff_t>(i));
    }
    auto r = take ? inner_->publish(c.topic, std::move(c.data), c.options)
                  : result<EventPtr>(Error(errc::bus_unavailable, "refused (test)"));
    if (c.done) c.done(std::move(r));
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<call> calls_;
  bool released_ = false;
};

// Declared after the engine: releases the bus's publishes before the engine is destroyed.
struct ReleaseAtExit {
  DelayedBus& bus;
  ~ReleaseAtExit() { bus.release(); }
};

bool distinct(std::vector<std::string> topics) {
  std::sort(topics.begin(), topics.end());
  return std::adjacent_find(topics.begin(), topics.end()) == topics.end();
}

// A SqliteStore that never hears published(): what a process that died before its marks were
// written leaves behind (every version still in the outbox).
class ForgetfulStore final : public BookingStore {
 public:
  explicit ForgetfulStore(std::shared_ptr<SqliteStore> inner) : inner_(std::move(inner)) {}
  result<void> commit(const StateChange& change) override { return inner_->commit(change); }
  void commit_async(const StateChange& change, CommitCallback done) override {
    inner_->commit_async(change, std::move(done));
  }
  result<std::optional<Booking>> load(std::string_view id) const override { return inner_->load(id); }
  result<void> put_resource(std::string_view id, std::uint32_t capacity) override {
    return inner_->put_resource(id, capacity);
  }
  result<RecoveredState> recover(wall_clock::time_point since) override { return inner_->recover(since); }

 private:
  std::shared_ptr<SqliteStore> inner_;
};

// Every event delivered on booking/* and user/*: (topic, seq, status).
struct Delivered {
  std::string topic;
  std::uint64_t seq;
  std::string status;
  friend bool operator==(const Delivered&, const Delivered&) = default;
};

struct Recorder {
  test::Collector<Delivered> events;
  std::vector<Subscription> subs;
  explicit Recorder(EventBus& bus) {
    for (const char* pattern : {"booking/*", "user/*"})
      subs.push_back(bus.subscribe(pattern,
                                   [this](const Delivery& d) {
                                     if (!d.event) return;
                                     events.push({d.event->topic(), d.event->seq(),
                                                  std::string(d.event->data().at("status").as_string())});
                                   })
                         .value());
  }
  std::vector<Delivered> on(const std::string& topic) {
    std::vector<Delivered> out;
    for (auto& e : events.items())
      if (e.topic == topic) out.push_back(e);
    return out;
  }
};

}  // namespace

namespace {

// A bus that answers each publish_async twice (the second time with a refusal), or answers and
// then throws.
class TwiceAnsweringBus final : public WrappingBus {
 public:
  TwiceAnsweringBus(EventBusPtr inner, bool then_throw)
      : WrappingBus(std::move(inner)), then_throw_(then_throw) {}
  using EventBus::publish_async;
  void publish_async(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                     const PublishOptions& options, PublishCallback done) override {
    done(inner_->publish(topic, std::move(data), options));
    if (then_throw_) throw std::runtime_error("failed after answering (test)");
    done(Error(errc::bus_unavailable, "a second answer (test)"));
  }

 private:
  bool then_throw_;
};

}  // namespace

TEST_CASE("a bus that answers a publish twice, or answers and then throws, is heard once") {
  for (const bool then_throw : {false, true}) {
    CAPTURE(then_throw);
    auto inner = std::make_shared<LocalBus>();
    Recorder seen(*inner);
    BookingEngine engine(std::make_shared<TwiceAnsweringBus>(inner, then_throw));
    REQUIRE(engine.add_resource("r", 100));
    std::vector<std::string> ids;
    for (int i = 0; i < 10; ++i) ids.push_back(engine.submit(one("u", "r")).value().booking_id);
    for (const auto& id : ids) REQUIRE(reaches(engine, id, BookingStatus::confirmed));
    // Each version once, in order; no answer taken for a retry or a second advance.
    CHECK(seen.events.wait_for(4 * ids.size()).size() == 4 * ids.size());
    for (const auto& id : ids)
      CHECK(seen.on("booking/" + id) ==
            std::vector<Delivered>{{"booking/" + id, 1, "processing"}, {"booking/" + id, 2, "confirmed"}});
    CHECK(seen.on("user/u").size() == 2 * ids.size());
    CHECK(eventually([&] { return engine.stats().publish_backlog == 0; }));
    const auto stats = engine.stats();
    CHECK(stats.publish_failures == 0);
    CHECK(stats.publish_retries == 0);
  }
}

TEST_CASE("a crash between commit and publish: the next start relays each stored version once") {
  const test::TempDir temp("pushbook-relay");
  const std::string path = temp.file("bookings.db");
  std::vector<std::string> ids;
  {
    // Every publish refused: the engine is destroyed with its backlog unpublished, as a process
    // that died between its commits and its publishes.
    auto bus = std::make_shared<FlakyBus>(std::make_shared<LocalBus>());
    bus->refuse = true;
    EngineOptions o;
    o.store = SqliteStore::open(path).value();
    BookingEngine engine(bus, o);
    REQUIRE(engine.add_resource("r", 10));
    for (int i = 0; i < 5; ++i)
      ids.push_back(engine.submit(one("u" + std::to_string(i % 2), "r")).value().booking_id);
    for (const auto& id : ids) REQUIRE(reaches(engine, id, BookingStatus::confirmed));
    CHECK(engine.stats().publish_failures > 0);
    CHECK(engine.stats().publish_backlog > 0);
  }
  // A fresh bus: the relay publishes the latest stored version of each booking, with seq =
  // version, user/ after booking/, before the engine takes anything new.
  auto bus = std::make_shared<LocalBus>();
  Recorder seen(*bus);
  {
    EngineOptions o;
    o.store = SqliteStore::open(path).value();
    BookingEngine engine(bus, o);
    CHECK(engine.stats().relayed == ids.size());
    auto events = seen.events.wait_for(2 * ids.size());
    CHECK(events.size() == 2 * ids.size());
    for (const auto& id : ids)
      CHECK(seen.on("booking/" + id) == std::vector<Delivered>{{"booking/" + id, 2, "confirmed"}});
    CHECK(seen.on("user/u0").size() == 3);
    CHECK(seen.on("user/u1").size() == 2);
  }  // closed: the published marks are written
  {
    // Nothing left to relay.
    EngineOptions o;
    o.store = SqliteStore::open(path).value();
    BookingEngine engine(bus, o);
    CHECK(engine.stats().relayed == 0);
  }
  // Nothing came twice (a last event, published after the rest, shows the deliveries are done).
  REQUIRE(bus->publish("booking/end", boost::json::object{{"status", "end"}}));
  CHECK(seen.events.wait_for(2 * ids.size() + 1).size() == 2 * ids.size() + 1);
}

TEST_CASE("relayed twice (marks lost in a second crash): the bus delivers each version once") {
  const test::TempDir temp("pushbook-relay-twice");
  const std::string path = temp.file("bookings.db");
  std::vector<std::string> ids;
  {
    EngineOptions o;
    o.store = std::make_shared<ForgetfulStore>(SqliteStore::open(path).value());
    BookingEngine engine(std::make_shared<LocalBus>(), o);  // another process's bus, gone with it
    REQUIRE(engine.add_resource("r", 10));
    for (int i = 0; i < 4; ++i) ids.push_back(engine.submit(one("u", "r")).value().booking_id);
    auto request = one("u", "r");
    request.hold_for = 10min;
    ids.push_back(engine.submit(request).value().booking_id);
    for (std::size_t i = 0; i + 1 < ids.size(); ++i)
      REQUIRE(reaches(engine, ids[i], BookingStatus::confirmed));
    REQUIRE(reaches(engine, ids.back(), BookingStatus::held));
  }
  // Two recoveries over one bus (as two restarts over one Redis), neither recording its marks.
  auto bus = std::make_shared<LocalBus>();
  Recorder seen(*bus);
  for (int restart = 0; restart < 2; ++restart) {
    CAPTURE(restart);
    EngineOptions o;
    o.store = std::make_shared<ForgetfulStore>(SqliteStore::open(path).value());
    BookingEngine engine(bus, o);
    CHECK(engine.stats().relayed == ids.size());
    CHECK(engine.stats().publish_failures == 0);
  }
  REQUIRE(bus->publish("booking/end", boost::json::object{{"status", "end"}}));
  auto events = seen.events.wait_for(2 * ids.size() + 1);
  CHECK(events.size() == 2 * ids.size() + 1);  // booking/ and user/ of each, once
  for (std::size_t i = 0; i + 1 < ids.size(); ++i)
    CHECK(seen.on("booking/" + ids[i]) == std::vector<Delivered>{{"booking/" + ids[i], 2, "confirmed"}});
  CHECK(seen.on("booking/" + ids.back()) == std::vector<Delivered>{{"booking/" + ids.back(), 2, "held"}});
  CHECK(seen.on("user/u").size() == ids.size());
}

TEST_CASE("a bus that refuses, then takes again: every event is retried, in order, each version once") {
  for (bool sqlite : {false, true}) {
    CAPTURE(sqlite);
    const test::TempDir temp("pushbook-retry");
    auto bus = std::make_shared<FlakyBus>(std::make_shared<LocalBus>());
    Recorder seen(*bus);
    test::Collector<std::uint64_t> availability;
    auto resource_sub =
        bus->subscribe(
               "resource/r",
               [&](const Delivery& d) {
                 if (d.kind == Delivery::Kind::event)
                   availability.push(static_cast<std::uint64_t>(d.event->data().at("available").as_int64()));
               })
            .value();
    EngineOptions o;
    if (sqlite) o.store = SqliteStore::open(temp.file("bookings.db")).value();
    BookingEngine engine(bus, o);
    REQUIRE(engine.add_resource("r", 100));
    REQUIRE(availability.wait_for(1).size() == 1);
    bus->refuse = true;
    std::vector<std::string> ids;
    for (int i = 0; i < 20; ++i) {
      auto ack = engine.submit(one("u", "r")).value();
      CHECK(ack.version == 1);
      ids.push_back(ack.booking_id);
    }
    for (const auto& id : ids) REQUIRE(reaches(engine, id, BookingStatus::confirmed));
    REQUIRE(eventually([&] { return bus->refused.load() >= 3; }));  // retries were refused too
    // 2 events per version, 2 versions per booking; one resource event kept (the latest state).
    CHECK(eventually([&] { return engine.stats().publish_backlog == 2 * 2 * ids.size() + 1; }));
    CHECK(engine.stats().publish_failures >= 1);
    bus->refuse = false;
    REQUIRE(eventually([&] { return engine.stats().publish_backlog == 0; }));
    CHECK(engine.stats().publish_retries == 2 * 2 * ids.size() + 1);
    seen.events.wait_for(2 * 2 * ids.size());
    for (const auto& id : ids)
      CHECK(seen.on("booking/" + id) ==
            std::vector<Delivered>{{"booking/" + id, 1, "processing"}, {"booking/" + id, 2, "confirmed"}});
    CHECK(seen.on("user/u").size() == 2 * ids.size());
    // The resource's events while refused collapsed into its latest state.
    auto avail = availability.wait_for(2);
    CHECK(avail == std::vector<std::uint64_t>{100, 80});
    // A replayed idempotent submit reports the version it finds.
    auto keyed = engine.submit(one("u", "r", 1, "k")).value();
    REQUIRE(reaches(engine, keyed.booking_id, BookingStatus::confirmed));
    auto replay = engine.submit(one("u", "r", 1, "k")).value();
    CHECK(replay.replayed);
    CHECK(replay.version == 2);
  }
}

TEST_CASE(
    "the engine never waits for the bus: one event in flight per topic, each topic in order "
    "whatever order the bus answers in") {
  auto inner = std::make_shared<LocalBus>();
  auto bus = std::make_shared<DelayedBus>(inner);
  Recorder seen(*inner);
  test::Collector<std::int64_t> availability;
  auto resource_sub = inner
                          ->subscribe("resource/r",
                                      [&](const Delivery& d) {
                                        if (d.kind == Delivery::Kind::event)
                                          availability.push(d.event->data().at("available").as_int64());
                                      })
                          .value();
  BookingEngine engine(bus);
  ReleaseAtExit release_at_exit{*bus};
  REQUIRE(engine.add_resource("r", 100));
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(engine.submit(one("u", "r")).value().booking_id);
  // ACKed and decided while the bus has answered nothing.
  for (const auto& id : ids) REQUIRE(reaches(engine, id, BookingStatus::confirmed));
  // One event in flight per topic: resource/r (the resource's first state) and user/u (the first
  // booking's); each booking/<id> waits behind its user/ event. Waiting: 2 versions x 2 events of
  // each booking, and one resource state (the latest).
  REQUIRE(eventually([&] { return engine.stats().publish_backlog == 2 * 2 * ids.size() + 2; }));
  CHECK(bus->in_flight() == std::vector<std::string>{"resource/r", "user/u"});

  const auto seed = std::random_device{}();
  MESSAGE("seed " << seed);
  std::mt19937 rng(seed);
  bool first = true;
  while (engine.stats().publish_backlog > 0) {
    REQUIRE(bus->wait_in_flight(1));  // a refused event comes back after its backoff
    const auto topics = bus->in_flight();
    REQUIRE(distinct(topics));
    // Any of them, in any order; one in four refused (the first always).
    const auto i = std::uniform_int_distribution<std::size_t>(0, topics.size() - 1)(rng);
    bus->answer(i, !first && rng() % 4 != 0);
    first = false;
  }
  CHECK(engine.stats().publish_failures >= 1);
  CHECK(eventually([&] { return engine.stats().publish_retries >= 1; }));
  CHECK(engine.stats().publish_dropped == 0);
  auto events = seen.events.wait_for(2 * 2 * ids.size());
  REQUIRE(events.size() == 2 * 2 * ids.size());
  for (const auto& id : ids) {
    CHECK(seen.on("booking/" + id) ==
          std::vector<Delivered>{{"booking/" + id, 1, "processing"}, {"booking/" + id, 2, "confirmed"}});
  }
  // user/u: each booking's processing before its confirmation, and the ACK order kept for the
  // processing events (made in submit order, on one topic).
  auto user = seen.on("user/u");
  REQUIRE(user.size() == 2 * ids.size());
  std::vector<std::uint64_t> seqs;
  for (const auto& e : user) seqs.push_back(e.seq);
  CHECK(std::is_sorted(seqs.begin(), seqs.end()));
  // The resource's states never go back in time: availability only falls, to the final 94.
  REQUIRE(eventually([&] { return inner->last("resource/r")->data().at("available") == 94; }));
  // (A refused state is retried with the latest one: the first, 100, may never be seen.)
  auto avail = availability.items();
  CHECK(std::is_sorted(avail.rbegin(), avail.rend()));
}

TEST_CASE("shutdown() returns once the bus answered every event it was handed") {
  auto inner = std::make_shared<LocalBus>();
  auto bus = std::make_shared<DelayedBus>(inner);
  auto engine = std::make_unique<BookingEngine>(bus);
  ReleaseAtExit release_at_exit{*bus};
  REQUIRE(engine->add_resource("r", 10));
  auto id = engine->submit(one("u", "r")).value().booking_id;
  REQUIRE(reaches(*engine, id, BookingStatus::confirmed));
  REQUIRE(bus->wait_in_flight(2));
  std::atomic<bool> returned{false};
  std::thread stopper([&] {
    engine->shutdown();
    returned = true;
  });
  // Not a synchronisation: whatever the timing, shutdown() must not return before the answers.
  std::this_thread::sleep_for(100ms);
  CHECK_FALSE(returned.load());
  // The booking's events come one after the other (user/ then booking/, version by version).
  while (!returned.load())
    if (bus->wait_in_flight(1, 20ms)) bus->answer(0);
  stopper.join();
  CHECK(inner->last("booking/" + id)->seq() == 2);
  CHECK(inner->last("user/u")->data().at("status") == "confirmed");
  CHECK(engine->stats().publish_backlog == 0);
}

TEST_CASE("shutdown() with a refused event drops it (counted) and leaves no topic blocked") {
  auto inner = std::make_shared<LocalBus>();
  auto bus = std::make_shared<DelayedBus>(inner);
  BookingEngine engine(bus);
  ReleaseAtExit release_at_exit{*bus};
  REQUIRE(engine.add_resource("r", 10));
  auto id = engine.submit(one("u", "r")).value().booking_id;
  REQUIRE(reaches(engine, id, BookingStatus::confirmed));
  // Everything answered but user/u's first event, refused: it waits for a retry, the rest of
  // user/u and the booking's events behind it.
  REQUIRE(bus->wait_in_flight(2));
  for (;;) {  // resource/r's states, one after the other
    const auto topics = bus->in_flight();
    const auto r = std::find(topics.begin(), topics.end(), "resource/r");
    if (r == topics.end()) break;
    bus->answer(static_cast<std::size_t>(r - topics.begin()));
  }
  REQUIRE(bus->in_flight() == std::vector<std::string>{"user/u"});
  bus->answer(0, false);
  REQUIRE(eventually([&] { return engine.stats().publish_failures == 1; }));
  engine.shutdown();  // the retry is discarded with the timers: dropped, nothing left waiting
  const auto st = engine.stats();
  CHECK(st.publish_backlog == 0);
  CHECK(st.publish_dropped == 4);  // user/ and booking/ of versions 1 and 2
  CHECK_FALSE(engine.publishing(id));
  // A change after shutdown() is not stuck behind the dropped events of its topics.
  auto cancelled = engine.cancel(id);
  REQUIRE(cancelled);
  REQUIRE(bus->wait_in_flight(2));
  CHECK(bus->in_flight() == std::vector<std::string>{"resource/r", "user/u"});
  while (bus->wait_in_flight(1, 200ms)) bus->answer(0);
  CHECK(inner->last("booking/" + id)->data().at("status") == "cancelled");
}

TEST_CASE("publishing(id) is true until the bus took every event of the booking's changes") {
  auto inner = std::make_shared<LocalBus>();
  auto bus = std::make_shared<DelayedBus>(inner);
  BookingEngine engine(bus);
  ReleaseAtExit release_at_exit{*bus};
  REQUIRE(engine.add_resource("r", 10));
  auto id = engine.submit(one("u", "r")).value().booking_id;
  CHECK(engine.publishing(id));
  REQUIRE(reaches(engine, id, BookingStatus::confirmed));
  CHECK(engine.publishing(id));
  CHECK_FALSE(engine.publishing("nope"));
  while (engine.stats().publish_backlog > 0) {
    REQUIRE(bus->wait_in_flight(1));
    CHECK(engine.publishing(id));  // at least the booking/ event of version 2 is still to go
    bus->answer(0);
  }
  CHECK_FALSE(engine.publishing(id));
  CHECK(inner->last("booking/" + id)->seq() == 2);
}

TEST_CASE("a booking's new change waits for its relay: its user/ events keep their order") {
  const test::TempDir temp("pushbook-relay-order");
  const std::string path = temp.file("bookings.db");
  std::string id;
  {
    EngineOptions o;
    o.store = std::make_shared<ForgetfulStore>(SqliteStore::open(path).value());
    BookingEngine engine(std::make_shared<LocalBus>(), o);  // another process's bus, gone with it
    REQUIRE(engine.add_resource("r", 10));
    auto request = one("u", "r");
    request.hold_for = 10min;
    id = engine.submit(request).value().booking_id;
    REQUIRE(reaches(engine, id, BookingStatus::held));
  }
  auto inner = std::make_shared<LocalBus>();
  auto bus = std::make_shared<DelayedBus>(inner);
  Recorder seen(*inner);
  EngineOptions o;
  o.store = SqliteStore::open(path).value();
  BookingEngine engine(bus, o);
  ReleaseAtExit release_at_exit{*bus};
  CHECK(engine.stats().relayed == 1);
  // The relay of version 2 (held) is at the bus: booking/<id> first. The confirmation (version
  // 3) waits for it, user/ event included.
  REQUIRE(engine.confirm(id));
  REQUIRE(bus->wait_in_flight(2));
  auto topics = bus->in_flight();
  std::sort(topics.begin(), topics.end());
  CHECK(topics == std::vector<std::string>{"booking/" + id, "resource/r"});
  // Answered newest first: an event let through ahead of its turn would be taken first.
  while (engine.stats().publish_backlog > 0) {
    REQUIRE(bus->wait_in_flight(1));
    bus->answer(bus->in_flight().size() - 1);
  }
  auto user = seen.events.wait_for(4);
  REQUIRE(user.size() == 4);
  CHECK(seen.on("booking/" + id) ==
        std::vector<Delivered>{{"booking/" + id, 2, "held"}, {"booking/" + id, 3, "confirmed"}});
  auto on_user = seen.on("user/u");
  REQUIRE(on_user.size() == 2);
  CHECK(on_user[0].status == "held");
  CHECK(on_user[1].status == "confirmed");
  CHECK(inner->last("user/u")->data().at("status") == "confirmed");
}

TEST_CASE("max_publish_backlog bounds what waits for the bus; beyond, events are dropped and counted") {
  auto inner = std::make_shared<LocalBus>();
  auto bus = std::make_shared<DelayedBus>(inner);
  EngineOptions o;
  o.max_publish_backlog = 5;
  BookingEngine engine(bus, o);
  ReleaseAtExit release_at_exit{*bus};
  REQUIRE(engine.add_resource("r", 100));
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(engine.submit(one("u", "r")).value().booking_id);
  for (const auto& id : ids) REQUIRE(reaches(engine, id, BookingStatus::confirmed));
  REQUIRE(eventually([&] { return engine.stats().publish_dropped > 0; }));
  // The bound, plus a resource's two (its states are never dropped: one at the bus, the latest
  // behind it).
  CHECK(engine.stats().publish_backlog <= 5 + 2);
  while (engine.stats().publish_backlog > 0) {
    REQUIRE(bus->wait_in_flight(1));
    bus->answer(0);
  }
  // What was kept went out, in order; what was dropped is counted (a durable store would relay
  // those versions at the next start).
  const auto kept = engine.stats();
  CHECK(kept.publish_dropped > 0);
  CHECK(bus->in_flight().empty());
  // The resource's last value is its current state, whatever was dropped.
  CHECK(inner->last("resource/r")->data().at("available") == 96);
}

TEST_CASE("Redis killed and restarted while the engine publishes: no decision is lost") {
  test::RedisServer server;
  RedisBusOptions ro;
  ro.address = server.address();
  ro.reconnect_min = 10ms;
  ro.reconnect_max = 100ms;
  ro.command_timeout = 500ms;
  auto redis = std::make_shared<RedisBus>(ro);
  REQUIRE(redis->wait_connected(10s));
  auto bus = std::make_shared<FlakyBus>(redis);  // records what Redis took
  const test::TempDir temp("pushbook-redis-kill");
  EngineOptions o;
  o.store = SqliteStore::open(temp.file("bookings.db")).value();
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 1'000'000));
  std::mutex ids_mutex;
  std::vector<std::string> ids;
  auto count = [&] {
    std::lock_guard lock(ids_mutex);
    return ids.size();
  };
  std::atomic<bool> stop{false};
  std::thread submitter([&] {
    while (!stop.load()) {
      auto ack = engine.submit(one("u", "r"));
      REQUIRE(ack);  // the ACK needs the store, never the bus
      std::lock_guard lock(ids_mutex);
      ids.push_back(ack->booking_id);
    }
  });
  REQUIRE(eventually([&] { return count() >= 50; }));
  server.kill();
  REQUIRE(eventually([&] { return engine.stats().publish_failures > 0; }));
  const auto while_down = count();
  REQUIRE(eventually([&] { return count() >= while_down + 50; }));  // bookings go on meanwhile
  server.start();
  REQUIRE(eventually([&] { return engine.stats().publish_retries > 0; }, 30s));
  const auto after = count();
  REQUIRE(eventually([&] { return count() >= after + 50; }));
  stop = true;
  submitter.join();
  REQUIRE(
      eventually([&] { return engine.stats().in_flight == 0 && engine.stats().publish_backlog == 0; }, 30s));
  // Every booking's latest version reached Redis (taken, or found there already).
  std::size_t lost = 0;
  for (const auto& id : ids)
    if (bus->taken("booking/" + id) != engine.get(id).value().version) ++lost;
  CHECK(lost == 0);
  CHECK(ids.size() >= 150);
  // Those published after the restart are in the new Redis as they are in the store.
  const auto& last_id = ids.back();
  auto last = redis->last("booking/" + last_id);
  REQUIRE(last);
  CHECK(last->seq() == engine.get(last_id).value().version);
}
