#include <pushbook/booking_engine.hpp>

#include "requests.hpp"
#include "test_store.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>
#include <boost/json/serialize.hpp>

#include <algorithm>
#include <atomic>
#include <latch>
#include <map>
#include <set>
#include <thread>

using namespace pushbook;
using namespace std::chrono_literals;
using pushbook::test::Collector;
using pushbook::test::eventually;
using pushbook::test::one;

namespace {

// Records the status sequence of every booking/<id> topic it watches.
struct Watcher {
  std::shared_ptr<LocalBus> bus;
  Collector<std::pair<std::uint64_t, std::string>> got;
  Subscription sub;
  Watcher(std::shared_ptr<LocalBus> b, const std::string& topic) : bus(std::move(b)) {
    SubscribeOptions o;
    o.since_seq = 0;
    sub = bus->subscribe(
                 topic,
                 [this](const Delivery& d) {
                   if (d.event)
                     got.push({d.event->seq(), std::string(d.event->data().at("status").as_string())});
                 },
                 o)
              .value();
  }
  std::vector<std::pair<std::uint64_t, std::string>> wait_for(std::size_t n) { return got.wait_for(n); }
};

using StatusSeq = std::vector<std::pair<std::uint64_t, std::string>>;

// Waits until the booking reaches `status` (deadline) and returns it.
Booking await_status(BookingEngine& engine, const std::string& id, BookingStatus status) {
  Booking b;
  eventually([&] {
    auto r = engine.get(id);
    if (r) b = *r;
    return r && r->status == status;
  });
  return b;
}

// Waits until booking/<id> has published `status`: the booking as clients see it decided.
bool await_published(const std::shared_ptr<LocalBus>& bus, const std::string& id, const std::string& status) {
  Watcher w(bus, "booking/" + id);
  return eventually([&] {
    for (const auto& [seq, s] : w.got.items())
      if (s == status) return true;
    return false;
  });
}

}  // namespace

TEST_CASE("resources: add, change capacity, query availability") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("room-1", 2));
  CHECK(engine.add_resource("room-1", 3).error().is(errc::already_exists));
  CHECK(engine.add_resource("bad id", 3).error().is(errc::bad_request));
  CHECK(*engine.availability("room-1") == 2);
  CHECK(engine.availability("nope").error().is(errc::not_found));
  REQUIRE(engine.set_capacity("room-1", 5));
  CHECK(engine.resource("room-1")->capacity == 5);
  CHECK(engine.set_capacity("nope", 1).error().is(errc::not_found));
  REQUIRE(engine.add_resource("room-0", 0));
  CHECK(engine.resources().size() == 2);
  CHECK(engine.resources()[0].id == "room-0");
  auto last = bus->last("resource/room-1");
  REQUIRE(last);
  CHECK(last->data().at("capacity") == 5);
  CHECK(last->data().at("available") == 5);
}

TEST_CASE("submit refuses bad requests at once, with no ACK and no event") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("room-1", 2));
  REQUIRE(engine.add_resource("room-2", 2));

  auto expect = [&](BookingRequest r, errc code, std::string message) {
    auto res = engine.submit(std::move(r));
    REQUIRE_FALSE(res.has_value());
    CHECK(res.error().is(code));
    CHECK(res.error().message == message);
  };
  expect(one("u1", "room-9"), errc::not_found, "unknown resource 'room-9'");
  expect(one("u1", "room-1", 0), errc::bad_request, "lines[0]: quantity must be at least 1");
  expect(one("u1", "room-1", 3), errc::exceeds_capacity, "'room-1' has only 2 units, 3 asked");
  expect(one("", "room-1"), errc::bad_request,
         "user must be 1-128 characters of letters, digits and -_.:@+=~");
  expect(one("u 1", "room-1"), errc::bad_request,
         "user must be 1-128 characters of letters, digits and -_.:@+=~");
  BookingRequest empty;
  empty.user = "u1";
  expect(empty, errc::bad_request, "a booking needs at least one line");
  auto twice = one("u1", "room-1");
  twice.lines.push_back({"room-1", 1});
  expect(twice, errc::bad_request, "lines[1]: resource 'room-1' appears twice");
  auto hold = one("u1", "room-1");
  hold.hold_for = 0ms;
  expect(hold, errc::bad_request, "a hold must last from 1 ms to 900000 ms");
  expect(one("u1", "room-1", 1, "key with space"), errc::bad_request,
         "idempotency_key must be 1-128 characters of letters, digits and -_.:@+=~");

  CHECK(engine.stats().accepted == 0);
  CHECK(engine.stats().invalid == 9);
  CHECK(bus->stats().published == 2);  // only the two resource announcements
}

TEST_CASE("submit ACKs processing at once; the decision follows on booking/<id> and user/<user>") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("room-1", 1));
  Watcher user(bus, "user/alice");
  auto ack = engine.submit(one("alice", "room-1")).value();
  CHECK(ack.status == BookingStatus::processing);
  CHECK_FALSE(ack.replayed);
  CHECK(ack.booking_id.size() == 26);
  Watcher booking(bus, "booking/" + ack.booking_id);
  CHECK(booking.wait_for(2) == StatusSeq{{1, "processing"}, {2, "confirmed"}});
  CHECK(user.wait_for(2) == StatusSeq{{1, "processing"}, {2, "confirmed"}});
  auto b = engine.get(ack.booking_id).value();
  CHECK(b.status == BookingStatus::confirmed);
  CHECK(b.version == 2);
  CHECK(b.user == "alice");
  CHECK(*engine.availability("room-1") == 0);
  auto last = bus->last("booking/" + ack.booking_id);
  CHECK(last->data().at("booking_id").as_string() == ack.booking_id);
  CHECK(last->data().at("lines").as_array().size() == 1);
  CHECK(bus->last("resource/room-1")->data().at("available") == 0);
}

TEST_CASE(
    "without a handler a booking is decided on the submitting thread; decide_on_caller off: on a worker") {
  struct Case {
    bool on_caller;
    bool async_store;  // commits completed on the store's own thread, as SQLite's are
  };
  for (const auto c : {Case{true, false}, Case{false, false}, Case{true, true}}) {
    CAPTURE(c.on_caller);
    CAPTURE(c.async_store);
    auto bus = std::make_shared<LocalBus>();
    auto store = std::make_shared<test::TestStore>(c.async_store);
    std::mutex mutex;
    std::vector<std::pair<BookingStatus, std::thread::id>> commits;  // the thread of each commit
    store->fail_when([&](const Booking& b) {
      std::lock_guard lock(mutex);
      commits.emplace_back(b.status, std::this_thread::get_id());
      return false;
    });
    EngineOptions o;
    o.decide_on_caller = c.on_caller;
    o.store = store;
    BookingEngine engine(bus, o);
    REQUIRE(engine.add_resource("room-1", 1));
    // Workers spin a little after start before they park; one still spinning may take a queued
    // booking before its submitting thread does. Parked, they are woken only for work the
    // submitting thread leaves.
    REQUIRE(eventually([&] { return engine.stats().parked_workers == o.workers; }));
    auto first = engine.submit(one("alice", "room-1")).value();
    auto second = engine.submit(one("bob", "room-1")).value();
    const bool here = c.on_caller && !c.async_store;
    if (here) {  // decided before submit returned
      CHECK(engine.get(first.booking_id)->status == BookingStatus::confirmed);
      CHECK(engine.get(second.booking_id)->reason == RejectReason::sold_out);  // in arrival order
    }
    REQUIRE(eventually([&] { return engine.stats().in_flight == 0; }));
    CHECK(engine.get(first.booking_id)->status == BookingStatus::confirmed);
    CHECK(engine.get(second.booking_id)->status == BookingStatus::rejected);
    std::lock_guard lock(mutex);
    REQUIRE(commits.size() == 4);
    for (const auto& [status, thread] : commits) {
      if (status == BookingStatus::processing)
        CHECK(thread == std::this_thread::get_id());  // the ACK's commit: always the caller's
      else if (here || !c.on_caller)
        CHECK((thread == std::this_thread::get_id()) == here);
      // With the store's own thread completing, either may decide: the caller when the completion
      // came before submit looked for it, else a worker.
    }
  }
}

// Regression (review of decide_on_caller): the first version set the ACKed booking aside until
// submit_async returned, so a booking submitted from its ACK callback (or by another thread in
// between) was decided first and took the last unit.
TEST_CASE("decide_on_caller: a booking submitted from another's ACK callback is decided after it") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus, EngineOptions{});
  REQUIRE(engine.add_resource("room-1", 1));
  std::optional<result<Ack>> first, second;
  engine.submit_async(one("alice", "room-1"), [&](result<Ack> a) {
    first = std::move(a);
    engine.submit_async(one("bob", "room-1"), [&](result<Ack> b) { second = std::move(b); });
  });
  REQUIRE(first);
  REQUIRE(*first);
  REQUIRE(eventually([&] { return second.has_value() && engine.stats().in_flight == 0; }));
  REQUIRE(*second);
  CHECK(engine.get((*first)->booking_id)->status == BookingStatus::confirmed);
  CHECK(engine.get((*second)->booking_id)->reason == RejectReason::sold_out);
}

// A `done` that throws leaves submit_async with the exception; the booking it ACKed is decided all
// the same (by a worker), and shutdown does not wait for it forever.
TEST_CASE("decide_on_caller: an ACK callback that throws does not lose its booking") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus, EngineOptions{});
  REQUIRE(engine.add_resource("room-1", 5));
  std::string id;
  CHECK_THROWS_AS(engine.submit_async(one("alice", "room-1"),
                                      [&](result<Ack> a) {
                                        id = a.value().booking_id;
                                        throw std::runtime_error("host callback failed");
                                      }),
                  std::runtime_error);
  REQUIRE(!id.empty());
  REQUIRE(eventually([&] { return engine.get(id)->status == BookingStatus::confirmed; }));
  // in_flight drops once the decision is published, a moment after the store has it.
  CHECK(eventually([&] { return engine.stats().in_flight == 0; }));
  engine.shutdown();
}

TEST_CASE("capacity 1, three bookings: the first is confirmed, the others sold_out, in arrival order") {
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.workers = 4;
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("seat", 1));
  std::vector<std::string> ids;
  for (const char* u : {"a", "b", "c"}) ids.push_back(engine.submit(one(u, "seat")).value().booking_id);
  CHECK(await_status(engine, ids[0], BookingStatus::confirmed).status == BookingStatus::confirmed);
  auto b = await_status(engine, ids[1], BookingStatus::rejected);
  CHECK(b.reason == RejectReason::sold_out);
  CHECK(b.reason_message == "'seat' has 0 of 1 units free");
  CHECK(await_status(engine, ids[2], BookingStatus::rejected).reason == RejectReason::sold_out);
}

TEST_CASE("requests for one resource are decided in arrival order across workers") {
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.workers = 4;
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 30));
  std::vector<std::string> ids;
  for (int i = 0; i < 100; ++i)
    ids.push_back(engine.submit(one("u" + std::to_string(i), "r")).value().booking_id);
  REQUIRE(eventually([&] { return engine.stats().in_flight == 0; }));
  for (int i = 0; i < 100; ++i) {
    CAPTURE(i);
    CHECK(engine.get(ids[static_cast<std::size_t>(i)])->status ==
          (i < 30 ? BookingStatus::confirmed : BookingStatus::rejected));
  }
}

TEST_CASE("lines are booked all or nothing") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("r1", 5));
  REQUIRE(engine.add_resource("r2", 2));
  REQUIRE(engine.submit(one("x", "r2", 2)));  // takes all of r2
  REQUIRE(eventually([&] { return *engine.availability("r2") == 0; }));
  BookingRequest both = one("u", "r1", 1);
  both.lines.push_back({"r2", 1});
  auto id = engine.submit(both).value().booking_id;
  auto b = await_status(engine, id, BookingStatus::rejected);
  CHECK(b.reason == RejectReason::sold_out);
  CHECK(b.reason_message == "'r2' has 0 of 1 units free");
  CHECK(*engine.availability("r1") == 5);
}

TEST_CASE("the handler decides: approve, decline with a message, or throw") {
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.handler = [](const Booking& b, Completion done) {
    if (b.user == "thrower") throw std::runtime_error("payment service down");
    done(b.user == "good" ? Decision::approved() : Decision::declined("card declined"));
  };
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 10));
  auto good = engine.submit(one("good", "r", 2)).value().booking_id;
  auto bad = engine.submit(one("bad", "r", 3)).value().booking_id;
  auto thrower = engine.submit(one("thrower", "r", 1)).value().booking_id;
  CHECK(await_status(engine, good, BookingStatus::confirmed).status == BookingStatus::confirmed);
  auto b = await_status(engine, bad, BookingStatus::rejected);
  CHECK(b.reason == RejectReason::rejected_by_handler);
  CHECK(b.reason_message == "card declined");
  auto t = await_status(engine, thrower, BookingStatus::rejected);
  CHECK(t.reason == RejectReason::handler_error);
  CHECK(t.reason_message == "payment service down");
  // Store first, then memory: the last decision frees its units just after the store shows it.
  CHECK(eventually([&] { return *engine.availability("r") == 8; }));
  // The engine's state is decided before the event is published: wait for the bus to have it.
  REQUIRE(eventually([&] {
    auto e = bus->last("booking/" + bad);
    return e && e->data().at("status") == "rejected";
  }));
  CHECK(bus->last("booking/" + bad)->data().at("reason") == "rejected_by_handler");
}

TEST_CASE("an asynchronous handler answers later from another thread; capacity is held meanwhile") {
  auto bus = std::make_shared<LocalBus>();
  Collector<Completion> pending;
  EngineOptions o;
  o.handler = [&](const Booking&, Completion done) { pending.push(done); };
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 3));
  auto id = engine.submit(one("u", "r", 2)).value().booking_id;
  auto done = pending.wait_for(1);
  REQUIRE(done.size() == 1);
  CHECK(*engine.availability("r") == 1);
  CHECK(engine.get(id)->status == BookingStatus::processing);
  bool first = false, second = true;
  std::thread([&] {
    first = done[0](Decision::approved());
    second = done[0](Decision::declined("too late"));
  }).join();
  CHECK(first);
  CHECK_FALSE(second);
  CHECK(engine.get(id)->status == BookingStatus::confirmed);
  CHECK(*engine.availability("r") == 1);
  // The resource's last event is current in every count, not only in availability.
  auto last = bus->last("resource/r");
  REQUIRE(last);
  CHECK(last->data().at("available") == 1);
  CHECK(last->data().at("reserved") == 0);
  CHECK(last->data().at("confirmed") == 2);
}

TEST_CASE("a handler that does not answer in time is rejected with handler_timeout") {
  auto bus = std::make_shared<LocalBus>();
  Collector<Completion> pending;
  EngineOptions o;
  o.handler_timeout = 50ms;
  o.handler = [&](const Booking&, Completion done) { pending.push(done); };
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 1));
  auto id = engine.submit(one("u", "r")).value().booking_id;
  auto b = await_status(engine, id, BookingStatus::rejected);
  CHECK(b.reason == RejectReason::handler_timeout);
  CHECK(b.reason_message == "no answer within 50 ms");
  CHECK(eventually([&] { return *engine.availability("r") == 1; }));  // freed after the store shows it
  auto done = pending.wait_for(1);
  CHECK_FALSE(done.at(0)(Decision::approved()));  // too late: ignored
  CHECK(engine.get(id)->status == BookingStatus::rejected);
}

TEST_CASE("a handler that blocks past the timeout is rejected with handler_timeout, even if it approves") {
  auto bus = std::make_shared<LocalBus>();
  std::latch release{1};
  EngineOptions o;
  o.handler_timeout = 30ms;
  o.handler = [&](const Booking&, Completion done) {
    release.wait();  // blocks the worker longer than the timeout
    CHECK_FALSE(done(Decision::approved()));
  };
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 1));
  auto id = engine.submit(one("u", "r")).value().booking_id;
  auto b = await_status(engine, id, BookingStatus::rejected);  // the timer fires at 30 ms
  CHECK(b.reason == RejectReason::handler_timeout);
  CHECK(eventually([&] { return *engine.availability("r") == 1; }));  // freed after the store shows it
  release.count_down();  // the handler now approves, too late: ignored
  REQUIRE(eventually([&] { return engine.stats().in_flight == 0; }));
  CHECK(engine.get(id)->status == BookingStatus::rejected);
}

TEST_CASE("cancel: confirmed -> cancelled releases capacity; other transitions are errors") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("r", 1));
  auto id = engine.submit(one("u", "r")).value().booking_id;
  await_status(engine, id, BookingStatus::confirmed);
  CHECK(*engine.availability("r") == 0);
  auto c = engine.cancel(id);
  REQUIRE(c);
  CHECK(c->status == BookingStatus::cancelled);
  CHECK(c->version == 3);
  CHECK(*engine.availability("r") == 1);
  auto again = engine.cancel(id);
  CHECK(again.error().is(errc::invalid_transition));
  CHECK(again.error().message == "cannot cancel booking '" + id + "': it is 'cancelled', not 'confirmed'");
  CHECK(engine.cancel("nope").error().is(errc::not_found));
  CHECK(engine.confirm(id).error().is(errc::invalid_transition));
  Watcher w(bus, "booking/" + id);
  CHECK(w.wait_for(3) == StatusSeq{{1, "processing"}, {2, "confirmed"}, {3, "cancelled"}});
}

TEST_CASE("holds: held with expires_at, then confirm, release or expiry, exactly once") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("r", 3));
  auto held = [&](std::chrono::milliseconds ttl) {
    auto r = one("u", "r");
    r.hold_for = ttl;
    auto id = engine.submit(r).value().booking_id;
    auto b = await_status(engine, id, BookingStatus::held);
    REQUIRE(b.status == BookingStatus::held);
    REQUIRE(b.expires_at.has_value());
    CHECK(*b.expires_at > b.created_at);
    return id;
  };
  auto a = held(10min), b = held(10min);
  CHECK(*engine.availability("r") == 1);
  REQUIRE(eventually([&] {
    auto e = bus->last("booking/" + a);
    return e && e->data().at("status") == "held";
  }));
  CHECK(bus->last("booking/" + a)->data().as_object().contains("expires_at"));

  CHECK(engine.confirm(a)->status == BookingStatus::confirmed);
  auto twice = engine.release(a);
  CHECK(twice.error().is(errc::invalid_transition));
  CHECK(twice.error().message == "cannot release booking '" + a + "': its hold already reached 'confirmed'");
  CHECK(engine.release(b)->status == BookingStatus::released);
  CHECK(engine.confirm(b).error().message ==
        "cannot confirm booking '" + b + "': its hold already reached 'released'");
  CHECK(*engine.availability("r") == 2);

  auto c = held(30ms);
  CHECK(await_status(engine, c, BookingStatus::expired).status == BookingStatus::expired);
  CHECK(eventually([&] { return *engine.availability("r") == 2; }));  // expire(): store, then memory
  CHECK(engine.confirm(c).error().message ==
        "cannot confirm booking '" + c + "': its hold already reached 'expired'");
  // The expiry is counted once its transition returned, just after the store shows it.
  REQUIRE(eventually([&] { return engine.stats().expired == 1; }));
  auto st = engine.stats();
  CHECK(st.held == 3);
  CHECK(st.released == 1);
  CHECK(st.expired == 1);
}

TEST_CASE("idempotency keys: same request -> same booking; different request -> conflict") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("r", 10));
  auto first = engine.submit(one("u", "r", 1, "k1")).value();
  await_status(engine, first.booking_id, BookingStatus::confirmed);
  auto retry = engine.submit(one("u", "r", 1, "k1")).value();
  CHECK(retry.booking_id == first.booking_id);
  CHECK(retry.replayed);
  CHECK(retry.status == BookingStatus::confirmed);
  auto conflict = engine.submit(one("u", "r", 2, "k1"));
  CHECK(conflict.error().is(errc::idempotency_conflict));
  CHECK(conflict.error().message ==
        "idempotency key 'k1' was used for a different request (booking '" + first.booking_id + "')");
  auto other_user = engine.submit(one("v", "r", 1, "k1")).value();
  CHECK(other_user.booking_id != first.booking_id);
  await_status(engine, other_user.booking_id, BookingStatus::confirmed);
  CHECK(*engine.availability("r") == 8);
  CHECK(engine.stats().idempotent_replays == 1);
}

TEST_CASE("idempotency keys are forgotten after the window") {
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.idempotency_window = 0ms;
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 10));
  auto a = engine.submit(one("u", "r", 1, "k")).value();
  auto b = engine.submit(one("u", "r", 1, "k")).value();
  CHECK(a.booking_id != b.booking_id);
  CHECK_FALSE(b.replayed);
}

TEST_CASE("a full work queue makes submit fail fast with overloaded") {
  auto bus = std::make_shared<LocalBus>();
  std::latch entered{1}, release{1};
  EngineOptions o;
  o.workers = 1;
  o.max_queue = 2;
  o.handler = [&](const Booking&, Completion done) {
    entered.count_down();
    release.wait();
    done(Decision::approved());
  };
  auto engine = std::make_unique<BookingEngine>(bus, o);
  REQUIRE(engine->add_resource("r", 100));
  REQUIRE(engine->submit(one("u", "r")));  // picked by the worker, blocks in the handler
  entered.wait();
  REQUIRE(engine->submit(one("u", "r")));
  REQUIRE(engine->submit(one("u", "r")));
  auto full = engine->submit(one("u", "r"));
  CHECK(full.error().is(errc::overloaded));
  CHECK(full.error().message == "2 bookings are waiting to be decided; retry later");
  CHECK(engine->stats().overloaded == 1);
  CHECK(engine->stats().queue_depth == 2);
  release.count_down();
  REQUIRE(eventually([&] { return engine->stats().in_flight == 0; }));
  CHECK(engine->stats().confirmed == 3);
}

TEST_CASE("shutdown rejects queued bookings with reason shutdown and publishes it") {
  auto bus = std::make_shared<LocalBus>();
  std::latch entered{1}, release{1};
  EngineOptions o;
  o.workers = 1;
  o.handler = [&](const Booking&, Completion done) {
    entered.count_down();
    release.wait();
    done(Decision::approved());
  };
  auto engine = std::make_unique<BookingEngine>(bus, o);
  REQUIRE(engine->add_resource("r", 100));
  auto first = engine->submit(one("u", "r")).value().booking_id;
  entered.wait();
  auto queued = engine->submit(one("u", "r")).value().booking_id;
  std::thread stopper([&] { engine->shutdown(); });
  // Once submit() says shutting_down, shutdown() has begun: let the handler answer now.
  REQUIRE(eventually([&] {
    auto r = engine->submit(one("u", "r"));
    return !r && r.error().is(errc::shutting_down);
  }));
  release.count_down();
  stopper.join();
  engine.reset();
  CHECK(bus->last("booking/" + first)->data().at("status") == "confirmed");
  auto q = bus->last("booking/" + queued)->data().as_object();
  CHECK(q.at("status") == "rejected");
  CHECK(q.at("reason") == "shutdown");
}

namespace {
// A store that records what was committed and can be told to fail.
class RecordingStore final : public BookingStore {
 public:
  std::atomic<bool> fail{false};
  result<void> commit(const StateChange& change) override {
    if (fail.load()) return Error(errc::store_failed, "disk full");
    std::lock_guard lock(mutex_);
    versions_[change.booking.id] = change.booking.version;
    REQUIRE(change.events.size() == 2);
    // user/ first, then booking/ numbered by the version (see docs/architecture.md, "Published
    // means relayed").
    CHECK(change.events[0].topic == "user/" + change.booking.user);
    CHECK(change.events[0].seq == 0);
    CHECK(change.events[1].topic == "booking/" + change.booking.id);
    CHECK(change.events[1].seq == change.booking.version);
    return inner_.commit(change);
  }
  result<std::optional<Booking>> load(std::string_view id) const override { return inner_.load(id); }
  result<void> put_resource(std::string_view id, std::uint32_t capacity) override {
    return inner_.put_resource(id, capacity);
  }
  result<RecoveredState> recover(wall_clock::time_point since) override { return inner_.recover(since); }
  std::uint64_t version(const std::string& id) {
    std::lock_guard lock(mutex_);
    return versions_[id];
  }

 private:
  MemoryStore inner_;
  std::mutex mutex_;
  std::map<std::string, std::uint64_t> versions_;
};
}  // namespace

TEST_CASE("every change is stored before it is published; a failing store means no ACK") {
  auto bus = std::make_shared<LocalBus>();
  auto store = std::make_shared<RecordingStore>();
  EngineOptions o;
  o.store = store;
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 5));
  std::atomic<int> checked{0}, unstored{0};
  SubscribeOptions so;
  so.executor = inline_executor();  // runs inside publish: sees the store at that instant
  auto sub = bus->subscribe(
                    "booking/*",
                    [&](const Delivery& d) {
                      const auto id = std::string(d.event->data().at("booking_id").as_string());
                      const auto version =
                          static_cast<std::uint64_t>(d.event->data().at("version").as_int64());
                      if (store->version(id) < version) ++unstored;
                      ++checked;
                    },
                    so)
                 .value();
  for (int i = 0; i < 20; ++i) REQUIRE(engine.submit(one("u", "r")));
  REQUIRE(eventually([&] { return engine.stats().in_flight == 0; }));
  CHECK(checked.load() == 40);
  CHECK(unstored.load() == 0);

  store->fail = true;
  auto r = engine.submit(one("u", "r"));
  CHECK(r.error().is(errc::store_failed));
  CHECK(r.error().message == "disk full");
  CHECK(engine.stats().store_errors == 1);
  CHECK(checked.load() == 40);
}

TEST_CASE("capacity cannot drop below what is reserved or confirmed") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("r", 3));
  auto id = engine.submit(one("u", "r", 2)).value().booking_id;
  await_status(engine, id, BookingStatus::confirmed);
  auto r = engine.set_capacity("r", 1);
  CHECK(r.error().is(errc::capacity_in_use));
  CHECK(r.error().message == "'r' has 2 units reserved or confirmed; capacity cannot drop to 1");
  REQUIRE(engine.set_capacity("r", 2));
  CHECK(*engine.availability("r") == 0);
}

TEST_CASE("stats count outcomes and measure ACK and decision latency") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("r", 2));
  for (int i = 0; i < 3; ++i) REQUIRE(engine.submit(one("u", "r")));
  REQUIRE(eventually([&] { return engine.stats().in_flight == 0; }));
  auto s = engine.stats();
  CHECK(s.accepted == 3);
  CHECK(s.confirmed == 2);
  CHECK(s.rejected == 1);
  CHECK(s.ack_latency.count == 3);
  CHECK(s.decision_latency.count == 3);
  CHECK(s.decision_latency.max_ns >= s.decision_latency.p50_ns);
  CHECK(s.ack_latency.p50_ns > 0);
}

TEST_CASE("booking ids are unique, URL-safe and ordered by time") {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus);
  REQUIRE(engine.add_resource("r", 1000000));
  std::set<std::string> ids;
  std::string prev;
  for (int i = 0; i < 1000; ++i) {
    auto id = engine.submit(one("u", "r")).value().booking_id;
    CHECK(id.find_first_not_of("0123456789ABCDEFGHJKMNPQRSTVWXYZ") == std::string::npos);
    CHECK(id.substr(0, 9) >= prev.substr(0, std::min<std::size_t>(9, prev.size())));  // time prefix
    prev = id;
    ids.insert(id);
  }
  CHECK(ids.size() == 1000);
}

TEST_CASE("metadata larger than max_metadata_bytes is refused, at the limit it is taken") {
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.max_metadata_bytes = 64;
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 10));
  auto r = one("u", "r");
  r.metadata["note"] = std::string(64 - 11, 'x');  // {"note":"..."} is 11 bytes around the text
  REQUIRE(boost::json::serialize(r.metadata).size() == 64);
  CHECK(engine.submit(r));
  r.metadata["note"] = std::string(64 - 10, 'x');
  auto refused = engine.submit(r);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().is(errc::bad_request));
  CHECK(refused.error().message == "metadata is 65 bytes as JSON; at most 64 are allowed");
  // The default is 4 KiB.
  CHECK(EngineOptions{}.max_metadata_bytes == 4096);
}

TEST_CASE("per-user quota of bookings in flight: refused beyond it, taken again once one is decided") {
  auto bus = std::make_shared<LocalBus>();
  std::mutex pending_mutex;
  std::vector<Completion> pending;
  EngineOptions o;
  o.max_in_flight_per_user = 2;
  o.handler = [&](const Booking&, Completion done) {
    std::lock_guard lock(pending_mutex);
    pending.push_back(done);
  };
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 10));
  REQUIRE(engine.submit(one("u", "r")));
  REQUIRE(engine.submit(one("u", "r")));
  auto refused = engine.submit(one("u", "r", 1, "k1"));
  REQUIRE_FALSE(refused);
  CHECK(refused.error().is(errc::quota_exceeded));
  CHECK(refused.error().message ==
        "user 'u' has 2 bookings being decided, the most allowed; retry once one is decided");
  CHECK(engine.submit(one("other", "r")));  // another user's quota is its own
  CHECK(engine.stats().quota_exceeded == 1);
  REQUIRE(eventually([&] {
    std::lock_guard lock(pending_mutex);
    return pending.size() == 3;
  }));
  {
    std::lock_guard lock(pending_mutex);
    pending[0](Decision::approved());
  }
  REQUIRE(eventually([&] { return engine.stats().confirmed == 1; }));
  // The refused key was not kept: the same request with it is a new booking now.
  auto again = engine.submit(one("u", "r", 1, "k1"));
  REQUIRE(again);
  CHECK_FALSE(again->replayed);
  std::lock_guard lock(pending_mutex);
  for (auto& done : pending) done(Decision::approved());
}

TEST_CASE(
    "per-user quota of held units: counts holds being decided and held, freed by confirm, release, expiry") {
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.max_held_units_per_user = 5;
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 100));
  auto hold = [&](std::uint32_t n, std::chrono::milliseconds ttl = 10min) {
    auto r = one("u", "r", n);
    r.hold_for = ttl;
    return engine.submit(r);
  };
  auto a = hold(3).value().booking_id;
  auto b = hold(2).value().booking_id;
  auto refused = hold(1);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().is(errc::quota_exceeded));
  CHECK(refused.error().message == "user 'u' holds 5 units; 1 more would pass the 5 allowed");
  CHECK(engine.submit(one("u", "r", 50)));  // no hold: not counted
  // A hold that could never be granted is a bad request, not a quota to wait for.
  auto never = hold(6);
  REQUIRE_FALSE(never);
  CHECK(never.error().is(errc::bad_request));
  CHECK(never.error().message == "a hold of 6 units can never be granted: a user may hold at most 5");
  REQUIRE(await_published(bus, a, "held"));
  REQUIRE(await_published(bus, b, "held"));
  REQUIRE(engine.confirm(a));  // the units come back when confirm() returns
  auto c = hold(3);            // 2 held + 3
  REQUIRE(c);
  CHECK_FALSE(hold(1));
  REQUIRE(await_published(bus, c->booking_id, "held"));
  REQUIRE(engine.release(b));
  auto d = hold(2, 500ms);  // 3 held + 2, expiring soon
  REQUIRE(d);
  CHECK_FALSE(hold(1));
  REQUIRE(await_published(bus, d->booking_id, "expired"));  // published after the units came back
  CHECK(hold(2));
  CHECK_FALSE(hold(1));  // 3 + 2 held: full
  CHECK(engine.stats().quota_exceeded == 4);
}

TEST_CASE("a rejected hold gives its units back to the quota") {
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.max_held_units_per_user = 3;
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 3));
  REQUIRE(engine.add_resource("s", 10));
  REQUIRE(engine.submit(one("other", "r", 3)));  // takes all of r
  REQUIRE(eventually([&] { return engine.availability("r").value() == 0; }));
  auto r = one("u", "r", 3);
  r.hold_for = 10min;
  auto ack = engine.submit(r).value();
  REQUIRE(await_published(bus, ack.booking_id, "rejected"));
  auto s = one("u", "s", 3);
  s.hold_for = 10min;
  CHECK(engine.submit(s));
}

TEST_CASE("MemoryStore forgets finished bookings beyond max_finished, oldest first; live ones stay") {
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.store = std::make_shared<MemoryStore>(MemoryStoreOptions{1h, 2});
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 1));
  auto live = engine.submit(one("u", "r")).value().booking_id;
  REQUIRE(eventually([&] { return engine.get(live)->status == BookingStatus::confirmed; }));
  std::vector<std::string> rejected;
  for (int i = 0; i < 3; ++i) {
    auto id = engine.submit(one("u", "r", 1, "k" + std::to_string(i))).value().booking_id;
    REQUIRE(eventually([&] {
      auto b = engine.get(id);
      return b && b->status == BookingStatus::rejected;
    }));
    rejected.push_back(id);
  }
  // The commit that stores rejected[2] forgets rejected[0] just after the row becomes visible.
  CHECK(eventually([&] { return !engine.get(rejected[0]).has_value(); }));
  CHECK(engine.get(rejected[0]).error().is(errc::not_found));
  CHECK(engine.get(rejected[1]));
  CHECK(engine.get(rejected[2]));
  CHECK(engine.get(live)->status == BookingStatus::confirmed);  // never forgotten while live
  // A retry of the forgotten booking's key is told so; it never makes a second booking.
  auto retry = engine.submit(one("u", "r", 1, "k0"));
  REQUIRE_FALSE(retry);
  CHECK(retry.error().is(errc::not_found));
  CHECK(retry.error().message.find("no longer kept") != std::string::npos);
  CHECK(engine.stats().accepted == 4);
  // Once cancelled, the live one is finished too, and it is the newest finished.
  REQUIRE(engine.cancel(live));
  CHECK(engine.get(rejected[1]).error().is(errc::not_found));
  CHECK(engine.get(live)->status == BookingStatus::cancelled);
}

TEST_CASE("MemoryStore forgets finished bookings after finished_retention") {
  auto store = std::make_shared<MemoryStore>(MemoryStoreOptions{50ms, 1000});
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o;
  o.store = store;
  BookingEngine engine(bus, o);
  REQUIRE(engine.add_resource("r", 1));
  auto first = engine.submit(one("u", "r", 1)).value().booking_id;
  auto second = engine.submit(one("u", "r", 1)).value().booking_id;  // sold out: rejected
  REQUIRE(eventually([&] {
    auto b = engine.get(second);
    return b && b->status == BookingStatus::rejected;
  }));
  // Forgotten by a later commit once 50 ms have passed.
  REQUIRE(eventually([&] {
    (void)engine.submit(one("u", "r", 1));
    return !engine.get(second).has_value();
  }));
  CHECK(engine.get(first)->status == BookingStatus::confirmed);
}
