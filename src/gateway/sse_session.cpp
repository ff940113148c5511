#include "gateway/sse_session.hpp"

#include <fmt/format.h>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

namespace pushbook::detail {

template <class Stream>
SseSession<Stream>::SseSession(std::shared_ptr<GatewayCore> core, Stream stream)
    : core_(std::move(core)), stream_(std::move(stream)), keepalive_(stream_.get_executor()) {
  core_->metrics.sse_connections.fetch_add(1);
}

template <class Stream>
SseSession<Stream>::~SseSession() {
  core_->metrics.sse_connections.fetch_sub(1);
  core_->metrics.queued_bytes.fetch_sub(static_cast<std::int64_t>(queued_bytes_));
  core_->open_connections.fetch_sub(1);
  core_->registry.remove(this);
}

template <class Stream>
void SseSession<Stream>::run(unsigned http_version, std::string topic, std::optional<std::uint64_t> since,
                             std::optional<std::uint32_t> epoch, std::string user) {
  core_->registry.add(this->shared_from_this());
  if (core_->ctx->options.access_log) {
    started_ = std::chrono::steady_clock::now();
    peer_ = peer_address(socket_of(stream_));
    user_ = std::move(user);
    topic_ = topic;
  }
  beast::get_lowest_layer(stream_).expires_never();
  enqueue(fmt::format(
      "HTTP/1.{} 200 OK\r\nServer: pushbook\r\nContent-Type: text/event-stream\r\n"
      "Cache-Control: no-store\r\nConnection: close\r\nX-Accel-Buffering: no\r\n{}\r\n"
      "retry: 2000\n\n",
      http_version == 10 ? 0 : 1,
      core_->ctx->options.node_name.empty() ? std::string()
                                            : "Pushbook-Node: " + core_->ctx->options.node_name + "\r\n"));
  auto sub = follow_for_events(*core_->ctx, topic, {since, epoch},
                               std::static_pointer_cast<ConnectionSink>(this->shared_from_this()));
  if (sub) subscription_ = std::move(*sub);
  net::dispatch(stream_.get_executor(), [self = this->shared_from_this()] {
    self->do_watch();
    self->arm_keepalive();
  });
}

template <class Stream>
void SseSession<Stream>::send_event(const EventPtr& event, bool snapshot) {
  auto chunk = sse_event(*event, snapshot);
  chunk += '\n';
  enqueue(std::move(chunk));
}

template <class Stream>
void SseSession<Stream>::send_text(std::shared_ptr<const std::string> message) {
  enqueue("data: " + *message + "\n\n");
}

template <class Stream>
void SseSession<Stream>::close(std::uint16_t, std::string reason) {
  core_->log(LogLevel::info, fmt::format("closing SSE stream: {}", reason));
  net::post(stream_.get_executor(), [self = this->shared_from_this()] { self->finish(); });
}

template <class Stream>
void SseSession<Stream>::post(std::function<void()> fn) {
  net::post(stream_.get_executor(), [self = this->shared_from_this(), fn = std::move(fn)] {
    if (!self->finished_) fn();
  });
}

template <class Stream>
void SseSession<Stream>::enqueue(std::string chunk) {
  bool post = false;
  {
    std::lock_guard lock(mutex_);
    if (closing_) return;
    if (queued_bytes_ + chunk.size() > core_->ctx->options.max_queued_bytes) {
      closing_ = true;  // EventSource reconnects with Last-Event-ID and misses nothing
      core_->metrics.slow_consumer_disconnects.fetch_add(1);
      net::post(stream_.get_executor(), [self = this->shared_from_this()] { self->finish(); });
      return;
    }
    queued_bytes_ += chunk.size();
    core_->metrics.queued_bytes.fetch_add(static_cast<std::int64_t>(chunk.size()));
    core_->metrics.messages_pushed.fetch_add(1, std::memory_order_relaxed);
    queue_.push_back(std::move(chunk));
    if (!write_scheduled_) post = write_scheduled_ = true;
  }
  if (post) net::post(stream_.get_executor(), [self = this->shared_from_this()] { self->do_write(); });
}

template <class Stream>
void SseSession<Stream>::do_write() {
  if (finished_) return;
  {
    std::lock_guard lock(mutex_);
    writing_.clear();
    while (!queue_.empty() && writing_.size() < 256 * 1024) {
      writing_ += queue_.front();
      queue_.pop_front();
    }
    queued_bytes_ -= writing_.size();
    core_->metrics.queued_bytes.fetch_sub(static_cast<std::int64_t>(writing_.size()));
    if (writing_.empty()) {
      write_scheduled_ = false;
      return;
    }
  }
  net::async_write(
      stream_, net::buffer(writing_),
      [self = this->shared_from_this()](boost::system::error_code ec, std::size_t) { self->on_write(ec); });
}

template <class Stream>
void SseSession<Stream>::on_write(boost::system::error_code ec) {
  if (ec) return finish();
  core_->metrics.frames_written.fetch_add(1, std::memory_order_relaxed);
  core_->metrics.bytes_pushed.fetch_add(writing_.size(), std::memory_order_relaxed);
  bytes_out_ += writing_.size();
  arm_keepalive();
  do_write();
}

// Reads (and discards) until the client goes away: that is how a closed EventSource shows.
template <class Stream>
void SseSession<Stream>::do_watch() {
  stream_.async_read_some(net::buffer(discard_),
                          [self = this->shared_from_this()](boost::system::error_code ec, std::size_t) {
                            if (ec) return self->finish();
                            self->do_watch();
                          });
}

template <class Stream>
void SseSession<Stream>::arm_keepalive() {
  if (finished_) return;
  keepalive_.expires_after(core_->ctx->options.sse_keepalive);
  keepalive_.async_wait([self = this->shared_from_this()](boost::system::error_code ec) {
    if (ec) return;
    self->enqueue(": keep-alive\n\n");
  });
}

template <class Stream>
void SseSession<Stream>::shutdown() {
  net::post(stream_.get_executor(), [self = this->shared_from_this()] { self->finish(); });
}

template <class Stream>
void SseSession<Stream>::abort() {
  shutdown();
}

template <class Stream>
void SseSession<Stream>::finish() {
  if (finished_) return;
  finished_ = true;
  {
    std::lock_guard lock(mutex_);
    closing_ = true;
  }
  subscription_.cancel();
  keepalive_.cancel();
  if (core_->ctx->options.access_log) {
    const auto ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_).count();
    core_->access(
        fmt::format("sse user={} peer={} route=/v1/events topic={} status=200 out_bytes={} ms={:.3f}", user_,
                    peer_, topic_, bytes_out_, ms));
  }
  // A read is pending (do_watch): no TLS close_notify, the client reconnects either way.
  close_now(stream_);
}

template class SseSession<PlainStream>;
template class SseSession<TlsStream>;

}  // namespace pushbook::detail
