// One bus subscription per topic per gateway node, fanned out to the node's connections.
//
// Without it every connection that follows a topic holds a bus subscription of its own: 10,000
// clients of "resource/hall" are 10,000 subscriptions, each with its own queue and wake-up per
// event, and over RedisBus 10,000 catch-up reads when they reconnect. TopicHub subscribes to the
// bus once per topic (while the node has a follower of it) and hands each event to the
// followers; the event is serialized once (Event::wire() is shared) and goes straight into each
// connection's bounded send queue, which applies the slow-consumer policy.
//
// A follower joining a topic the hub already follows is served from the hub's own view of the
// topic, with the bus's resume rules (SubscribeOptions): no `since`: the last event as a
// snapshot, then live events; `since`: the events after it from the hub's recent events (the
// last `replay_events` of the topic, contiguous), then live. Where those do not reach back far
// enough, that one follower gets a bus subscription of its own (the bus's history may reach
// further), counted in TopicHubStats::private_subscriptions.
//
// Thread-safety: subscribe() and Subscription::cancel() from any thread; subscribe() never waits
// for the bus (EventBus::subscribe_async). Callbacks run on the thread that delivers the event
// (as with inline_executor(): with RedisBus the bus's I/O thread, also for the first deliveries
// of a topic the hub starts following), never two of one follower at once; they must not block,
// and must not call subscribe() (refused with bad_request).
// Cancelling from inside a callback is allowed.
#pragma once

#include <pushbook/event_bus.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

namespace pushbook::detail {

struct TopicHubStats {
  /// Topics the hub follows now: one bus subscription each.
  std::uint64_t topics = 0;
  /// Followers served from the hub now.
  std::uint64_t followers = 0;
  /// Followers with a bus subscription of their own now (their `since` reached back further than
  /// the hub's recent events).
  std::uint64_t private_subscriptions = 0;
  /// Followers that joined a topic the hub already followed (no bus call), since start.
  std::uint64_t shared_joins = 0;
};

class TopicHub {
 public:
  /// `replay_events`: events per topic kept for followers that join with a `since`.
  /// `max_queue`: the bound of each of the hub's bus subscriptions (SubscribeOptions::max_queue).
  /// Deliveries are made inline, so it fills only while a fan-out is slower than the topic's
  /// publishers; beyond it the followers get a gap.
  /// Bus subscriptions are made with EventBus::subscribe_async: no thread waits for them (with
  /// RedisBus, two round trips). Followers of a topic whose bus subscription is still being
  /// made are served once it is.
  explicit TopicHub(EventBusPtr bus, std::size_t replay_events = 64, std::size_t max_queue = 65536);
  /// Ends the hub's bus subscriptions. Followers' subscriptions become inactive.
  ~TopicHub();
  TopicHub(const TopicHub&) = delete;
  TopicHub& operator=(const TopicHub&) = delete;

  /// Follows an exact topic, like EventBus::subscribe with inline_executor(): `since_seq`,
  /// `since_epoch`, `snapshot` and `snapshot_source` have the bus's meaning; `executor`,
  /// `max_queue` and `overflow` are not used (the follower's own send queue bounds it).
  /// Errors: errc::invalid_topic (not an exact topic), errc::bad_request (no callback, or called
  /// from inside a follower's callback), and the bus's subscribe errors when the bus reports
  /// them before subscribe_async returns (LocalBus); a bus that reports later (RedisBus) ends
  /// the subscription with a Delivery::Kind::ended instead.
  result<Subscription> subscribe(const std::string& topic, DeliveryCallback callback,
                                 SubscribeOptions options);

  TopicHubStats stats() const;

  struct impl;

 private:
  std::shared_ptr<impl> impl_;
};

}  // namespace pushbook::detail
