// Coarse per-connection deadlines (WebSocket keep-alive pings, idle and close-handshake timeouts,
// token expiry) kept by one heap and one steady_timer per io_context, instead of a timer per
// connection: an idle connection costs one slot (8 bytes) and, while it waits, a heap entry
// (16 bytes). Deadlines are lazy: a connection that moves its deadline later (it read something)
// changes nothing here; when the old one fires it looks at the time and asks again.
#pragma once

#include <boost/asio/execution_context.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace pushbook::detail {

/// What a Deadlines slot calls. The target must call Deadlines::remove() first thing in its
/// destructor.
class DeadlineTarget {
 public:
  virtual ~DeadlineTarget() = default;
  /// A strong reference, or null once the target is being destroyed.
  virtual std::shared_ptr<DeadlineTarget> lock_target() = 0;
  /// A deadline passed (or an earlier one did: the target checks the time itself). Called on the
  /// io_context's thread, without the Deadlines lock; the target moves to its own strand if it has one.
  virtual void deadline_passed() = 0;
};

class Deadlines : public boost::asio::execution_context::service {
 public:
  using clock = std::chrono::steady_clock;
  using key_type = Deadlines;
  static inline boost::asio::execution_context::id id;

  explicit Deadlines(boost::asio::io_context& ioc);
  /// The one of `ioc` (made on first use).
  static Deadlines& of(boost::asio::io_context& ioc) { return boost::asio::use_service<Deadlines>(ioc); }

  struct Slot {
    std::uint32_t index = 0;
    std::uint32_t generation = 0;
  };
  Slot add(DeadlineTarget* target);
  void remove(Slot slot);
  /// deadline_passed() at `when` or soon after (the timer's resolution is the io_context's). Any
  /// thread.
  void at(Slot slot, clock::time_point when);

  /// Entries waiting (tests).
  std::size_t waiting();

 private:
  void shutdown() override;
  void arm(clock::time_point when);  // mutex_ held
  void on_timer();

  struct Entry {
    clock::time_point when;
    Slot slot;
    bool operator>(const Entry& o) const { return when > o.when; }
  };
  struct Target {
    DeadlineTarget* target = nullptr;
    std::uint32_t generation = 0;
  };

  std::mutex mutex_;
  boost::asio::steady_timer timer_;
  std::vector<Entry> heap_;  // a min-heap on `when`
  std::vector<Target> slots_;
  std::vector<std::uint32_t> free_;
  clock::time_point armed_ = clock::time_point::max();  // when the timer fires (max: not armed)
  bool shut_down_ = false;
};

}  // namespace pushbook::detail
