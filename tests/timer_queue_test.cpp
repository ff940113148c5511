#include "detail/timer_queue.hpp"

#include "wait.hpp"

#include <doctest/doctest.h>

using namespace pushbook;
using namespace std::chrono_literals;

TEST_CASE("timers fire in deadline order, whatever the order they were scheduled in") {
  test::Collector<int> fired;  // declared first: outlives the timer thread
  detail::TimerQueue q;
  const auto now = detail::TimerQueue::clock::now();
  q.schedule(now + 30ms, [&] { fired.push(3); });
  q.schedule(now + 10ms, [&] { fired.push(1); });
  q.schedule(now + 20ms, [&] { fired.push(2); });
  CHECK(fired.wait_for(3) == std::vector<int>{1, 2, 3});
  CHECK(q.pending() == 0);
}

TEST_CASE("a cancelled timer does not fire") {
  test::Collector<int> fired;  // declared first: outlives the timer thread
  detail::TimerQueue q;
  const auto now = detail::TimerQueue::clock::now();
  auto id = q.schedule(now + 10ms, [&] { fired.push(1); });
  q.schedule(now + 20ms, [&] { fired.push(2); });
  CHECK(q.cancel(id));
  CHECK_FALSE(q.cancel(id));
  CHECK(fired.wait_for(1) == std::vector<int>{2});
}

TEST_CASE("destroying the queue discards pending timers") {
  std::atomic<int> fired{0};
  {
    detail::TimerQueue q;
    q.schedule(detail::TimerQueue::clock::now() + 1h, [&] { ++fired; });
  }
  CHECK(fired.load() == 0);
}
