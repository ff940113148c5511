#include "detail/timer_queue.hpp"

namespace pushbook::detail {

TimerQueue::TimerQueue() : thread_([this] { run(); }) {}

TimerQueue::~TimerQueue() { stop(); }

void TimerQueue::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (!thread_.joinable()) return;
  if (thread_.get_id() == std::this_thread::get_id())
    thread_.detach();
  else
    thread_.join();
}

TimerQueue::timer_id TimerQueue::schedule(clock::time_point at, std::function<void()> fn) {
  timer_id id;
  bool earliest;
  {
    std::lock_guard lock(mutex_);
    id = next_id_++;
    auto it = timers_.emplace(std::pair{at, id}, std::move(fn)).first;
    deadlines_.emplace(id, at);
    earliest = it == timers_.begin();
  }
  if (earliest) wake_.notify_one();
  return id;
}

bool TimerQueue::cancel(timer_id id) {
  std::lock_guard lock(mutex_);
  auto d = deadlines_.find(id);
  if (d == deadlines_.end()) return false;
  timers_.erase({d->second, id});
  deadlines_.erase(d);
  return true;
}

std::size_t TimerQueue::pending() const {
  std::lock_guard lock(mutex_);
  return timers_.size();
}

void TimerQueue::run() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    if (timers_.empty()) {
      wake_.wait(lock);
      continue;
    }
    auto first = timers_.begin();
    const auto deadline = first->first.first;  // a copy: cancel() may erase the node while we wait
    if (clock::now() < deadline) {
      wake_.wait_until(lock, deadline);
      continue;
    }
    auto fn = std::move(first->second);
    deadlines_.erase(first->first.second);
    timers_.erase(first);
    lock.unlock();
    fn();
    lock.lock();
  }
}

}  // namespace pushbook::detail
