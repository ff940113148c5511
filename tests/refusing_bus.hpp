// Test helper: a bus that refuses every publish (bus_unavailable), as a bus that is down; its
// subscriptions work (a LocalBus inside). An engine over it commits and never gets its events
// out, as a process that dies between its commits and its publishes.
#pragma once

#include <pushbook/event_bus.hpp>

namespace pushbook::test {

struct RefusingBus final : EventBus {
  LocalBus inner;
  using EventBus::publish;
  result<EventPtr> publish(std::string_view, std::shared_ptr<const boost::json::value>,
                           const PublishOptions&) override {
    return Error(errc::bus_unavailable, "this bus refuses every publish");
  }
  result<Subscription> subscribe(std::string_view topic, DeliveryCallback cb, SubscribeOptions o) override {
    return inner.subscribe(topic, std::move(cb), std::move(o));
  }
  EventPtr last(std::string_view topic) const override { return inner.last(topic); }
  std::vector<EventPtr> history(std::string_view topic, std::uint64_t since_seq) const override {
    return inner.history(topic, since_seq);
  }
};

}  // namespace pushbook::test
