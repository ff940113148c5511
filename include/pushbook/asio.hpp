// pushbook/asio.hpp: adapts any Boost.Asio executor (an io_context's, a strand, a thread_pool's)
// to pushbook::Executor. Header-only, so pushbook itself does not depend on Asio.
#pragma once

#include <pushbook/executor.hpp>

#include <boost/asio/post.hpp>

#include <memory>
#include <utility>

namespace pushbook {

/// Wraps an Asio executor: tasks are posted with `boost::asio::post(executor, task)`.
/// Pass a strand to make every callback of several subscriptions run one at a time.
template <class AsioExecutor>
ExecutorPtr make_executor(AsioExecutor executor) {
  class adapter final : public Executor {
   public:
    explicit adapter(AsioExecutor ex) : ex_(std::move(ex)) {}
    void post(std::function<void()> task) override { boost::asio::post(ex_, std::move(task)); }

   private:
    AsioExecutor ex_;
  };
  return std::make_shared<adapter>(std::move(executor));
}

}  // namespace pushbook
