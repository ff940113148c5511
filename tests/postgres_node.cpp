// One engine process on a PostgreSQL database, for postgres_store_test's takeover tests (a
// process they can kill -9 or stop while its handlers are deciding):
//
//   pushbook-test-postgres-node <conninfo> <bookings> <lease_ms> hang|unpublished
//
// Adds resource "r" (if missing), submits <bookings> bookings of one unit (users n0, n1, ...)
// and prints "acked <id>" for each.
// hang: its handler answers nothing until told: it prints "started <id> <attempt>" and keeps the
// completion. Once every handler has started it prints "ready". A line "decline" (or "approve")
// on stdin makes every handler decline ("declined by the first node") or approve; once none is in
// flight it prints "lost <claims_lost>".
// unpublished: no handler (every booking confirmed at once), and a bus that refuses every
// publish, so that every version stays in the outbox; "ready" once all are decided.
// It exits at the end of its input.
#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/postgres_store.hpp>

#include "refusing_bus.hpp"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace pushbook;

namespace {

std::mutex out_mutex;
void say(const std::string& line) {
  std::lock_guard lock(out_mutex);
  std::cout << line << std::endl;  // flushed: the test reads it at once
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 || (std::string(argv[4]) != "hang" && std::string(argv[4]) != "unpublished")) {
    std::cerr << "usage: pushbook-test-postgres-node <conninfo> <bookings> <lease_ms> hang|unpublished\n";
    return 2;
  }
  const bool hang = std::string(argv[4]) == "hang";
  const std::string conninfo = argv[1];
  const int count = std::stoi(argv[2]);
  PostgresOptions po;
  po.lease = std::chrono::milliseconds(std::stoi(argv[3]));
  po.statement_timeout = std::chrono::milliseconds(2000);
  auto store = PostgresStore::open(conninfo, po);
  if (!store) {
    std::cerr << store.error().message << "\n";
    return 1;
  }

  std::mutex mutex;
  std::condition_variable started_cv;
  std::vector<Completion> pending;
  EngineOptions o;
  o.store = *store;
  o.handler_timeout = std::chrono::minutes(5);
  if (hang)
    o.handler = [&](const Booking& b, Completion done) {
      say("started " + b.id + " " + std::to_string(b.attempt));
      std::lock_guard lock(mutex);
      pending.push_back(std::move(done));
      started_cv.notify_all();
    };
  EventBusPtr bus;
  if (hang)
    bus = std::make_shared<LocalBus>();
  else
    bus = std::make_shared<test::RefusingBus>();
  BookingEngine engine(bus, o);
  if (auto r = engine.add_resource("r", 1000000); !r && !r.error().is(errc::already_exists)) {
    std::cerr << r.error().message << "\n";
    return 1;
  }
  for (int i = 0; i < count; ++i) {
    BookingRequest request;
    request.user = "n" + std::to_string(i);
    request.lines = {{"r", 1}};
    auto ack = engine.submit(request);
    if (!ack) {
      std::cerr << ack.error().message << "\n";
      return 1;
    }
    say("acked " + ack->booking_id);
  }
  if (hang) {
    std::unique_lock lock(mutex);
    started_cv.wait(lock, [&] { return pending.size() == static_cast<std::size_t>(count); });
  } else {
    while (engine.stats().in_flight > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  say("ready");

  for (std::string line; std::getline(std::cin, line);) {
    if (line != "decline" && line != "approve") continue;
    std::vector<Completion> now;
    {
      std::lock_guard lock(mutex);
      now.swap(pending);
    }
    for (auto& done : now)
      done(line == "approve" ? Decision::approved() : Decision::declined("declined by the first node"));
    while (engine.stats().in_flight > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    say("lost " + std::to_string(engine.stats().claims_lost));
  }
  return 0;
}
