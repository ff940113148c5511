#include <pushbook/executor.hpp>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace pushbook {

Executor::~Executor() = default;

struct ThreadPool::impl {
  std::mutex mutex;
  std::condition_variable wake;
  std::deque<std::function<void()>> tasks;
  bool stopping = false;
  std::vector<std::thread> threads;

  void run() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock lock(mutex);
        wake.wait(lock, [&] { return stopping || !tasks.empty(); });
        if (tasks.empty()) return;  // stopping and drained
        task = std::move(tasks.front());
        tasks.pop_front();
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
  {
    std::lock_guard lock(impl_->mutex);
    impl_->tasks.push_back(std::move(task));
  }
  impl_->wake.notify_one();
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
