#include "gateway/websocket_session.hpp"

#include <fmt/format.h>
#include <boost/asio/post.hpp>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/json/serialize.hpp>

namespace pushbook::detail {

namespace {
constexpr std::size_t max_frame_bytes = 256 * 1024;  // one write packs at most this much
}  // namespace

WebSocketSession::WebSocketSession(std::shared_ptr<GatewayCore> core, tcp::socket socket)
    : core_(std::move(core)), ws_(std::move(socket)), deadline_timer_(ws_.get_executor()) {
  core_->metrics.websocket_connections.fetch_add(1);
}

WebSocketSession::~WebSocketSession() {
  core_->metrics.websocket_connections.fetch_sub(1);
  core_->metrics.queued_bytes.fetch_sub(static_cast<std::int64_t>(queued_bytes_));
  core_->open_connections.fetch_sub(1);
  core_->registry.remove(this);
}

void WebSocketSession::run(Request req, std::string user,
                           std::optional<std::chrono::system_clock::time_point> token_expires) {
  core_->registry.add(shared_from_this());
  user_ = std::move(user);
  token_expires_ = token_expires;
  const auto& o = core_->ctx->options;
  beast::get_lowest_layer(ws_).expires_never();  // the websocket stream has its own timeouts
  websocket::stream_base::timeout timeouts;
  timeouts.handshake_timeout = o.handshake_timeout;
  timeouts.idle_timeout = o.idle_timeout;  // pings at half, closes at full
  timeouts.keep_alive_pings = true;
  ws_.set_option(timeouts);
  ws_.read_message_max(o.max_message_bytes);  // Beast's default is 16 MiB; beyond: close 1009
  websocket::permessage_deflate pmd;
  pmd.server_enable = o.permessage_deflate;  // the size limit applies to the inflated message
  ws_.set_option(pmd);
  // Browsers send the token as a "bearer.<jwt>" subprotocol next to "pushbook.v1"; answer with
  // the protocol, never with the token.
  bool offers_v1 = false;
  if (auto it = req.find(http::field::sec_websocket_protocol); it != req.end())
    offers_v1 = std::string_view(it->value()).find("pushbook.v1") != std::string_view::npos;
  ws_.set_option(websocket::stream_base::decorator([offers_v1](websocket::response_type& res) {
    res.set(http::field::server, "pushbook");
    if (offers_v1) res.set(http::field::sec_websocket_protocol, "pushbook.v1");
  }));
  ws_.text(true);
  ws_.async_accept(req, [self = shared_from_this()](boost::system::error_code ec) { self->on_accept(ec); });
}

void WebSocketSession::on_accept(boost::system::error_code ec) {
  if (ec) return finish();
  opened_ = true;
  if (core_->ctx->options.access_log) {
    started_ = std::chrono::steady_clock::now();
    peer_ = peer_address(beast::get_lowest_layer(ws_).socket());
  }
  logic_ = std::make_unique<ConnectionLogic>(
      core_->ctx, std::static_pointer_cast<ConnectionSink>(shared_from_this()), user_, token_expires_);
  if (core_->stopping.load()) return start_close({websocket::close_code::going_away, "going away"});
  arm_deadline();
  do_read();
}

void WebSocketSession::do_read() {
  ws_.async_read(buffer_, [self = shared_from_this()](boost::system::error_code ec, std::size_t n) {
    self->on_read(ec, n);
  });
}

void WebSocketSession::on_read(boost::system::error_code ec, std::size_t bytes) {
  if (ec) {
    // Closed by the client, timed out, too big (Beast already sent 1009), or cut: all end here.
    core_->log(LogLevel::debug, fmt::format("websocket {}: read ended: {}", user_, ec.message()));
    return finish();
  }
  ++messages_in_;
  bytes_in_ += bytes;
  if (!ws_.got_text()) {
    buffer_.consume(bytes);
    logic_->on_binary();
  } else {
    const auto text = beast::buffers_to_string(buffer_.data());
    buffer_.consume(bytes);
    logic_->on_message(text);
    arm_deadline();  // a refresh may have moved it
  }
  if (buffer_.capacity() > 16 * 1024) buffer_.shrink_to_fit();  // keep idle connections small
  if (!finished_) do_read();
}

void WebSocketSession::arm_deadline() {
  if (!logic_) return;
  auto when = logic_->next_deadline();
  if (!when) {
    deadline_timer_.cancel();
    return;
  }
  deadline_timer_.expires_at(*when);
  deadline_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
    if (ec || !self->logic_ || self->finished_) return;
    self->logic_->on_deadline();
    self->arm_deadline();
  });
}

void WebSocketSession::send_text(std::shared_ptr<const std::string> message) {
  enqueue({std::move(message), nullptr});
}

void WebSocketSession::send_event(const EventPtr& event, bool snapshot) {
  enqueue({event->wire(snapshot), event, snapshot});
}

void WebSocketSession::enqueue(Item item) {
  bool post = false;
  {
    std::lock_guard lock(mutex_);
    if (closing_) return;
    const std::size_t size = item.bytes->size() + 1;
    const auto limit = core_->ctx->options.max_queued_bytes;
    if (queued_bytes_ + size > limit) {
      if (core_->ctx->options.slow_consumer == SlowConsumerPolicy::drop_with_gap) {
        // Drop the oldest events (never replies) until this one fits.
        for (auto it = queue_.begin(); it != queue_.end() && queued_bytes_ + size > limit;) {
          if (!it->event) {
            ++it;
            continue;
          }
          queued_bytes_ -= it->bytes->size() + 1;
          core_->metrics.queued_bytes.fetch_sub(static_cast<std::int64_t>(it->bytes->size() + 1));
          dropped_topics_.insert(it->event->topic());
          ++dropped_;
          core_->metrics.dropped_messages.fetch_add(1);
          it = queue_.erase(it);
        }
        if (queued_bytes_ + size > limit && item.event) {
          dropped_topics_.insert(item.event->topic());
          ++dropped_;
          core_->metrics.dropped_messages.fetch_add(1);
          return;
        }
      }
      if (queued_bytes_ + size > limit) {
        closing_ = true;
        core_->metrics.slow_consumer_disconnects.fetch_add(1);
        const auto reason = fmt::format("too slow: {} bytes waiting", queued_bytes_);
        net::post(ws_.get_executor(), [self = shared_from_this(), reason] {
          self->start_close({websocket::close_code::try_again_later, reason});
        });
        return;
      }
    }
    queued_bytes_ += size;
    core_->metrics.queued_bytes.fetch_add(static_cast<std::int64_t>(size));
    queue_.push_back(std::move(item));
    if (!write_scheduled_) post = write_scheduled_ = true;
  }
  if (post) net::post(ws_.get_executor(), [self = shared_from_this()] { self->do_write(); });
}

void WebSocketSession::do_write() {
  // Nothing is queued before the handshake completes: output comes from logic_, made then.
  if (finished_) return;
  if (write_in_flight_) return;
  writing_.clear();
  std::size_t frame = 0;
  {
    std::lock_guard lock(mutex_);
    if (dropped_ > 0) {
      boost::json::array topics;
      for (const auto& t : dropped_topics_) topics.emplace_back(t);
      writing_.push_back(std::make_shared<const std::string>(boost::json::serialize(
          boost::json::object{{"type", "gap"}, {"dropped", dropped_}, {"topics", std::move(topics)}})));
      dropped_ = 0;
      dropped_topics_.clear();
    }
    while (!queue_.empty() && (frame == 0 || frame + queue_.front().bytes->size() <= max_frame_bytes)) {
      frame += queue_.front().bytes->size() + 1;
      writing_.push_back(std::move(queue_.front().bytes));
      queue_.pop_front();
    }
    queued_bytes_ -= frame;
    core_->metrics.queued_bytes.fetch_sub(static_cast<std::int64_t>(frame));
    if (writing_.empty()) write_scheduled_ = false;
  }
  if (writing_.empty()) {
    // Everything queued is written: a pending close goes now (outside the lock: it takes it).
    if (close_pending_ && !close_sent_) {
      auto reason = *close_pending_;
      close_pending_.reset();
      start_close(reason);
    }
    return;
  }
  // One frame, newline-separated, copied into one buffer: a gather write of hundreds of small
  // buffers costs Beast more (it re-walks the sequence per write step) than copying them does.
  frame_.clear();
  frame_.reserve(frame);
  for (std::size_t i = 0; i < writing_.size(); ++i) {
    if (i > 0) frame_ += '\n';
    frame_ += *writing_[i];
  }
  write_in_flight_ = true;
  ws_.async_write(net::buffer(frame_), [self = shared_from_this()](boost::system::error_code ec,
                                                                   std::size_t n) { self->on_write(ec, n); });
}

void WebSocketSession::on_write(boost::system::error_code ec, std::size_t bytes) {
  write_in_flight_ = false;
  if (ec) {
    core_->log(LogLevel::debug, fmt::format("websocket {}: write failed: {}", user_, ec.message()));
    return finish();
  }
  core_->metrics.frames_written.fetch_add(1, std::memory_order_relaxed);
  core_->metrics.messages_pushed.fetch_add(writing_.size(), std::memory_order_relaxed);
  core_->metrics.bytes_pushed.fetch_add(bytes, std::memory_order_relaxed);
  messages_out_ += writing_.size();
  bytes_out_ += bytes;
  writing_.clear();
  if (frame_.capacity() > 64 * 1024) frame_ = std::string();  // idle connections keep no big buffer
  do_write();  // with a close pending, do_write sends it once the queue is empty
}

void WebSocketSession::close(std::uint16_t code, std::string reason) {
  net::post(ws_.get_executor(), [self = shared_from_this(), code, reason = std::move(reason)] {
    self->start_close({static_cast<websocket::close_code>(code), reason});
  });
}

void WebSocketSession::post(std::function<void()> fn) {
  net::post(ws_.get_executor(), [self = shared_from_this(), fn = std::move(fn)] {
    if (!self->finished_) fn();
  });
}

// Strand only. One write at a time: a close waits for the write in flight.
void WebSocketSession::start_close(websocket::close_reason reason) {
  if (close_sent_ || finished_) return;
  if (!opened_) {
    finish();
    return;
  }
  bool queued = false;
  {
    std::lock_guard lock(mutex_);
    queued = !queue_.empty() || dropped_ > 0;
  }
  if (write_in_flight_ || queued) {
    // What is queued (a decision being pushed while the server drains) goes first.
    close_pending_ = reason;
    if (!write_in_flight_) do_write();
    return;
  }
  close_sent_ = true;
  close_code_ = static_cast<std::uint16_t>(reason.code);
  {
    std::lock_guard lock(mutex_);
    closing_ = true;
  }
  ws_.async_close(reason, [self = shared_from_this()](boost::system::error_code) {
    // The read loop sees the close handshake complete (or fail) and calls finish().
  });
}

void WebSocketSession::shutdown() {
  close(static_cast<std::uint16_t>(websocket::close_code::going_away), "going away");
}

void WebSocketSession::abort() {
  net::post(ws_.get_executor(), [self = shared_from_this()] {
    boost::system::error_code ec;
    beast::get_lowest_layer(self->ws_).socket().close(ec);
  });
}

void WebSocketSession::finish() {
  if (finished_) return;
  finished_ = true;
  {
    std::lock_guard lock(mutex_);
    closing_ = true;
    queue_.clear();
    core_->metrics.queued_bytes.fetch_sub(static_cast<std::int64_t>(queued_bytes_));
    queued_bytes_ = 0;
  }
  deadline_timer_.cancel();
  if (logic_) logic_->unsubscribe_all();  // no more events, and no callback keeps us alive
  if (opened_ && core_->ctx->options.access_log) {
    // Who closed: the code this side sent, else the client's, else none (1006: cut).
    const auto code = close_code_ != 0 ? close_code_ : static_cast<std::uint16_t>(ws_.reason().code);
    const auto ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_).count();
    core_->access(fmt::format(
        "ws user={} peer={} route=/v1/ws close={} by={} in={} in_bytes={} out={} "
        "out_bytes={} ms={:.3f}",
        user_, peer_, code != 0 ? code : 1006, close_code_ != 0 ? "server" : (code != 0 ? "client" : "-"),
        messages_in_, bytes_in_, messages_out_, bytes_out_, ms));
  }
  boost::system::error_code ec;
  beast::get_lowest_layer(ws_).socket().close(ec);
}

}  // namespace pushbook::detail
