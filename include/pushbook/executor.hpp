// pushbook/executor.hpp: where callbacks run. The bus and the engine post work to an Executor
// so that a host decides the threads: its own Asio io_context or strand (see pushbook/asio.hpp),
// pushbook's ThreadPool, or the caller's thread (inline_executor, for tests and benchmarks).
#pragma once

#include <pushbook/export.hpp>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

namespace pushbook {

/// Something that runs posted tasks, later and possibly on another thread.
class PUSHBOOK_EXPORT Executor {
 public:
  virtual ~Executor();
  /// Queues `task` to run. Must not run it before returning unless the executor is inline.
  /// Thread-safe.
  virtual void post(std::function<void()> task) = 0;
};

using ExecutorPtr = std::shared_ptr<Executor>;

/// A fixed set of threads running posted tasks in FIFO order.
class PUSHBOOK_EXPORT ThreadPool final : public Executor {
 public:
  /// Starts `threads` threads (at least one).
  explicit ThreadPool(std::size_t threads = 1);
  /// Runs the tasks already queued, then joins. Must not be called from one of its own threads.
  ~ThreadPool() override;

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  void post(std::function<void()> task) override;
  /// Number of threads.
  std::size_t size() const noexcept;
  /// True when called from one of this pool's threads.
  bool running_in_this_thread() const noexcept;

 private:
  struct impl;
  std::shared_ptr<impl> impl_;  // shared with the threads, so a self-destroying pool is safe
};

/// An executor that runs each task at once on the posting thread. With it a bus subscriber's
/// callback runs inside `publish()`: only for callbacks that never block.
PUSHBOOK_EXPORT ExecutorPtr inline_executor();

}  // namespace pushbook
