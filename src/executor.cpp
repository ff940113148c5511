#include <pushbook/executor.hpp>

#include "detail/adaptive_spin.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace pushbook {

Executor::~Executor() = default;

// Idle threads spin briefly before parking (detail::AdaptiveSpin), and post() signals only when a
// thread is actually parked.
struct ThreadPool::impl {
  std::mutex mutex;
  std::condition_variable wake;
  std::deque<std::function<void()>> tasks;
  std::atomic<std::size_t> queued{0};
  std::size_t parked = 0;
  bool stopping = false;
  std::vector<std::thread> threads;

  void run() {
    detail::AdaptiveSpin spin;
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock lock(mutex);
        if (tasks.empty() && !stopping) {
          lock.unlock();
          spin.spin([this] { return queued.load(std::memory_order_relaxed) > 0; });
          lock.lock();
          if (tasks.empty() && !stopping) {
            spin.parking();
            while (tasks.empty() && !stopping) {
              ++parked;
              wake.wait(lock);
              --parked;
            }
            spin.woken();
          }
        }
        if (tasks.empty()) return;  // stopping and drained
        task = std::move(tasks.front());
        tasks.pop_front();
        queued.fetch_sub(1, std::memory_order_relaxed);
      }
      task();
    }
  }
};

ThreadPool::ThreadPool(std::size_t threads) : impl_(std::make_shared<impl>()) {
  if (threads == 0) threads = 1;
  impl_->threads.reserve(threads);
  for (std::size_t i = 0; i < threads; ++i) impl_->threads.emplace_back([p = impl_] { p->run(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->wake.notify_all();
  for (auto& t : impl_->threads) {
    if (t.get_id() == std::this_thread::get_id())
      t.detach();  // destroyed from its own task: cannot join itself
    else
      t.join();
  }
}

void ThreadPool::post(std::function<void()> task) {
  bool wake;
  {
    std::lock_guard lock(impl_->mutex);
    impl_->tasks.push_back(std::move(task));
    impl_->queued.fetch_add(1, std::memory_order_relaxed);
    wake = impl_->parked > 0;
  }
  if (wake) impl_->wake.notify_one();
}

std::size_t ThreadPool::size() const noexcept { return impl_->threads.size(); }

bool ThreadPool::running_in_this_thread() const noexcept {
  for (const auto& t : impl_->threads)
    if (t.get_id() == std::this_thread::get_id()) return true;
  return false;
}

namespace {
class inline_executor_impl final : public Executor {
 public:
  void post(std::function<void()> task) override { task(); }
};
}  // namespace

ExecutorPtr inline_executor() {
  static const ExecutorPtr instance = std::make_shared<inline_executor_impl>();
  return instance;
}

}  // namespace pushbook
