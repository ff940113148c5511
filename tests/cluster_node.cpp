// One engine process of postgres_cluster_test: an engine on a shared PostgreSQL database and a
// shared Redis bus, with several threads running random operations against it.
//
//   pushbook-test-cluster-node <conninfo> <redis-address> <seed> <threads> <ops-per-thread>
//
// Adds resources r0..r3 (if missing), then each thread runs <ops-per-thread> operations chosen
// by its own generator (seeded from <seed> and the thread's number): book one line or two (some
// as holds of 5-30 ms that expire unless confirmed or released), confirm or release a hold,
// cancel, change a resource's capacity, read a booking. Handlers approve or decline, some at
// once and some from another thread. At the end it waits until none of its bookings is
// processing or held, prints "done <accepted> <confirmed> <rejected> <expired>" and exits 0; an
// error that should not happen is printed ("problem: ...") and makes it exit 1.
#include <pushbook/booking_engine.hpp>
#include <pushbook/postgres_store.hpp>
#include <pushbook/redis_bus.hpp>

#include "random_booking.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace pushbook;
using namespace std::chrono_literals;

namespace {

const std::vector<std::string> resource_ids = {"r0", "r1", "r2", "r3"};

std::mutex out_mutex;
std::atomic<int> problems{0};
void problem(const std::string& what) {
  std::lock_guard lock(out_mutex);
  if (problems++ < 20) std::cout << "problem: " << what << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: pushbook-test-cluster-node <conninfo> <redis-address> <seed> <threads> "
                 "<ops-per-thread>\n";
    return 2;
  }
  const std::string conninfo = argv[1];
  const std::uint64_t seed = std::stoull(argv[3]);
  const int thread_count = std::stoi(argv[4]);
  const int ops = std::stoi(argv[5]);

  PostgresOptions po;
  po.statement_timeout = 10s;
  auto store = PostgresStore::open(conninfo, po);
  if (!store) {
    std::cerr << store.error().message << "\n";
    return 1;
  }
  RedisBusOptions ro;
  ro.address = argv[2];
  ro.key_prefix = "pb:";
  auto bus = std::make_shared<RedisBus>(ro);
  if (!bus->wait_connected(10s)) {
    std::cerr << "Redis at " << ro.address << " is unreachable\n";
    return 1;
  }

  ThreadPool deciders(2);
  EngineOptions o;
  o.store = *store;
  o.workers = 4;
  o.handler = [&deciders](const Booking& b, Completion done) {
    const auto h = std::hash<std::string>{}(b.id);
    const auto decision = h % 10 == 0 ? Decision::declined("declined by the test") : Decision::approved();
    if (h % 2 == 0)
      done(decision);
    else
      deciders.post([done, decision] { done(decision); });
  };
  BookingEngine engine(bus, o);
  // Another node may have created them already, and changed a capacity and filled it.
  for (std::size_t i = 0; i < resource_ids.size(); ++i)
    if (auto r = engine.add_resource(resource_ids[i], static_cast<std::uint32_t>(20 + 10 * i));
        !r && !r.error().is(errc::already_exists) && !r.error().is(errc::capacity_in_use))
      problem("add_resource: " + r.error().message);

  std::mutex acked_mutex;
  std::vector<std::string> acked;
  std::vector<std::thread> threads;
  for (int t = 0; t < thread_count; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed * 1000003 + static_cast<std::uint64_t>(t));
      auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<std::uint64_t>(n)); };
      const std::string user = "s" + std::to_string(seed) + "-t" + std::to_string(t);
      std::vector<std::string> mine;  // ACKed and not known to be finished
      // One of its bookings that still holds units (or is being decided), when it finds one in a
      // few tries: finished ones are dropped from `mine` as they are met. Cancels and
      // confirmations then hit, units are freed and taken again, and capacity stays contested.
      auto live_one = [&]() -> std::string {
        for (int tries = 0; tries < 4 && !mine.empty(); ++tries) {
          const auto i = static_cast<std::size_t>(pick(static_cast<int>(mine.size())));
          auto b = engine.get(mine[i]);
          if (!b) {
            problem("get " + mine[i] + ": " + b.error().message);
            return mine[i];
          }
          if (b->status == BookingStatus::confirmed || b->status == BookingStatus::held ||
              b->status == BookingStatus::processing)
            return mine[i];
          mine[i] = std::move(mine.back());
          mine.pop_back();
        }
        return mine.empty() ? std::string("none") : mine.back();
      };
      for (int op = 0; op < ops; ++op) {
        const int dice = pick(100);
        if (dice < 50 || mine.empty()) {  // book: one line, sometimes two, sometimes a hold
          auto res = engine.submit(test::random_booking(pick, user, resource_ids, 5));
          if (res) {
            mine.push_back(res->booking_id);
            std::lock_guard lock(acked_mutex);
            acked.push_back(res->booking_id);
          } else if (!res.error().is(errc::exceeds_capacity) && !res.error().is(errc::overloaded) &&
                     !res.error().is(errc::quota_exceeded)) {
            problem("submit: " + res.error().message);
          }
        } else if (dice < 70) {  // cancel
          auto r = engine.cancel(live_one());
          if (!r && !r.error().is(errc::invalid_transition) && !r.error().is(errc::not_found))
            problem("cancel: " + r.error().message);
        } else if (dice < 85) {  // resolve a hold
          const auto id = live_one();
          auto r = pick(2) ? engine.confirm(id) : engine.release(id);
          if (!r && !r.error().is(errc::invalid_transition) && !r.error().is(errc::not_found))
            problem("confirm/release: " + r.error().message);
        } else if (dice < 90) {  // capacity change
          auto r = engine.set_capacity(resource_ids[static_cast<std::size_t>(pick(4))],
                                       static_cast<std::uint32_t>(10 + pick(50)));
          if (!r && !r.error().is(errc::capacity_in_use)) problem("set_capacity: " + r.error().message);
        } else {
          live_one();  // reads a booking or a few
        }
      }
    });
  }
  for (auto& th : threads) th.join();

  // Every booking of this process ends decided (holds expire within 30 ms).
  const auto deadline = std::chrono::steady_clock::now() + 120s;
  for (const auto& id : acked) {
    for (;;) {
      auto b = engine.get(id);
      if (b && b->status != BookingStatus::processing && b->status != BookingStatus::held) break;
      if (std::chrono::steady_clock::now() > deadline) {
        problem("booking " + id + " is still " + (b ? std::string(to_string(b->status)) : b.error().message));
        break;
      }
      std::this_thread::sleep_for(5ms);
    }
  }
  // Decided and published: shutdown() drops what the bus has not taken yet (a retry after a
  // Redis stall), which the test would count as lost.
  while ((engine.stats().in_flight > 0 || engine.stats().publish_backlog > 0) &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(5ms);
  engine.shutdown();
  const auto st = engine.stats();
  {
    std::lock_guard lock(out_mutex);
    std::cout << "done " << acked.size() << " " << st.confirmed << " " << st.rejected << " " << st.expired
              << " dropped " << st.publish_dropped << std::endl;
  }
  return problems.load() == 0 && st.publish_dropped == 0 ? 0 : 1;
}
