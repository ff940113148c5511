#include "gateway/websocket_session.hpp"

#include <fmt/format.h>
#include <boost/asio/post.hpp>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/ssl.hpp>  // the WebSocket teardown of a TLS stream
#include <boost/beast/websocket.hpp>
#include <boost/json/serialize.hpp>

namespace pushbook::detail {

namespace {
constexpr std::size_t max_frame_bytes = 256 * 1024;  // one write packs at most this much
}  // namespace

template <class Stream>
WebSocketSession<Stream>::WebSocketSession(std::shared_ptr<GatewayCore> core, Stream stream)
    : core_(std::move(core)),
      ws_(std::move(stream)),
      deadline_timer_(ws_.get_executor()),
      out_(core_->ctx->options.max_queued_bytes, core_->ctx->options.slow_consumer, &core_->metrics) {
  core_->metrics.websocket_connections.fetch_add(1);
}

template <class Stream>
WebSocketSession<Stream>::~WebSocketSession() {
  core_->metrics.websocket_connections.fetch_sub(1);
  core_->open_connections.fetch_sub(1);
  core_->registry.remove(this);
}

template <class Stream>
void WebSocketSession<Stream>::run(Request req, std::string user,
                                   std::optional<std::chrono::system_clock::time_point> token_expires) {
  core_->registry.add(this->shared_from_this());
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
  ws_.set_option(
      websocket::stream_base::decorator([offers_v1, node = o.node_name](websocket::response_type& res) {
        res.set(http::field::server, "pushbook");
        if (offers_v1) res.set(http::field::sec_websocket_protocol, "pushbook.v1");
        if (!node.empty()) res.set("Pushbook-Node", node);
      }));
  ws_.text(true);
  ws_.async_accept(req,
                   [self = this->shared_from_this()](boost::system::error_code ec) { self->on_accept(ec); });
}

template <class Stream>
void WebSocketSession<Stream>::on_accept(boost::system::error_code ec) {
  if (ec) return finish();
  opened_ = true;
  if (core_->ctx->options.access_log) {
    started_ = std::chrono::steady_clock::now();
    peer_ = peer_address(socket_of(ws_));
  }
  logic_ = std::make_unique<ConnectionLogic>(
      core_->ctx, std::static_pointer_cast<ConnectionSink>(this->shared_from_this()), user_, token_expires_);
  if (core_->stopping.load()) return start_close({websocket::close_code::going_away, "going away"});
  arm_deadline();
  do_read();
}

template <class Stream>
void WebSocketSession<Stream>::do_read() {
  ws_.async_read_some(net::buffer(&first_byte_, 1),
                      [self = this->shared_from_this()](boost::system::error_code ec, std::size_t n) {
                        self->on_first_byte(ec, n);
                      });
}

template <class Stream>
void WebSocketSession<Stream>::on_first_byte(boost::system::error_code ec, std::size_t bytes) {
  if (ec) return on_read(ec, 0);
  buffer_.clear();
  if (bytes == 1) {
    auto b = buffer_.prepare(1);
    *static_cast<char*>(b.data()) = first_byte_;
    buffer_.commit(1);
  }
  read_rest();
}

// The rest of the message, frame by frame. With plain buffers, not Beast's dynamic-buffer read:
// after a read that ended exactly at the end of the last frame Beast only learns the message is
// done on the next read, and its dynamic-buffer read asks for a size hint it cannot give then.
template <class Stream>
void WebSocketSession<Stream>::read_rest() {
  if (ws_.is_message_done()) return on_message(buffer_.size());
  ws_.async_read_some(buffer_.prepare(4096),
                      [self = this->shared_from_this()](boost::system::error_code ec, std::size_t n) {
                        if (ec) return self->on_read(ec, 0);
                        self->buffer_.commit(n);
                        self->read_rest();
                      });
}

template <class Stream>
void WebSocketSession<Stream>::on_read(boost::system::error_code ec, std::size_t bytes) {
  if (ec) {
    // Closed by the client, timed out, too big (Beast already sent 1009), or cut: all end here.
    core_->log(LogLevel::debug, fmt::format("websocket {}: read ended: {}", user_, ec.message()));
    return finish();
  }
  on_message(bytes);
}

template <class Stream>
void WebSocketSession<Stream>::on_message(std::size_t bytes) {
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
  buffer_.clear();
  buffer_.shrink_to_fit();  // an idle connection keeps no read buffer
  if (!finished_) do_read();
}

template <class Stream>
void WebSocketSession<Stream>::arm_deadline() {
  if (!logic_) return;
  auto when = logic_->next_deadline();
  if (!when) {
    deadline_timer_.cancel();
    return;
  }
  deadline_timer_.expires_at(*when);
  deadline_timer_.async_wait([self = this->shared_from_this()](boost::system::error_code ec) {
    if (ec || !self->logic_ || self->finished_) return;
    self->logic_->on_deadline();
    self->arm_deadline();
  });
}

template <class Stream>
void WebSocketSession<Stream>::send_text(std::shared_ptr<const std::string> message) {
  enqueue(std::move(message), nullptr);
}

template <class Stream>
void WebSocketSession<Stream>::send_event(const EventPtr& event, bool snapshot) {
  enqueue(event->wire(snapshot), event);
}

template <class Stream>
void WebSocketSession<Stream>::send_event_once(const EventPtr& event) {
  enqueue(event->wire_once(false), event);
}

template <class Stream>
void WebSocketSession<Stream>::enqueue(std::shared_ptr<const std::string> bytes, const EventPtr& event) {
  auto pushed = out_.push(std::move(bytes), event);
  if (pushed.too_slow) {
    net::post(ws_.get_executor(), [self = this->shared_from_this(), reason = std::move(*pushed.too_slow)] {
      self->start_close({websocket::close_code::try_again_later, reason});
    });
    return;
  }
  if (pushed.wake) net::post(ws_.get_executor(), [self = this->shared_from_this()] { self->do_write(); });
}

template <class Stream>
void WebSocketSession<Stream>::do_write() {
  // Nothing is queued before the handshake completes: output comes from logic_, made then.
  if (finished_) return;
  if (write_in_flight_) return;
  // Everything pending goes in one frame, newline-separated, copied into one buffer: a gather
  // write of hundreds of small buffers costs Beast more (it re-walks the sequence per write
  // step) than copying them does.
  writing_ = out_.take(frame_, max_frame_bytes);
  if (writing_ == 0) {
    // Everything queued is written: an idle connection keeps no frame buffer, and a pending
    // close goes now.
    if (frame_.capacity() > std::string().capacity()) std::string().swap(frame_);
    if (close_pending_ && !close_sent_) {
      auto reason = *close_pending_;
      close_pending_.reset();
      start_close(reason);
    }
    return;
  }
  write_in_flight_ = true;
  ws_.async_write(net::buffer(frame_),
                  [self = this->shared_from_this()](boost::system::error_code ec, std::size_t n) {
                    self->on_write(ec, n);
                  });
}

template <class Stream>
void WebSocketSession<Stream>::on_write(boost::system::error_code ec, std::size_t bytes) {
  write_in_flight_ = false;
  if (ec) {
    core_->log(LogLevel::debug, fmt::format("websocket {}: write failed: {}", user_, ec.message()));
    return finish();
  }
  core_->metrics.frames_written.fetch_add(1, std::memory_order_relaxed);
  core_->metrics.messages_pushed.fetch_add(writing_, std::memory_order_relaxed);
  core_->metrics.bytes_pushed.fetch_add(bytes, std::memory_order_relaxed);
  messages_out_ += writing_;
  bytes_out_ += bytes;
  writing_ = 0;
  do_write();  // with a close pending, do_write sends it once the queue is empty
}

template <class Stream>
void WebSocketSession<Stream>::close(std::uint16_t code, std::string reason) {
  net::post(ws_.get_executor(), [self = this->shared_from_this(), code, reason = std::move(reason)] {
    self->start_close({static_cast<websocket::close_code>(code), reason});
  });
}

template <class Stream>
void WebSocketSession<Stream>::post(std::function<void()> fn) {
  net::post(ws_.get_executor(), [self = this->shared_from_this(), fn = std::move(fn)] {
    if (!self->finished_) fn();
  });
}

// Strand only. One write at a time: a close waits for the write in flight.
template <class Stream>
void WebSocketSession<Stream>::start_close(websocket::close_reason reason) {
  if (close_sent_ || finished_) return;
  if (!opened_) {
    finish();
    return;
  }
  const bool queued = !out_.empty();
  if (write_in_flight_ || queued) {
    // What is queued (a decision being pushed while the server drains) goes first.
    close_pending_ = reason;
    if (!write_in_flight_) do_write();
    return;
  }
  close_sent_ = true;
  close_code_ = static_cast<std::uint16_t>(reason.code);
  out_.close(false);
  ws_.async_close(reason, [self = this->shared_from_this()](boost::system::error_code) {
    // The read loop sees the close handshake complete (or fail) and calls finish().
  });
}

template <class Stream>
void WebSocketSession<Stream>::shutdown() {
  close(static_cast<std::uint16_t>(websocket::close_code::going_away), "going away");
}

template <class Stream>
void WebSocketSession<Stream>::abort() {
  net::post(ws_.get_executor(), [self = this->shared_from_this()] {
    boost::system::error_code ec;
    socket_of(self->ws_).close(ec);
  });
}

template <class Stream>
void WebSocketSession<Stream>::finish() {
  if (finished_) return;
  finished_ = true;
  out_.close(true);
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
  socket_of(ws_).close(ec);
}

template class WebSocketSession<PlainStream>;
template class WebSocketSession<TlsStream>;

}  // namespace pushbook::detail
