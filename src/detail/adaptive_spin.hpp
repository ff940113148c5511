// The spin-then-park policy of pushbook's waiting threads (ThreadPool threads, engine workers).
//
// A thread with nothing to do spins briefly (yielding) before it parks on a condition variable:
// work posted while it spins starts without a futex wake-up, the dominant cost of handing small
// tasks between threads. Spinning only pays when work comes often, so the budget adapts per
// thread: a spin that finds work keeps the full budget, a fruitless one halves it (down to none),
// and a thread woken soon after parking (work came in within the full budget) doubles it. Under
// load tasks start without wake-ups; at a trickle a thread parks at once instead of burning up to
// 50 us of CPU per task.
#pragma once

#include <algorithm>
#include <chrono>
#include <thread>

namespace pushbook::detail {

class AdaptiveSpin {
 public:
  static constexpr std::chrono::microseconds max_spin{50};

  /// Spins until `has_work()` is true or the budget runs out; true when work came.
  template <class HasWork>
  bool spin(HasWork&& has_work) {
    if (budget_.count() > 0) {
      const auto until = clock::now() + budget_;
      do {
        if (has_work()) {
          budget_ = max_spin;
          return true;
        }
        // Yield rather than pause: with more threads than cores a spinner must not take the CPU
        // from the thread that is about to post.
        std::this_thread::yield();
      } while (clock::now() < until);
    }
    budget_ = budget_ > min_spin ? budget_ / 2 : std::chrono::microseconds(0);
    return false;
  }
  /// Around parking: call parking() before waiting and woken() after.
  void parking() { parked_at_ = clock::now(); }
  void woken() {
    if (clock::now() - parked_at_ < max_spin) budget_ = std::min(max_spin, std::max(budget_ * 2, min_spin));
  }
  std::chrono::microseconds budget() const { return budget_; }

 private:
  using clock = std::chrono::steady_clock;
  static constexpr std::chrono::microseconds min_spin{4};
  std::chrono::microseconds budget_ = max_spin;
  clock::time_point parked_at_;
};

}  // namespace pushbook::detail
