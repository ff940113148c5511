#include "gateway/raw_websocket_session.hpp"

#include <fmt/format.h>
#include <boost/asio/bind_allocator.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/http/field.hpp>

#include <array>
#include <cstring>
#include <utility>

#include <unistd.h>

namespace pushbook::detail {

namespace {

constexpr std::size_t max_frame_bytes = 256 * 1024;  // one data frame packs at most this much
constexpr std::size_t read_chunk = 16 * 1024;        // the per-thread read buffer
constexpr int max_reads_per_wake = 8;                // then other connections get their turn
constexpr int max_frames_per_wake = 16;

// Per thread: what one connection's handler reads into and composes frames in. Never held
// across a wait, so every connection on the thread shares them.
char* read_buffer() {
  thread_local std::unique_ptr<char[]> buffer(new char[read_chunk]);
  return buffer.get();
}
std::string& frame_payload() {
  thread_local std::string payload;
  return payload;
}

// The allocator of the read an idle connection keeps pending: its operation gets a block of its
// own size from the heap. Asio's default gives a handler a block its thread cached from an earlier
// operation when one is large enough, however much larger (a handshake's or a request's), and
// this read is held for as long as the connection is idle: ~250 bytes per connection more (as
// measured for the async_wait it replaced).
template <class T>
struct exact_allocator {
  using value_type = T;
  exact_allocator() noexcept = default;
  template <class U>
  exact_allocator(const exact_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p); }
  template <class U>
  bool operator==(const exact_allocator<U>&) const noexcept {
    return true;
  }
};

bool has_token(std::string_view list, std::string_view token) {
  // A comma-separated header value containing `token` (case-insensitive), e.g. "keep-alive, Upgrade".
  while (!list.empty()) {
    const auto comma = list.find(',');
    auto item = list.substr(0, comma);
    while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
    while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
    if (item.size() == token.size() &&
        std::equal(item.begin(), item.end(), token.begin(),
                   [](char a, char b) { return std::tolower(static_cast<unsigned char>(a)) == b; }))
      return true;
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return false;
}

}  // namespace

std::optional<UpgradeRefusal> check_upgrade(const Request& req) {
  if (req.version() != 11) return UpgradeRefusal{400, "WebSocket upgrade needs HTTP/1.1"};
  if (req.method() != http::verb::get) return UpgradeRefusal{400, "WebSocket upgrade needs GET"};
  if (req.find(http::field::host) == req.end()) return UpgradeRefusal{400, "WebSocket upgrade without Host"};
  auto connection = req.find(http::field::connection);
  if (connection == req.end() || !has_token(connection->value(), "upgrade"))
    return UpgradeRefusal{400, "WebSocket upgrade without Connection: upgrade"};
  auto upgrade = req.find(http::field::upgrade);
  if (upgrade == req.end() || !has_token(upgrade->value(), "websocket"))
    return UpgradeRefusal{400, "WebSocket upgrade without Upgrade: websocket"};
  auto key = req.find(http::field::sec_websocket_key);
  if (key == req.end() || !ws::valid_client_key(key->value()))
    return UpgradeRefusal{400, "missing or malformed Sec-WebSocket-Key"};
  auto version = req.find(http::field::sec_websocket_version);
  if (version == req.end() || version->value() != "13")
    return UpgradeRefusal{426, "WebSocket version 13 required"};
  return std::nullopt;
}

template <class Executor>
RawWebSocketSession<Executor>::RawWebSocketSession(std::shared_ptr<GatewayCore> core, Socket socket)
    : core_(std::move(core)),
      socket_(std::move(socket)),
      deadlines_(&Deadlines::of(
          static_cast<net::io_context&>(net::query(socket_.get_executor(), net::execution::context)))),
      reader_(core_->ctx->options.max_message_bytes),
      out_(core_->ctx->options.max_queued_bytes, core_->ctx->options.slow_consumer, &core_->metrics) {
  slot_ = deadlines_->add(this);
  core_->metrics.websocket_connections.fetch_add(1);
}

template <class Executor>
RawWebSocketSession<Executor>::~RawWebSocketSession() {
  deadlines_->remove(slot_);  // first: the heap may look at this object until then
  core_->metrics.websocket_connections.fetch_sub(1);
  core_->open_connections.fetch_sub(1);
  core_->registry.remove(this);
}

template <class Executor>
void RawWebSocketSession<Executor>::run(const Request& req, std::string user,
                                        std::optional<std::chrono::system_clock::time_point> token_expires,
                                        std::string_view already_read) {
  core_->registry.add(this->shared_from_this());
  const auto& o = core_->ctx->options;
  boost::system::error_code ec;
  socket_.non_blocking(true, ec);
  if (ec) return finish(ec.message());

  // Browsers send the token as a "bearer.<jwt>" subprotocol next to "pushbook.v1"; answer with
  // the protocol, never with the token.
  bool offers_v1 = false;
  if (auto it = req.find(http::field::sec_websocket_protocol); it != req.end())
    offers_v1 = std::string_view(it->value()).find("pushbook.v1") != std::string_view::npos;
  std::string response = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
  response += "Sec-WebSocket-Accept: ";
  response += ws::accept_key(req[http::field::sec_websocket_key]);
  response += "\r\nServer: pushbook\r\n";
  if (offers_v1) response += "Sec-WebSocket-Protocol: pushbook.v1\r\n";
  if (!o.node_name.empty()) response += "Pushbook-Node: " + o.node_name + "\r\n";
  response += "\r\n";
  const net::const_buffer b(response.data(), response.size());
  if (!send_bytes(&b, 1)) return;

  last_read_ = steady::now();
  if (o.access_log) {
    access_ = std::make_unique<AccessLog>();
    access_->started = last_read_;
    access_->peer = peer_address(socket_);
  }
  logic_.emplace(core_->ctx, std::static_pointer_cast<ConnectionSink>(this->shared_from_this()),
                 std::move(user), token_expires);
  if (core_->stopping.load()) start_close(ws::close_going_away, "going away");
  if (!already_read.empty()) {
    std::string copy(already_read);
    if (!consume(copy.data(), copy.size())) return;
  }
  schedule_deadline();
  wait_readable();
}

// --- reading ---------------------------------------------------------------------------------

template <class Executor>
void RawWebSocketSession<Executor>::wait_readable() {
  // A reactor read, not a wait: Asio re-registers the socket with epoll (one epoll_ctl) for every
  // async_wait. A read is tried at once (Asio gives up on that only after an end of stream): it
  // finds the socket empty (one recv, EAGAIN, cheaper than the epoll_ctl) or reads what came since
  // the last read, so no input is ever left unannounced, also on a host's io_context whose epoll
  // runs on another thread (its reactor is edge-triggered: an edge seen before a wait is
  // registered would be lost to the wait). Queued, it reads the client's next request into
  // early_read_ in the same step that reports it. The buffer is the connection's own: the
  // thread's buffer cannot be, as a read queued on one connection may complete after another
  // connection's handler used it.
  socket_.async_read_some(
      net::buffer(early_read_),
      net::bind_allocator(exact_allocator<void>(),
                          [self = this->shared_from_this()](boost::system::error_code ec, std::size_t n) {
                            self->on_readable(ec, n);
                          }));
}

template <class Executor>
void RawWebSocketSession<Executor>::on_readable(boost::system::error_code ec, std::size_t n) {
  if (state_ == State::finished) return;
  if (ec == net::error::eof) return end_of_input();
  if (ec) return finish(ec.message());
  // What handling the input queued for the client goes out once it is handled, whichever way
  // read_input returned.
  reading_ = true;
  try {
    read_input(n);
  } catch (...) {
    reading_ = flush_after_read_ = false;
    throw;
  }
  reading_ = false;
  if (std::exchange(flush_after_read_, false)) do_write();
}

template <class Executor>
void RawWebSocketSession<Executor>::read_input(std::size_t n) {
  if (n > 0 && n < early_read_.size()) {
    // A short read: all there was when it was read. More that came since is read by the read
    // queued now, which Asio tries at once.
    if (!consume(early_read_.data(), n)) return;
    if (state_ != State::finished) wait_readable();
    return;
  }
  boost::system::error_code ec;
  char* buffer = read_buffer();
  std::size_t size = 0;
  if (n > 0) {  // early_read_ is full: the rest follows it in the thread's buffer
    std::memcpy(buffer, early_read_.data(), n);
    size = n;
  }
  bool eof = false;
  for (int reads = 0;; ++reads) {
    const std::size_t got = socket_.read_some(net::buffer(buffer + size, read_chunk - size), ec);
    if (ec == net::error::would_block || ec == net::error::try_again) {
      ec = {};
      break;
    }
    if (ec == net::error::eof) {
      eof = true;
      break;
    }
    if (ec) return finish(ec.message());
    size += got;
    if (size < read_chunk) break;  // a short read: the socket is drained for now
    if (!consume(buffer, size)) return;
    size = 0;
    if (reads + 1 == max_reads_per_wake) {
      // Other connections' turn; what is left is read after them (no edge would announce it).
      return net::post(socket_.get_executor(), [self = this->shared_from_this()] {
        self->on_readable(boost::system::error_code(), 0);
      });
    }
  }
  if (size > 0 && !consume(buffer, size)) return;
  if (eof) return end_of_input();
  if (state_ != State::finished) wait_readable();
}

template <class Executor>
void RawWebSocketSession<Executor>::end_of_input() {
  finish(state_ == State::draining ? "closed" : "closed by the client without a close frame");
}

template <class Executor>
bool RawWebSocketSession<Executor>::consume(char* data, std::size_t size) {
  last_read_ = steady::now();
  ping_sent_ = false;
  if (state_ == State::draining) return true;  // waiting for the client's FIN: input is discarded
  const auto failure = reader_.feed(data, size, *this);
  if (failure.code != 0) {
    core_->log(LogLevel::debug,
               fmt::format("websocket {}: {} (close {})", user(), failure.reason, failure.code));
    close_and_end(failure.code, failure.reason);
  }
  return state_ != State::finished;
}

template <class Executor>
bool RawWebSocketSession<Executor>::on_message(bool text, std::string_view payload) {
  if (state_ != State::open) return true;  // closing: the client's close is what matters now
  if (access_) {
    ++access_->messages_in;
    access_->bytes_in += payload.size();
  }
  if (!text)
    logic_->on_binary();
  else
    logic_->on_message(payload);
  schedule_deadline();  // a refresh may have moved the token's deadline
  return state_ != State::finished;
}

template <class Executor>
bool RawWebSocketSession<Executor>::on_ping(std::string_view payload) {
  if (state_ != State::open) return true;
  const auto frame = ws::make_frame(ws::Opcode::pong, payload);
  const net::const_buffer b(frame.data(), frame.size());
  return send_bytes(&b, 1);
}

template <class Executor>
bool RawWebSocketSession<Executor>::on_pong(std::string_view) {
  return true;
}  // last_read_ moved already

template <class Executor>
bool RawWebSocketSession<Executor>::on_close(std::uint16_t code, std::string_view) {
  peer_close_code_ = code != 0 ? code : 1005;
  if (state_ == State::closing) {
    // The answer to our close: the server ends the TCP connection first (RFC 6455 7.1.1).
    teardown();
  } else if (state_ == State::open) {
    // The client closes: answer with its code, then end.
    state_ = State::closing;
    out_.close(true);
    close_code_ = 0;
    const auto frame = ws::make_frame(ws::Opcode::close, code != 0 ? ws::close_payload(code, "") : "");
    const net::const_buffer b(frame.data(), frame.size());
    end_after_write_ = true;
    if (send_bytes(&b, 1) && !writing_async_) teardown();
  }
  return false;
}

// --- writing ---------------------------------------------------------------------------------

template <class Executor>
void RawWebSocketSession<Executor>::send_text(std::shared_ptr<const std::string> message) {
  enqueue(std::move(message), nullptr);
}

template <class Executor>
void RawWebSocketSession<Executor>::send_event(const EventPtr& event, bool snapshot) {
  enqueue(event->wire(snapshot), event);
}

template <class Executor>
void RawWebSocketSession<Executor>::send_event_once(const EventPtr& event) {
  enqueue(event->wire_once(false), event);
}

template <class Executor>
void RawWebSocketSession<Executor>::enqueue(std::shared_ptr<const std::string> bytes, const EventPtr& event) {
  auto pushed = out_.push(std::move(bytes), event);
  if (pushed.too_slow) {
    net::post(socket_.get_executor(),
              [self = this->shared_from_this(), reason = std::move(*pushed.too_slow)] {
                self->start_close(1013, reason);
              });
    return;
  }
  if (!pushed.wake) return;
  // Output made while this connection's input is handled (a request's reply, and the decision
  // that came with it) is written when that input is done, in one frame, without a trip through
  // the io_context's queue. In this order: reading_ is the connection's thread's to read.
  if (socket_.get_executor().running_in_this_thread() && reading_) {
    flush_after_read_ = true;
    return;
  }
  net::post(socket_.get_executor(), [self = this->shared_from_this()] { self->do_write(); });
}

template <class Executor>
void RawWebSocketSession<Executor>::do_write() {
  if (state_ != State::open || writing_async_) return;  // the async write's end comes back here
  std::string& payload = frame_payload();
  for (int frames = 0; frames < max_frames_per_wake; ++frames) {
    // Everything pending goes in one frame, newline-separated (the protocol's batching).
    const std::size_t messages = out_.take(payload, max_frame_bytes);
    if (messages == 0) {
      if (payload.capacity() > max_frame_bytes) std::string().swap(payload);  // one huge message
      if (close_pending_) {
        auto pending = std::move(close_pending_);
        auto& [code, reason] = *pending;
        start_close(code, reason);
      }
      return;
    }
    char header[10];
    const auto h = ws::write_header(header, ws::Opcode::text, payload.size());
    const std::array<net::const_buffer, 2> buffers{net::const_buffer(header, h),
                                                   net::const_buffer(payload.data(), payload.size())};
    if (!send_bytes(buffers.data(), buffers.size())) return;
    if (writing_async_) {
      // Counted once the kernel took it all (on_async_written).
      unsent_->messages += messages;
      unsent_->payload += payload.size();
      return;
    }
    count_written(messages, payload.size());
  }
  net::post(socket_.get_executor(), [self = this->shared_from_this()] { self->do_write(); });
}

template <class Executor>
void RawWebSocketSession<Executor>::count_written(std::size_t messages, std::size_t bytes) {
  core_->metrics.frames_written.fetch_add(1, std::memory_order_relaxed);
  core_->metrics.messages_pushed.fetch_add(messages, std::memory_order_relaxed);
  core_->metrics.bytes_pushed.fetch_add(bytes, std::memory_order_relaxed);
  if (access_) {
    access_->messages_out += messages;
    access_->bytes_out += bytes;
  }
}

template <class Executor>
bool RawWebSocketSession<Executor>::send_bytes(const net::const_buffer* buffers, std::size_t count) {
  if (state_ == State::finished) return false;
  std::size_t total = 0;
  for (std::size_t i = 0; i < count; ++i) total += buffers[i].size();
  if (writing_async_) {
    // Behind the write in flight: in order, after it.
    for (std::size_t i = 0; i < count; ++i)
      unsent_->backlog.append(static_cast<const char*>(buffers[i].data()), buffers[i].size());
    return true;
  }
  boost::system::error_code ec;
  std::size_t written = 0;
  if (count == 1)
    written = socket_.write_some(net::const_buffer(buffers[0]), ec);
  else
    written = socket_.write_some(std::array<net::const_buffer, 2>{buffers[0], buffers[1]}, ec);
  if (ec == net::error::would_block || ec == net::error::try_again) {
    ec = {};
    written = 0;
  }
  if (ec) {
    finish(fmt::format("write failed: {}", ec.message()));
    return false;
  }
  if (written == total) return true;
  // The kernel's buffer is full: the rest waits here and goes out with an async write (which
  // watches for writability without missing it).
  if (!unsent_) unsent_ = std::make_unique<Unsent>();
  std::size_t skip = written;
  for (std::size_t i = 0; i < count; ++i) {
    const auto* p = static_cast<const char*>(buffers[i].data());
    const auto size = buffers[i].size();
    if (skip >= size) {
      skip -= size;
      continue;
    }
    unsent_->bytes.append(p + skip, size - skip);
    skip = 0;
  }
  start_async_write();
  return true;
}

template <class Executor>
void RawWebSocketSession<Executor>::start_async_write() {
  writing_async_ = true;
  net::async_write(socket_, net::buffer(unsent_->bytes),
                   [self = this->shared_from_this()](boost::system::error_code ec, std::size_t) {
                     self->on_async_written(ec);
                   });
}

template <class Executor>
void RawWebSocketSession<Executor>::on_async_written(boost::system::error_code ec) {
  writing_async_ = false;
  if (state_ == State::finished) return;
  if (ec) return finish(fmt::format("write failed: {}", ec.message()));
  if (unsent_->messages > 0) count_written(unsent_->messages, unsent_->payload);
  if (!unsent_->backlog.empty()) {
    // What was made meanwhile goes next (its frames are counted as they were made: none are data).
    unsent_->bytes.swap(unsent_->backlog);
    unsent_->backlog.clear();
    unsent_->messages = unsent_->payload = 0;
    return start_async_write();
  }
  unsent_.reset();  // an idle connection keeps no write buffer
  if (end_after_write_) return teardown();
  do_write();
}

// --- closing ---------------------------------------------------------------------------------

template <class Executor>
void RawWebSocketSession<Executor>::close(std::uint16_t code, std::string reason) {
  net::post(socket_.get_executor(), [self = this->shared_from_this(), code, reason = std::move(reason)] {
    self->start_close(code, reason);
  });
}

template <class Executor>
void RawWebSocketSession<Executor>::shutdown() {
  close(ws::close_going_away, "going away");
}

template <class Executor>
void RawWebSocketSession<Executor>::abort() {
  net::post(socket_.get_executor(), [self = this->shared_from_this()] { self->finish("aborted"); });
}

template <class Executor>
void RawWebSocketSession<Executor>::post(std::function<void()> fn) {
  net::post(socket_.get_executor(), [self = this->shared_from_this(), fn = std::move(fn)] {
    if (self->state_ != State::finished) fn();
  });
}

template <class Executor>
void RawWebSocketSession<Executor>::start_close(std::uint16_t code, std::string_view reason) {
  if (state_ != State::open) return;
  if (writing_async_ || !out_.empty()) {
    // What is queued (a decision being pushed while the server drains) goes first, within
    // handshake_timeout: a client that stopped reading (1013) is not waited for longer.
    if (close_pending_) return;
    close_pending_ = std::make_unique<std::pair<std::uint16_t, std::string>>(code, std::string(reason));
    close_deadline_ = steady::now() + core_->ctx->options.handshake_timeout;
    schedule_deadline();
    if (!writing_async_) do_write();
    return;
  }
  state_ = State::closing;
  close_code_ = code;
  out_.close(false);
  const auto frame = ws::make_frame(ws::Opcode::close, ws::close_payload(code, reason));
  const net::const_buffer b(frame.data(), frame.size());
  if (!send_bytes(&b, 1)) return;
  // The client answers with its close frame (then the connection ends), or is cut after this.
  close_deadline_ = steady::now() + core_->ctx->options.handshake_timeout;
  schedule_deadline();
}

template <class Executor>
void RawWebSocketSession<Executor>::close_and_end(std::uint16_t code, std::string_view reason) {
  if (state_ == State::finished || state_ == State::draining) return;
  const bool sent_close = state_ == State::closing;
  state_ = State::closing;
  out_.close(true);
  if (!sent_close) {
    close_code_ = code;
    const auto frame = ws::make_frame(ws::Opcode::close, ws::close_payload(code, reason));
    const net::const_buffer b(frame.data(), frame.size());
    end_after_write_ = true;
    if (!send_bytes(&b, 1)) return;
    if (writing_async_) return;  // teardown once written
  }
  teardown();
}

template <class Executor>
void RawWebSocketSession<Executor>::teardown() {
  if (state_ == State::finished || state_ == State::draining) return;
  // FIN after the last frame; what the client still sends is read and discarded until its FIN
  // (closing with unread input would reset the connection, and the close frame with it).
  state_ = State::draining;
  boost::system::error_code ec;
  socket_.shutdown(tcp::socket::shutdown_send, ec);
  if (ec) return finish("closed");
  close_deadline_ = steady::now() + core_->ctx->options.handshake_timeout;
  schedule_deadline();
}

// --- deadlines -------------------------------------------------------------------------------

template <class Executor>
std::shared_ptr<DeadlineTarget> RawWebSocketSession<Executor>::lock_target() {
  auto self = this->weak_from_this().lock();
  return self ? std::static_pointer_cast<DeadlineTarget>(self) : nullptr;
}

template <class Executor>
void RawWebSocketSession<Executor>::deadline_passed() {
  net::dispatch(socket_.get_executor(), [self = this->shared_from_this()] { self->on_deadline(); });
}

template <class Executor>
void RawWebSocketSession<Executor>::schedule_deadline() {
  if (state_ == State::finished) return;
  auto next = steady::time_point::max();
  if (state_ == State::open) {
    const auto idle = core_->ctx->options.idle_timeout;
    if (idle.count() > 0) next = ping_sent_ ? last_read_ + idle : last_read_ + idle / 2;
    if (logic_)
      if (auto when = logic_->next_deadline()) next = std::min(next, *when);
    if (close_pending_) next = std::min(next, close_deadline_);
  } else {
    next = close_deadline_;
  }
  if (next < scheduled_) {
    scheduled_ = next;
    deadlines_->at(slot_, next);
  }
}

template <class Executor>
void RawWebSocketSession<Executor>::on_deadline() {
  if (state_ == State::finished) return;
  scheduled_ = steady::time_point::max();  // the entry that fired is gone
  const auto now = steady::now();
  if (state_ != State::open) {
    if (now >= close_deadline_)
      return finish(state_ == State::closing ? "close handshake timed out" : "closed");
  } else {
    if (close_pending_ && now >= close_deadline_) return finish("queued output not taken before the close");
    const auto idle = core_->ctx->options.idle_timeout;
    if (idle.count() > 0) {
      if (ping_sent_ && now >= last_read_ + idle) return finish("idle timeout");
      if (!ping_sent_ && now >= last_read_ + idle / 2) {
        ping_sent_ = true;  // answered by a pong (any input counts)
        const auto frame = ws::make_frame(ws::Opcode::ping, "");
        const net::const_buffer b(frame.data(), frame.size());
        if (!send_bytes(&b, 1)) return;
      }
    }
    if (logic_)
      if (auto when = logic_->next_deadline(); when && now >= *when) logic_->on_deadline(now);
  }
  schedule_deadline();
}

template <class Executor>
void RawWebSocketSession<Executor>::finish(std::string_view why) {
  if (state_ == State::finished) return;
  const bool opened = logic_.has_value();
  state_ = State::finished;
  out_.close(true);
  if (logic_) logic_->unsubscribe_all();  // no more events, and no callback keeps us alive
  core_->log(LogLevel::debug, fmt::format("websocket {}: ended: {}", user(), why));
  if (opened && access_) {
    // Who closed: the code this side sent, else the client's, else none (1006: cut).
    const auto code = close_code_ != 0 ? close_code_ : peer_close_code_;
    const auto ms = std::chrono::duration<double, std::milli>(steady::now() - access_->started).count();
    core_->access(fmt::format(
        "ws user={} peer={} route=/v1/ws close={} by={} in={} in_bytes={} out={} out_bytes={} ms={:.3f}",
        user(), access_->peer, code != 0 ? code : 1006,
        close_code_ != 0 ? "server" : (code != 0 ? "client" : "-"), access_->messages_in, access_->bytes_in,
        access_->messages_out, access_->bytes_out, ms));
  }
  boost::system::error_code ec;
  socket_.close(ec);  // the pending read ends with operation_aborted
  unsent_.reset();
}

template class RawWebSocketSession<net::io_context::executor_type>;
template class RawWebSocketSession<net::strand<net::io_context::executor_type>>;

void start_raw_websocket(std::shared_ptr<GatewayCore> core, tcp::socket socket, const Request& req,
                         std::string user, std::optional<std::chrono::system_clock::time_point> token_expires,
                         std::string_view already_read) {
  // The connection leaves its type-erased executor for the io_context's own (or a strand of the
  // host's io_context): the session's socket and its pending read are smaller by ~100 bytes.
  auto& ioc = static_cast<net::io_context&>(net::query(socket.get_executor(), net::execution::context));
  boost::system::error_code ec;
  const auto protocol = socket.local_endpoint(ec).protocol();
  const auto fd = ec ? -1 : socket.release(ec);
  if (ec || fd < 0) {
    core->log(LogLevel::debug, fmt::format("websocket: cannot take the connection: {}", ec.message()));
    core->open_connections.fetch_sub(1);
    return;
  }
  auto start = [&](auto executor) {
    using Ws = RawWebSocketSession<decltype(executor)>;
    typename Ws::Socket own(executor);
    own.assign(protocol, fd, ec);
    if (ec) {
      ::close(fd);
      core->open_connections.fetch_sub(1);
      return;
    }
    std::make_shared<Ws>(core, std::move(own))->run(req, std::move(user), token_expires, already_read);
  };
  if (core->host_context)
    start(net::make_strand(ioc));
  else
    start(ioc.get_executor());
}

}  // namespace pushbook::detail
