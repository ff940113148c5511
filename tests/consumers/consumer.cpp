// A host application's smallest use of pushbook: submit one booking and wait for its pushed
// decision. Built by scripts/test.sh against an installed pushbook and via add_subdirectory.
#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>

#include <condition_variable>
#include <cstdio>
#include <mutex>

int main() {
  auto bus = std::make_shared<pushbook::LocalBus>();
  pushbook::BookingEngine engine(bus);
  engine.add_resource("room-1", 1).value();
  pushbook::BookingRequest req;
  req.user = "alice";
  req.lines.push_back({"room-1", 1});
  auto ack = engine.submit(req).value();

  std::mutex m;
  std::condition_variable cv;
  std::string status;
  auto sub = bus->subscribe("booking/" + ack.booking_id,
                            [&](const pushbook::Delivery& d) {
                              std::lock_guard lock(m);
                              status = std::string(d.event->data().at("status").as_string());
                              cv.notify_all();
                            })
                 .value();
  std::unique_lock lock(m);
  if (!cv.wait_for(lock, std::chrono::seconds(10), [&] { return status == "confirmed"; })) {
    std::fprintf(stderr, "consumer: no confirmation (status '%s')\n", status.c_str());
    return 1;
  }
  std::printf("consumer: booking %s confirmed\n", ack.booking_id.c_str());
  return 0;
}
