// quickstart: the polling-free booking flow in one process.
//
// Submits bookings for a small resource, gets an immediate "processing" ACK for each, and prints
// each decision the moment the engine pushes it on the bus, with the time from submit to ACK
// and from submit to the pushed decision. A simulated business step (a "payment call" of
// --decision-delay-ms) runs on a worker for each booking.
//
//   pushbook-quickstart [--bookings N] [--capacity C] [--decision-delay-ms D]
#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>

#include <fmt/format.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>

namespace {

struct Options {
  int bookings = 8;
  unsigned capacity = 5;
  int decision_delay_ms = 20;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto next = [&]() -> int {
      if (i + 1 >= argc) {
        fmt::print(stderr, "{} needs a value\n", a);
        std::exit(2);
      }
      return std::atoi(argv[++i]);
    };
    if (a == "--bookings")
      o.bookings = next();
    else if (a == "--capacity")
      o.capacity = static_cast<unsigned>(next());
    else if (a == "--decision-delay-ms")
      o.decision_delay_ms = next();
    else {
      fmt::print(stderr,
                 "usage: pushbook-quickstart [--bookings N] [--capacity C] [--decision-delay-ms D]\n");
      std::exit(a == "--help" ? 0 : 2);
    }
  }
  return o;
}

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
  const auto opt = parse(argc, argv);
  using namespace pushbook;

  auto bus = std::make_shared<LocalBus>();
  // The business step: a payment call that answers after a delay, off the worker thread.
  auto payments = std::make_shared<ThreadPool>(8);  // concurrent remote calls
  EngineOptions eo;
  eo.workers = 2;
  eo.handler = [payments, delay = std::chrono::milliseconds(opt.decision_delay_ms)](const Booking&,
                                                                                    Completion done) {
    payments->post([done, delay] {
      std::this_thread::sleep_for(delay);  // stands in for the remote call
      done(Decision::approved());
    });
  };
  BookingEngine engine(bus, eo);
  engine.add_resource("room-101", opt.capacity).value();

  std::mutex mutex;
  std::condition_variable all_decided;
  std::map<std::string, std::chrono::steady_clock::time_point> submitted_at;
  int decided = 0;

  // One subscription per booking, made right after the ACK, as a client would. Late is fine:
  // the subscription starts with the booking's current state.
  std::vector<Subscription> subs;
  fmt::print("{:<28} {:>8} {:>10}   {:<10} {:>14}\n", "booking", "user", "ack (us)", "decision",
             "pushed (ms)");
  for (int i = 0; i < opt.bookings; ++i) {
    BookingRequest req;
    req.user = fmt::format("guest-{}", i + 1);
    req.lines.push_back({"room-101", 1});
    const auto t0 = std::chrono::steady_clock::now();
    auto ack = engine.submit(req);
    const auto ack_us = ms_since(t0) * 1000;
    if (!ack) {
      fmt::print("{:<28} {:>8} refused: {}\n", "-", req.user, ack.error().message);
      continue;
    }
    {
      std::lock_guard lock(mutex);
      submitted_at[ack->booking_id] = t0;
    }
    fmt::print("{:<28} {:>8} {:>10.1f}   {:<10}\n", ack->booking_id, req.user, ack_us,
               to_string(ack->status));
    auto sub = bus->subscribe("booking/" + ack->booking_id, [&, user = req.user](const Delivery& d) {
      if (!d.event) return;
      const auto& data = d.event->data().as_object();
      const std::string status(data.at("status").as_string());
      if (status == "processing") return;
      std::lock_guard lock(mutex);
      const auto id = std::string(data.at("booking_id").as_string());
      std::string why;
      if (auto r = data.if_contains("reason")) why = fmt::format(" ({})", std::string(r->as_string()));
      fmt::print("{:<28} {:>8} {:>10}   {:<10} {:>14.2f}{}\n", id, user, "", status,
                 ms_since(submitted_at[id]), why);
      if (++decided == opt.bookings) all_decided.notify_all();
    });
    subs.push_back(std::move(sub.value()));
  }

  std::unique_lock lock(mutex);
  if (!all_decided.wait_for(lock, std::chrono::seconds(30), [&] { return decided == opt.bookings; })) {
    fmt::print(stderr, "timed out waiting for decisions\n");
    return 1;
  }
  lock.unlock();
  subs.clear();
  const auto s = engine.stats();
  fmt::print("\n{} bookings: {} confirmed, {} rejected; room-101 has {} of {} units free.\n", s.accepted,
             s.confirmed, s.rejected, engine.availability("room-101").value(), opt.capacity);
  fmt::print("ACK p50 {:.1f} us, decision p50 {:.2f} ms (business step {} ms): pushed, never polled.\n",
             static_cast<double>(s.ack_latency.p50_ns) / 1e3,
             static_cast<double>(s.decision_latency.p50_ns) / 1e6, opt.decision_delay_ms);
  return 0;
}
