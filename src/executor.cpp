#include <pushbook/executor.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace pushbook {

Executor::~Executor() = default;

// Threads park on a condition variable only after spinning (yielding) briefly on an atomic counter: a
// task posted while a thread spins starts without a futex wake-up (the dominant cost of handing
// off small tasks), and post() signals only when a thread is actually parked. The spin adapts:
// each spin that finds nothing halves the next one (down to none), a thread woken soon after
// parking doubles it, and one that finds work while spinning spins in full again. Under load tasks start
// without wake-ups; at a trickle a thread parks at once instead of burning up to 50 us of CPU
// per task.
struct ThreadPool::impl {
  static constexpr auto spin_for = std::chrono::microseconds(50);

  std::mutex mutex;
  std::condition_variable wake;
  std::deque<std::function<void()>> tasks;
  std::atomic<std::size_t> queued{0};
  std::size_t parked = 0;
  bool stopping = false;
  std::vector<std::thread> threads;

  bool spin_until_work(std::chrono::microseconds how_long) {
    const auto until = std::chrono::steady_clock::now() + how_long;
    do {
      if (queued.load(std::memory_order_relaxed) > 0) return true;
      // Yield rather than pause: with more threads than cores a spinner must not take the CPU
      // from the thread that is about to post.
      std::this_thread::yield();
    } while (std::chrono::steady_clock::now() < until);
    return false;
  }

  void run() {
    auto spin = spin_for;
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock lock(mutex);
        if (tasks.empty() && !stopping) {
          lock.unlock();
          if (spin.count() > 0 && spin_until_work(spin))
            spin = spin_for;
          else
            spin = spin.count() > 4 ? spin / 2 : std::chrono::microseconds(0);
          lock.lock();
          if (tasks.empty() && !stopping) {
            const auto parked_at = std::chrono::steady_clock::now();
            while (tasks.empty() && !stopping) {
              ++parked;
              wake.wait(lock);
              --parked;
            }
            if (std::chrono::steady_clock::now() - parked_at < spin_for)
              spin = std::min<std::chrono::microseconds>(spin_for,
                                                         std::max(spin * 2, std::chrono::microseconds(4)));
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
