// A single thread running callbacks at deadlines, with O(log n) cancellation. Used by the engine
// for handler timeouts and hold expiry; no Asio needed for that.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace pushbook::detail {

class TimerQueue {
 public:
  using clock = std::chrono::steady_clock;
  using timer_id = std::uint64_t;

  TimerQueue();
  /// Calls stop().
  ~TimerQueue();
  TimerQueue(const TimerQueue&) = delete;
  TimerQueue& operator=(const TimerQueue&) = delete;

  /// Runs `fn` on the timer thread at `at` (or soon after). Returns an id for cancel().
  timer_id schedule(clock::time_point at, std::function<void()> fn);
  /// Returns true when the timer was pending and will not run.
  bool cancel(timer_id id);
  std::size_t pending() const;
  /// Runs no more timers (pending and later ones are discarded) and joins the thread, after the
  /// timer running now (if any) has returned. Idempotent. From the timer thread itself it only
  /// detaches it.
  void stop();

 private:
  void run();

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::map<std::pair<clock::time_point, timer_id>, std::function<void()>> timers_;
  std::unordered_map<timer_id, clock::time_point> deadlines_;
  timer_id next_id_ = 1;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace pushbook::detail
