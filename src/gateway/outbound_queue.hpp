// A connection's bounded queue of messages waiting to be sent, with the slow-consumer policy
// (GatewayOptions::max_queued_bytes, slow_consumer). Shared by the Beast WebSocket session and
// ProtocolSession (a host's own WebSocket): events are pushed on publisher threads, the writer
// takes what waits as one newline-separated frame. No I/O here.
#pragma once

#include <pushbook/event_bus.hpp>
#include <pushbook/push_gateway.hpp>

#include "gateway/metrics.hpp"

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace pushbook::detail {

class OutboundQueue {
 public:
  /// `metrics` (may be null) counts queued bytes, drops and slow-consumer disconnects.
  OutboundQueue(std::size_t max_bytes, SlowConsumerPolicy policy, GatewayMetrics* metrics)
      : max_bytes_(max_bytes), policy_(policy), metrics_(metrics) {}
  /// Gives the queued bytes back to the metrics.
  ~OutboundQueue();
  OutboundQueue(const OutboundQueue&) = delete;
  OutboundQueue& operator=(const OutboundQueue&) = delete;

  struct Pushed {
    /// The writer was idle: wake it (it takes until take() returns 0, then is idle again).
    bool wake = false;
    /// Set when the message did not fit and the policy is disconnect: the connection must close
    /// with 1013 and this reason. The queue accepts nothing more from then on.
    std::optional<std::string> too_slow;
  };
  /// Queues a reply or notice (`event` null: never dropped) or an event (the policy may drop
  /// it). Nothing is queued once the queue is closed. Any thread.
  Pushed push(std::shared_ptr<const std::string> bytes, const EventPtr& event = nullptr);

  /// Appends what waits to `frame` (cleared first), newline-separated, a gap notice first when
  /// events were dropped, at most `max_frame` bytes (but at least one message). Returns the number
  /// of messages; 0 when nothing waits, and the writer counts as idle from then on. Any thread.
  std::size_t take(std::string& frame, std::size_t max_frame);

  /// True when nothing waits (no message, no gap notice).
  bool empty() const;
  /// Accepts nothing more; with `discard`, also forgets what waits.
  void close(bool discard);
  bool closed() const;

 private:
  struct Item {
    std::shared_ptr<const std::string> bytes;
    EventPtr event;  // set for events (droppable), null for replies and notices
  };
  void count_queued(std::int64_t delta);
  void count_drop(const EventPtr& event);

  const std::size_t max_bytes_;
  const SlowConsumerPolicy policy_;
  GatewayMetrics* const metrics_;

  mutable std::mutex mutex_;
  // What waits: items_[head_] onwards. A vector with a head index, not a std::deque (which
  // allocates ~576 bytes even empty); emptied and released when drained.
  std::vector<Item> items_;
  std::size_t head_ = 0;
  std::size_t bytes_ = 0;
  std::uint64_t dropped_ = 0;
  std::unique_ptr<std::set<std::string>> dropped_topics_;  // only while events were dropped
  bool writer_busy_ = false;                               // woken and not yet idle
  bool closed_ = false;
};

}  // namespace pushbook::detail
