// The protocol v1 client: Beast underneath, pimpl above.
#include <pushbook/client.hpp>

#include <fmt/format.h>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <thread>

namespace pushbook::client {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = net::ip::tcp;

namespace {
Error failure(std::string what) { return Error(errc::internal, std::move(what)); }

errc errc_for_status(unsigned status) {
  switch (status) {
    case 401: return errc::unauthorized;
    case 403: return errc::forbidden;
    case 404: return errc::not_found;
    case 429: return errc::rate_limited;
    case 503: return errc::overloaded;
    default: return errc::internal;
  }
}
}  // namespace

struct WsClient::impl : std::enable_shared_from_this<impl> {
  net::io_context ioc{1};
  websocket::stream<beast::tcp_stream> ws{ioc};
  beast::flat_buffer buffer;
  std::thread thread;

  mutable std::mutex mutex;
  std::condition_variable cv;
  std::map<std::int64_t, boost::json::object> replies;
  std::deque<boost::json::object> messages;
  std::deque<boost::json::object> unmatched;
  std::int64_t next_id = 1;
  std::map<std::int64_t, bool> waiting;
  bool open = false;
  std::optional<CloseInfo> closed;
  std::uint64_t frames = 0;

  void start_reading() {
    ws.async_read(buffer,
                  [self = shared_from_this()](beast::error_code ec, std::size_t n) { self->on_read(ec, n); });
  }

  void on_read(beast::error_code ec, std::size_t n) {
    if (ec) {
      std::lock_guard lock(mutex);
      open = false;
      // A close frame received counts even when the TCP teardown after it failed (the server may
      // cut the connection right after its close frame).
      CloseInfo info;
      info.code = static_cast<std::uint16_t>(ws.reason().code);
      info.reason = std::string(ws.reason().reason.data(), ws.reason().reason.size());
      closed = info;
      cv.notify_all();
      return;
    }
    const auto text = beast::buffers_to_string(buffer.data());
    buffer.consume(n);
    {
      std::lock_guard lock(mutex);
      ++frames;
      std::string_view rest = text;
      while (!rest.empty()) {  // a server frame holds one JSON object per line
        const auto nl = rest.find('\n');
        const auto line = rest.substr(0, nl);
        rest = nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
        if (line.empty()) continue;
        boost::system::error_code pec;
        auto v = boost::json::parse(line, pec);
        if (pec || !v.is_object()) {
          messages.push_back({{"type", "unparsable"}, {"text", line}});
          continue;
        }
        auto& o = v.as_object();
        if (o["type"] == "reply") {
          const auto* id = o.if_contains("id");
          if (id && id->is_int64() && waiting.contains(id->get_int64()))
            replies[id->get_int64()] = std::move(o);
          else
            unmatched.push_back(std::move(o));
        } else {
          messages.push_back(std::move(o));
        }
      }
    }
    cv.notify_all();
    start_reading();
  }

  // Writes queue up on the io thread and go out one async_write at a time (Beast allows one
  // write in flight, next to the read that is always pending).
  struct Outgoing {
    std::shared_ptr<std::string> text;
    bool binary;
    std::shared_ptr<std::promise<beast::error_code>> done;
  };
  std::deque<Outgoing> outgoing;  // io thread only
  bool writing = false;

  void do_write() {
    if (writing || outgoing.empty()) return;
    writing = true;
    ws.binary(outgoing.front().binary);
    ws.async_write(net::buffer(*outgoing.front().text),
                   [self = shared_from_this()](beast::error_code ec, std::size_t) {
                     auto done = std::move(self->outgoing.front().done);
                     self->outgoing.pop_front();
                     self->writing = false;
                     done->set_value(ec);
                     self->do_write();
                   });
  }

  result<void> write(std::string text, bool binary) {
    {
      std::lock_guard lock(mutex);
      if (!open) return failure("connection closed");
    }
    auto done = std::make_shared<std::promise<beast::error_code>>();
    auto future = done->get_future();
    net::post(ioc, [self = shared_from_this(), text = std::make_shared<std::string>(std::move(text)), binary,
                    done] {
      self->outgoing.push_back({text, binary, done});
      self->do_write();
    });
    if (future.wait_for(std::chrono::seconds(10)) != std::future_status::ready)
      return failure("write timed out");
    if (auto ec = future.get()) return failure("write failed: " + ec.message());
    return {};
  }
};

result<std::unique_ptr<WsClient>> WsClient::connect(ConnectOptions o) {
  auto p = std::make_shared<impl>();
  beast::error_code ec;
  tcp::resolver resolver(p->ioc);
  auto endpoints = resolver.resolve(o.host, std::to_string(o.port), ec);
  if (ec) return failure(fmt::format("cannot resolve {}: {}", o.host, ec.message()));
  auto& tcp_layer = beast::get_lowest_layer(p->ws);
  tcp_layer.expires_after(o.timeout);
  tcp_layer.connect(endpoints, ec);
  if (ec) return failure(fmt::format("cannot connect to {}:{}: {}", o.host, o.port, ec.message()));
  p->ws.set_option(websocket::stream_base::decorator([o](websocket::request_type& req) {
    if (!o.token.empty() && !o.token_as_subprotocol) req.set(http::field::authorization, "Bearer " + o.token);
    if (!o.token.empty() && o.token_as_subprotocol)
      req.set(http::field::sec_websocket_protocol, "pushbook.v1, bearer." + o.token);
    if (!o.origin.empty()) req.set(http::field::origin, o.origin);
  }));
  p->ws.read_message_max(64 * 1024 * 1024);
  websocket::response_type res;
  p->ws.handshake(res, o.host + ":" + std::to_string(o.port), o.target, ec);
  if (ec) {
    const auto status = res.result_int();
    if (status >= 400) {
      std::string message = fmt::format("HTTP {}", status);
      boost::system::error_code pec;
      auto body = boost::json::parse(res.body(), pec);
      if (!pec && body.is_object())
        if (auto e = body.as_object().if_contains("error"); e && e->is_object())
          if (auto m = e->as_object().if_contains("message"); m && m->is_string())
            message += ": " + std::string(m->get_string());
      return Error(errc_for_status(status), message);
    }
    return failure("handshake failed: " + ec.message());
  }
  tcp_layer.expires_never();
  p->ws.text(true);
  p->open = true;
  p->start_reading();
  p->thread = std::thread([p] { p->ioc.run(); });
  return std::unique_ptr<WsClient>(new WsClient(p));
}

WsClient::WsClient(std::shared_ptr<impl> p) : impl_(std::move(p)) {}

WsClient::~WsClient() {
  net::post(impl_->ioc, [p = impl_.get()] {
    beast::error_code ec;
    beast::get_lowest_layer(p->ws).socket().close(ec);
  });
  if (impl_->thread.joinable()) impl_->thread.join();
  // The io thread ends by itself once the connection is gone, possibly before running what was
  // posted after that: run it here, so that no handler (and the reference it holds) is left.
  impl_->ioc.restart();
  impl_->ioc.poll();
}

result<boost::json::object> WsClient::request(boost::json::object req, std::chrono::milliseconds timeout) {
  std::int64_t id;
  {
    std::lock_guard lock(impl_->mutex);
    id = impl_->next_id++;
    impl_->waiting[id] = true;
  }
  req["id"] = id;
  if (auto r = impl_->write(boost::json::serialize(req), false); !r) return r.error();
  std::unique_lock lock(impl_->mutex);
  const bool got =
      impl_->cv.wait_for(lock, timeout, [&] { return impl_->replies.contains(id) || impl_->closed; });
  impl_->waiting.erase(id);
  if (!got || !impl_->replies.contains(id))
    return failure(impl_->closed ? "connection closed before the reply" : "no reply within the timeout");
  auto reply = std::move(impl_->replies[id]);
  impl_->replies.erase(id);
  return reply;
}

result<void> WsClient::send_text(std::string_view text) { return impl_->write(std::string(text), false); }
result<void> WsClient::send_binary(std::string_view data) { return impl_->write(std::string(data), true); }

std::optional<boost::json::object> WsClient::next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->mutex);
  impl_->cv.wait_for(lock, timeout, [&] { return !impl_->messages.empty() || impl_->closed; });
  if (impl_->messages.empty()) return std::nullopt;
  auto m = std::move(impl_->messages.front());
  impl_->messages.pop_front();
  return m;
}

std::optional<boost::json::object> WsClient::next_unmatched_reply(std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->mutex);
  impl_->cv.wait_for(lock, timeout, [&] { return !impl_->unmatched.empty() || impl_->closed; });
  if (impl_->unmatched.empty()) return std::nullopt;
  auto m = std::move(impl_->unmatched.front());
  impl_->unmatched.pop_front();
  return m;
}

std::optional<CloseInfo> WsClient::wait_closed(std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->mutex);
  impl_->cv.wait_for(lock, timeout, [&] { return impl_->closed.has_value(); });
  return impl_->closed;
}

void WsClient::close(std::uint16_t code, std::string_view reason) {
  if (!is_open()) return;
  net::post(impl_->ioc, [p = impl_.get(), code, reason = std::string(reason)] {
    p->ws.async_close(websocket::close_reason(static_cast<websocket::close_code>(code), reason),
                      [](beast::error_code) {});
  });
  wait_closed(2s);
}

bool WsClient::is_open() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->open;
}

std::uint64_t WsClient::frames_received() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->frames;
}

// --- HTTP -----------------------------------------------------------------------------------

boost::json::value HttpResponse::json() const {
  boost::system::error_code ec;
  auto v = boost::json::parse(body, ec);
  return ec ? boost::json::value(nullptr) : v;
}

std::string HttpResponse::header(const std::string& name) const {
  auto it = headers.find(name);
  return it == headers.end() ? std::string() : it->second;
}

struct HttpClient::impl {
  std::string host;
  std::uint16_t port;
  std::chrono::milliseconds timeout;
  net::io_context ioc;
  std::optional<beast::tcp_stream> stream;
  beast::flat_buffer buffer;
};

HttpClient::HttpClient(std::string host, std::uint16_t port, std::chrono::milliseconds timeout)
    : impl_(std::make_unique<impl>()) {
  impl_->host = std::move(host);
  impl_->port = port;
  impl_->timeout = timeout;
}

HttpClient::~HttpClient() = default;

result<HttpResponse> HttpClient::request(std::string_view method, std::string_view target, std::string body,
                                         const std::vector<std::pair<std::string, std::string>>& headers) {
  auto& m = *impl_;
  for (int attempt = 0; attempt < 2; ++attempt) {
    beast::error_code ec;
    if (!m.stream) {
      m.stream.emplace(m.ioc);
      tcp::resolver resolver(m.ioc);
      auto endpoints = resolver.resolve(m.host, std::to_string(m.port), ec);
      if (!ec) {
        m.stream->expires_after(m.timeout);
        m.stream->connect(endpoints, ec);
      }
      if (ec) {
        m.stream.reset();
        return failure(fmt::format("cannot connect to {}:{}: {}", m.host, m.port, ec.message()));
      }
      m.buffer.clear();
    }
    http::request<http::string_body> req{http::string_to_verb(method), target, 11};
    req.set(http::field::host, m.host);
    for (const auto& [k, v] : headers) req.set(k, v);
    if (!body.empty()) {
      if (req.find(http::field::content_type) == req.end())
        req.set(http::field::content_type, "application/json");
      req.body() = body;
    }
    req.prepare_payload();
    m.stream->expires_after(m.timeout);
    http::write(*m.stream, req, ec);
    http::response<http::string_body> res;
    if (!ec) http::read(*m.stream, m.buffer, res, ec);
    if (ec) {
      m.stream.reset();
      // A keep-alive connection the server closed meanwhile: try once on a new one.
      if (attempt == 0 && (ec == http::error::end_of_stream || ec == net::error::connection_reset ||
                           ec == net::error::broken_pipe || ec == net::error::eof))
        continue;
      return failure(fmt::format("HTTP {} {} failed: {}", method, target, ec.message()));
    }
    HttpResponse out;
    out.status = res.result_int();
    for (const auto& field : res) {
      std::string name(field.name_string());
      for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      out.headers[name] = std::string(field.value());
    }
    out.body = std::move(res.body());
    if (!res.keep_alive()) m.stream.reset();
    return out;
  }
  return failure("unreachable");
}

}  // namespace pushbook::client
