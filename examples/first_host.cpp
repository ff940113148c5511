// first_host: the host of docs/getting-started-cpp.md ("A first host"), complete: an engine
// with an asynchronous business step, a booking, and its decision delivered on an Asio strand.
#include <pushbook/asio.hpp>
#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <chrono>
#include <cstdio>
#include <future>
#include <memory>
#include <string>
#include <thread>

namespace asio = boost::asio;

int main() {
  // The host's own io_context and thread: the payment call runs here, and so do the callbacks
  // of the subscription below (on a strand: one at a time).
  asio::io_context io;
  auto work = asio::make_work_guard(io);
  std::thread io_thread([&io] { io.run(); });

  auto bus = std::make_shared<pushbook::LocalBus>();

  pushbook::EngineOptions options;
  options.workers = 4;
  options.handler_timeout = std::chrono::seconds(5);
  // The business step, e.g. a payment call: here a timer standing in for the provider. Answer now
  // or later, from any thread, through `done`.
  options.handler = [&io](const pushbook::Booking& booking, pushbook::Completion done) {
    auto timer = std::make_shared<asio::steady_timer>(io, std::chrono::milliseconds(20));
    timer->async_wait([timer, done,
                       card = booking.metadata.if_contains("card")
                                  ? std::string(booking.metadata.at("card").as_string())
                                  : std::string("ok")](boost::system::error_code) {
      done(card == "declined" ? pushbook::Decision::declined("card declined")
                              : pushbook::Decision::approved());
    });
  };
  pushbook::BookingEngine engine(bus, options);
  engine.add_resource("room-101", 5).value();

  pushbook::BookingRequest request;
  request.user = "alice";
  request.lines = {{"room-101", 1}};
  request.idempotency_key = "order-7781";  // a retry returns the same booking
  auto ack = engine.submit(request);
  if (!ack) {
    // ack.error().code is a pushbook::errc (bad_request, not_found, exceeds_capacity,
    // idempotency_conflict, overloaded, ...), ack.error().message says what was wrong.
    std::fprintf(stderr, "refused: %s\n", ack.error().message.c_str());
    return 1;
  }
  std::printf("ACK: %s %s\n", ack->booking_id.c_str(), pushbook::to_string(ack->status));

  // Watch the decision on the bus. Subscribing late is fine: without since_seq the subscription
  // starts with the topic's current state (a snapshot), then every later change.
  std::promise<std::string> decided;
  bool told = false;  // strand only
  pushbook::SubscribeOptions so;
  so.executor = pushbook::make_executor(asio::make_strand(io));  // callbacks on an Asio strand
  auto sub = bus->subscribe(
                    "booking/" + ack->booking_id,
                    [&decided, &told](const pushbook::Delivery& d) {
                      switch (d.kind) {
                        case pushbook::Delivery::Kind::event:
                        case pushbook::Delivery::Kind::snapshot: {
                          // d.event->seq(), d.event->data() (the booking's JSON), and
                          // d.event->wire(): a std::shared_ptr<const std::string>, serialized once
                          const auto status = std::string(d.event->data().at("status").as_string());
                          std::printf("seq %llu: %s\n", static_cast<unsigned long long>(d.event->seq()),
                                      status.c_str());
                          if (status != "processing" && !told) {
                            told = true;
                            decided.set_value(status);
                          }
                          break;
                        }
                        case pushbook::Delivery::Kind::gap:    // fell behind: resubscribe with since_seq
                        case pushbook::Delivery::Kind::ended:  // d.reason says why
                          break;
                      }
                    },
                    so)
                 .value();
  const auto status = decided.get_future().get();  // the decision, pushed: no polling

  sub.cancel();
  engine.shutdown();
  work.reset();
  io_thread.join();
  return status == "confirmed" ? 0 : 1;
}
