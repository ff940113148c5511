#include <pushbook/executor.hpp>

#include "wait.hpp"

#include <doctest/doctest.h>

#include <atomic>

using namespace pushbook;

TEST_CASE("ThreadPool runs every task, on its own threads") {
  std::atomic<int> ran{0};
  std::atomic<bool> on_pool{true};
  {
    ThreadPool pool(3);
    CHECK(pool.size() == 3);
    CHECK_FALSE(pool.running_in_this_thread());
    for (int i = 0; i < 1000; ++i)
      pool.post([&] {
        if (!pool.running_in_this_thread()) on_pool = false;
        ++ran;
      });
  }  // the destructor runs what is queued, then joins
  CHECK(ran.load() == 1000);
  CHECK(on_pool.load());
}

TEST_CASE("a single-threaded pool runs tasks in FIFO order") {
  pushbook::test::Collector<int> order;
  {
    ThreadPool pool(1);
    for (int i = 0; i < 100; ++i) pool.post([&, i] { order.push(i); });
  }
  auto items = order.items();
  REQUIRE(items.size() == 100);
  for (int i = 0; i < 100; ++i) CHECK(items[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("a pool may be destroyed by its own last task") {
  auto pool = std::make_shared<ThreadPool>(1);
  std::atomic<bool> done{false};
  pool->post([p = pool, &done]() mutable {
    p.reset();  // not the last reference yet
    done = true;
  });
  pool.reset();
  CHECK(pushbook::test::eventually([&] { return done.load(); }));
}

TEST_CASE("inline_executor runs the task before post returns") {
  int x = 0;
  inline_executor()->post([&] { x = 1; });
  CHECK(x == 1);
}
