// A randomised stress test of the engine and the bus together: 8 threads, 200,000 mixed
// operations (submit, idempotent retry, conflicting retry, hold, confirm, release, cancel,
// capacity change, get) on four small resources. Checks that nothing is ever overbooked, every
// ACKed booking reaches a final state, and a wildcard subscriber saw each booking's events in
// order with no gap and no duplicate; then 100,000 more with every thread booking as one user.
// Set PUSHBOOK_SEED to replay a run; the seed is printed.
#include <pushbook/booking_engine.hpp>

#include "random_booking.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

using namespace pushbook;
using namespace std::chrono_literals;

namespace {

constexpr int thread_count = 8;
constexpr int ops_per_thread = 25'000;
const std::vector<std::string> resource_ids = {"r0", "r1", "r2", "r3"};

std::uint64_t seed_from_env() {
  if (const char* s = std::getenv("PUSHBOOK_SEED")) return std::strtoull(s, nullptr, 10);
  return std::random_device{}();
}

bool legal(const std::string& from, const std::string& to) {
  static const std::multimap<std::string, std::string> allowed = {
      {"", "processing"},     {"processing", "confirmed"}, {"processing", "rejected"},
      {"processing", "held"}, {"held", "confirmed"},       {"held", "released"},
      {"held", "expired"},    {"confirmed", "cancelled"}};
  auto [a, b] = allowed.equal_range(from);
  for (auto it = a; it != b; ++it)
    if (it->second == to) return true;
  return false;
}

// Watches booking/* and checks per-topic order and legal transitions as events arrive.
struct BookingWatcher {
  std::mutex mutex;
  std::unordered_map<std::string, std::pair<std::uint64_t, std::string>> last;  // topic -> seq, status
  std::vector<std::string> problems;
  std::atomic<std::uint64_t> seen{0};

  void on(const Delivery& d) {
    std::lock_guard lock(mutex);
    if (d.kind != Delivery::Kind::event) {
      problems.push_back("unexpected delivery kind " + std::to_string(static_cast<int>(d.kind)));
      return;
    }
    auto& [seq, status] = last[d.event->topic()];
    const std::string to(d.event->data().at("status").as_string());
    if (d.event->seq() != seq + 1)
      problems.push_back(d.event->topic() + ": seq " + std::to_string(d.event->seq()) + " after " +
                         std::to_string(seq));
    if (!legal(status, to)) problems.push_back(d.event->topic() + ": " + status + " -> " + to);
    seq = d.event->seq();
    status = to;
    ++seen;
  }
  std::string status_of(const std::string& id) {
    std::lock_guard lock(mutex);
    auto it = last.find("booking/" + id);
    return it == last.end() ? "" : it->second.second;
  }
};

}  // namespace

namespace {

// The whole run: `ops` operations on each of 8 threads; with `one_user`, every thread books as the
// same user, so that each change's events contend for one user/<id> topic. Without `handler` the
// engine has no business step, so (decide_on_caller) the submitting threads decide their own
// bookings, racing the workers that take what others queued.
void run(int ops, bool one_user, bool handler = true) {
  const auto seed = seed_from_env();
  std::printf("concurrency_test: seed %llu (PUSHBOOK_SEED=%llu to replay)%s%s\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed),
              one_user ? ", one user" : "", handler ? "" : ", no business step");
  std::fflush(stdout);
  INFO("seed = ", seed);

  LocalBusOptions bo;
  bo.delivery_threads = 2;
  auto bus = std::make_shared<LocalBus>(bo);
  auto async_pool = std::make_shared<ThreadPool>(2);
  EngineOptions eo;
  eo.workers = 4;
  // The check at the end reads every booking acked: keep every finished one.
  eo.store = std::make_shared<MemoryStore>(MemoryStoreOptions{std::chrono::hours(1), 10'000'000});
  if (handler)
    eo.handler = [async_pool](const Booking& b, Completion done) {
      const auto h = std::hash<std::string>{}(b.id);
      const auto decision = h % 10 == 0 ? Decision::declined("declined by test") : Decision::approved();
      if (h % 2 == 0)
        done(decision);
      else
        async_pool->post([done, decision] { done(decision); });
    };
  BookingEngine engine(bus, eo);
  for (std::size_t i = 0; i < resource_ids.size(); ++i)
    REQUIRE(engine.add_resource(resource_ids[i], static_cast<std::uint32_t>(20 + 10 * i)));

  BookingWatcher watcher;
  SubscribeOptions wo;
  wo.max_queue = 1u << 24;
  wo.overflow = OverflowPolicy::end_subscription;
  auto watch = bus->subscribe(
                      "booking/*", [&](const Delivery& d) { watcher.on(d); }, wo)
                   .value();

  std::atomic<int> overbooked{0};
  auto monitor =
      bus->subscribe(
             "resource/*",
             [&](const Delivery& d) {
               const auto& o = d.event->data().as_object();
               if (o.at("reserved").as_int64() + o.at("confirmed").as_int64() > o.at("capacity").as_int64())
                 ++overbooked;
             },
             wo)
          .value();

  std::mutex acked_mutex;
  std::vector<std::string> acked;
  std::atomic<int> unexpected{0};
  std::mutex unexpected_mutex;
  std::string first_unexpected;
  auto complain = [&](const std::string& what) {
    std::lock_guard lock(unexpected_mutex);
    if (unexpected++ == 0) first_unexpected = what;
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < thread_count; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed + static_cast<std::uint64_t>(t) * 7919);
      auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<std::uint64_t>(n)); };
      const std::string user = one_user ? "u" : "u" + std::to_string(t);
      std::vector<std::string> mine;
      std::unordered_map<std::string, std::pair<BookingRequest, std::string>> keys;  // key -> request, id
      auto random_request = [&] { return test::random_booking(pick, user, resource_ids, 10); };
      for (int op = 0; op < ops; ++op) {
        const int dice = pick(100);
        if (dice < 50) {  // submit, sometimes with an idempotency key (new, retry or conflict)
          auto r = random_request();
          std::string key;
          bool expect_conflict = false;
          if (pick(5) == 0) {
            // Keys belong to a user: with one user, each thread keeps its own.
            key = (one_user ? "t" + std::to_string(t) + "-k" : "k") + std::to_string(pick(50));
            r.idempotency_key = key;
            auto it = keys.find(key);
            if (it != keys.end()) {
              if (pick(3) == 0) {
                r = it->second.first;
                r.metadata["attempt"] = op;  // the same request but for its metadata: a conflict
                expect_conflict = true;
              } else {
                r = it->second.first;
              }
            }
          }
          auto res = engine.submit(r);
          if (res) {
            if (expect_conflict) complain("conflicting retry was accepted");
            if (!key.empty()) {
              auto it = keys.find(key);
              if (it != keys.end() && it->second.second != res->booking_id)
                complain("retry got another booking id");
              if (it == keys.end()) keys.emplace(key, std::pair{r, res->booking_id});
            }
            if (!res->replayed) {
              mine.push_back(res->booking_id);
              std::lock_guard lock(acked_mutex);
              acked.push_back(res->booking_id);
            }
          } else if (res.error().is(errc::idempotency_conflict)) {
            if (!expect_conflict) complain("unexpected conflict: " + res.error().message);
          } else if (!res.error().is(errc::exceeds_capacity) && !res.error().is(errc::overloaded) &&
                     !res.error().is(errc::quota_exceeded)) {
            complain("submit failed: " + res.error().message);
          }
        } else if (dice < 70 && !mine.empty()) {  // cancel
          auto r = engine.cancel(mine[static_cast<std::size_t>(pick(static_cast<int>(mine.size())))]);
          if (!r && !r.error().is(errc::invalid_transition)) complain("cancel: " + r.error().message);
        } else if (dice < 80 && !mine.empty()) {  // resolve a hold
          const auto& id = mine[static_cast<std::size_t>(pick(static_cast<int>(mine.size())))];
          auto r = pick(2) ? engine.confirm(id) : engine.release(id);
          if (!r && !r.error().is(errc::invalid_transition)) complain("resolve: " + r.error().message);
        } else if (dice < 85) {  // capacity change
          auto r = engine.set_capacity(resource_ids[static_cast<std::size_t>(pick(4))],
                                       static_cast<std::uint32_t>(10 + pick(50)));
          if (!r && !r.error().is(errc::capacity_in_use)) complain("set_capacity: " + r.error().message);
        } else if (!mine.empty()) {
          if (!engine.get(mine[static_cast<std::size_t>(pick(static_cast<int>(mine.size())))]))
            complain("get failed");
        }
      }
    });
  }
  for (auto& th : threads) th.join();

  CHECK(unexpected.load() == 0);
  CHECK(first_unexpected == "");
  // Every ACKed booking is decided, and every hold resolves (they expire within 30 ms).
  REQUIRE(test::eventually(
      [&] {
        for (const auto& id : acked) {
          auto b = engine.get(id);
          if (!b || b->status == BookingStatus::processing || b->status == BookingStatus::held) return false;
        }
        return true;
      },
      60s));
  // The watcher saw each booking's final state.
  REQUIRE(test::eventually(
      [&] {
        for (const auto& id : acked)
          if (watcher.status_of(id) != to_string(engine.get(id)->status)) return false;
        return true;
      },
      60s));

  {
    std::lock_guard lock(watcher.mutex);
    CHECK(watcher.problems.empty());
    if (!watcher.problems.empty()) MESSAGE("first problem: ", watcher.problems.front());
  }
  CHECK(watch.active());
  CHECK(overbooked.load() == 0);

  // The resources' counts match the bookings that hold them.
  std::map<std::string, std::uint32_t> confirmed_units;
  for (const auto& id : acked) {
    auto b = engine.get(id).value();
    if (b.status == BookingStatus::confirmed)
      for (const auto& l : b.lines) confirmed_units[l.resource] += l.quantity;
  }
  for (const auto& r : engine.resources()) {
    CAPTURE(r.id);
    CHECK(r.reserved == 0);
    CHECK(r.confirmed == confirmed_units[r.id]);
    CHECK(r.confirmed <= r.capacity);
  }
  // in_flight drops after the decision is published (decide(): publish, then finish_in_flight).
  CHECK(test::eventually([&] { return engine.stats().in_flight == 0; }));
  auto st = engine.stats();
  CHECK(st.accepted == acked.size());
  CHECK(st.publish_dropped == 0);  // the bus refuses a version out of order: none was
  std::printf(
      "concurrency_test: %zu bookings accepted, %llu confirmed, %llu rejected, %llu held, "
      "%llu events checked\n",
      acked.size(), static_cast<unsigned long long>(st.confirmed),
      static_cast<unsigned long long>(st.rejected), static_cast<unsigned long long>(st.held),
      static_cast<unsigned long long>(watcher.seen.load()));
}

}  // namespace

TEST_CASE("randomised concurrent operations never overbook and lose no event") { run(ops_per_thread, false); }

// Regression: a change's events went topic by topic, and between leaving one topic's lane and
// joining the next a chain was in no lane, so the booking's next change could overtake it on
// booking/<id> (version 2 before version 1, which the bus then dropped as a duplicate). One user
// for all threads makes that window busy: this failed in about 4% of runs before the fix.
TEST_CASE("randomised concurrent operations of one user: each booking's events in version order") {
  run(ops_per_thread / 2, true);
}

// No business step: each booking is decided on the thread that submitted it when the queue is
// empty, or joins the queue behind others (arrival order); the reservation still happens under the
// resources lock taken before the queue lock is released, so nothing is overbooked.
TEST_CASE("randomised concurrent operations without a business step: decided on the submitting threads") {
  run(ops_per_thread / 2, false, false);
}
