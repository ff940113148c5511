// The protocol v1 client: Beast underneath, pimpl above.
#include <pushbook/client.hpp>

#include <fmt/format.h>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/url/parse.hpp>

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
namespace ssl = net::ssl;

namespace {
Error failure(std::string what) { return Error(errc::internal, std::move(what)); }

using TlsStream = beast::ssl_stream<beast::tcp_stream>;

// One SSL context per client: the CAs to trust (or none checked, insecure), TLS 1.2 at least,
// ALPN http/1.1, a client certificate when given.
result<std::shared_ptr<ssl::context>> client_context(const TlsClientOptions& t) {
  auto ctx = std::make_shared<ssl::context>(ssl::context::tls_client);
  SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_2_VERSION);
  static const unsigned char alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  SSL_CTX_set_alpn_protos(ctx->native_handle(), alpn, sizeof alpn);
  beast::error_code ec;
  if (t.insecure) {
    ctx->set_verify_mode(ssl::verify_none);
  } else {
    ctx->set_verify_mode(ssl::verify_peer);
    if (t.ca_file.empty())
      ctx->set_default_verify_paths(ec);
    else
      ctx->load_verify_file(t.ca_file, ec);
    if (ec) return Error(errc::bad_request, fmt::format("TLS CA file '{}': {}", t.ca_file, ec.message()));
  }
  if (!t.cert_file.empty() || !t.key_file.empty()) {
    ctx->use_certificate_chain_file(t.cert_file, ec);
    if (ec)
      return Error(errc::bad_request,
                   fmt::format("TLS client certificate '{}': {}", t.cert_file, ec.message()));
    ctx->use_private_key_file(t.key_file, ssl::context::pem, ec);
    if (ec) return Error(errc::bad_request, fmt::format("TLS client key '{}': {}", t.key_file, ec.message()));
  }
  return ctx;
}

// SNI (names only, never an address) and the check of the certificate's name.
result<void> prepare_tls(TlsStream& stream, const TlsClientOptions& t, const std::string& host) {
  const std::string& name = t.server_name.empty() ? host : t.server_name;
  beast::error_code ec;
  net::ip::make_address(name, ec);
  // SSL_set_tlsext_host_name() without its macro's old-style cast.
  if (ec && SSL_ctrl(stream.native_handle(), SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
                     const_cast<char*>(name.c_str())) != 1)
    return failure(fmt::format("cannot send '{}' as the TLS server name", name));
  if (!t.insecure) stream.set_verify_callback(ssl::host_name_verification(name));
  return {};
}

// Runs `ioc`, which no other thread runs yet, until the operation just started on it has
// completed. Its stream's expiry (expires_after) bounds it: Beast applies that to asynchronous
// operations only, so the client's steps are asynchronous ones run to completion here. (Name
// resolution stays a blocking call, bounded by the system's resolver.)
void complete(net::io_context& ioc) {
  ioc.restart();
  ioc.run();
}

std::string tls_failure(std::string_view what, const beast::error_code& ec) {
  // OpenSSL's reason for a failed verification ("certificate verify failed") is in ec.
  return fmt::format("{}: {}", what, ec.message());
}

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
  std::shared_ptr<ssl::context> tls_context;  // before the stream that uses it
  std::unique_ptr<websocket::stream<beast::tcp_stream>> plain;
  std::unique_ptr<websocket::stream<TlsStream>> tls;
  beast::flat_buffer buffer;

  // Calls f with whichever WebSocket stream this client has.
  template <class F>
  decltype(auto) with_ws(F&& f) {
    return tls ? f(*tls) : f(*plain);
  }
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
    with_ws([&](auto& ws) {
      ws.async_read(
          buffer, [self = shared_from_this()](beast::error_code ec, std::size_t n) { self->on_read(ec, n); });
    });
  }

  void on_read(beast::error_code ec, std::size_t n) {
    if (ec) {
      std::lock_guard lock(mutex);
      open = false;
      // A close frame received counts even when the TCP teardown after it failed (the server may
      // cut the connection right after its close frame).
      CloseInfo info;
      with_ws([&](auto& ws) {
        info.code = static_cast<std::uint16_t>(ws.reason().code);
        info.reason = std::string(ws.reason().reason.data(), ws.reason().reason.size());
      });
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
    with_ws([&](auto& ws) {
      ws.binary(outgoing.front().binary);
      ws.async_write(net::buffer(*outgoing.front().text),
                     [self = shared_from_this()](beast::error_code ec, std::size_t) {
                       auto done = std::move(self->outgoing.front().done);
                       self->outgoing.pop_front();
                       self->writing = false;
                       done->set_value(ec);
                       self->do_write();
                     });
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

result<ConnectOptions> ConnectOptions::from_url(std::string_view url) {
  auto u = Url::parse(url);
  if (!u) return u.error();
  ConnectOptions o;
  o.host = u->host;
  o.port = u->port;
  o.target = u->target;
  o.tls.enabled = u->tls;
  return o;
}

namespace {
// The upgrade on a connected stream of either kind.
template <class Ws>
result<void> ws_handshake(net::io_context& ioc, Ws& ws, const ConnectOptions& o) {
  ws.set_option(websocket::stream_base::decorator([o](websocket::request_type& req) {
    if (!o.token.empty() && !o.token_as_subprotocol) req.set(http::field::authorization, "Bearer " + o.token);
    if (!o.token.empty() && o.token_as_subprotocol)
      req.set(http::field::sec_websocket_protocol, "pushbook.v1, bearer." + o.token);
    if (!o.origin.empty()) req.set(http::field::origin, o.origin);
  }));
  ws.read_message_max(64 * 1024 * 1024);
  websocket::response_type res;
  beast::error_code ec;
  // The Host header: an IPv6 address in brackets.
  const auto host = o.host.find(':') == std::string::npos ? o.host : "[" + o.host + "]";
  ws.async_handshake(res, host + ":" + std::to_string(o.port), o.target,
                     [&ec](beast::error_code e) { ec = e; });
  complete(ioc);
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
  beast::get_lowest_layer(ws).expires_never();
  ws.text(true);
  return {};
}
}  // namespace

result<std::unique_ptr<WsClient>> WsClient::connect(ConnectOptions o) {
  auto p = std::make_shared<impl>();
  if (o.tls.enabled) {
    auto ctx = client_context(o.tls);
    if (!ctx) return ctx.error();
    p->tls_context = std::move(*ctx);
    p->tls = std::make_unique<websocket::stream<TlsStream>>(p->ioc, *p->tls_context);
    if (auto r = prepare_tls(p->tls->next_layer(), o.tls, o.host); !r) return r.error();
  } else {
    p->plain = std::make_unique<websocket::stream<beast::tcp_stream>>(p->ioc);
  }
  beast::error_code ec;
  tcp::resolver resolver(p->ioc);
  auto endpoints = resolver.resolve(o.host, std::to_string(o.port), ec);
  if (ec) return failure(fmt::format("cannot resolve {}: {}", o.host, ec.message()));
  auto r = p->with_ws([&](auto& ws) -> result<void> {
    auto& tcp_layer = beast::get_lowest_layer(ws);
    tcp_layer.expires_after(o.timeout);
    tcp_layer.async_connect(endpoints, [&ec](beast::error_code e, const tcp::endpoint&) { ec = e; });
    complete(p->ioc);
    if (ec) return failure(fmt::format("cannot connect to {}:{}: {}", o.host, o.port, ec.message()));
    if constexpr (std::is_same_v<std::decay_t<decltype(ws)>, websocket::stream<TlsStream>>) {
      ws.next_layer().async_handshake(ssl::stream_base::client, [&ec](beast::error_code e) { ec = e; });
      complete(p->ioc);
      if (ec) return failure(tls_failure(fmt::format("TLS handshake with {}:{} failed", o.host, o.port), ec));
    }
    return ws_handshake(p->ioc, ws, o);
  });
  if (!r) return r.error();
  p->ioc.restart();  // stopped by the steps above; its own thread runs it from here
  p->open = true;
  p->start_reading();
  p->thread = std::thread([p] { p->ioc.run(); });
  return std::unique_ptr<WsClient>(new WsClient(p));
}

WsClient::WsClient(std::shared_ptr<impl> p) : impl_(std::move(p)) {}

WsClient::~WsClient() {
  net::post(impl_->ioc, [p = impl_.get()] {
    beast::error_code ec;
    p->with_ws([&](auto& ws) { beast::get_lowest_layer(ws).socket().close(ec); });
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
    p->with_ws([&](auto& ws) {
      ws.async_close(websocket::close_reason(static_cast<websocket::close_code>(code), reason),
                     [](beast::error_code) {});
    });
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

result<Url> Url::parse(std::string_view text) {
  auto parsed = boost::urls::parse_uri(text);
  if (!parsed) return Error(errc::bad_request, fmt::format("'{}' is not a URL", text));
  const auto& u = *parsed;
  Url out;
  const std::string scheme = u.scheme();
  if (scheme == "ws" || scheme == "wss")
    out.websocket = true;
  else if (scheme != "http" && scheme != "https")
    return Error(errc::bad_request, fmt::format("'{}': the scheme must be ws, wss, http or https", text));
  out.tls = scheme == "wss" || scheme == "https";
  if (!u.has_authority() || u.host().empty())
    return Error(errc::bad_request, fmt::format("'{}' names no host", text));
  out.host = u.host_address();  // without the brackets of an IPv6 address
  if (u.has_port()) {
    if (u.port_number() == 0)
      return Error(errc::bad_request, fmt::format("'{}': a port must be 1-65535", text));
    out.port = u.port_number();
  } else {
    out.port = out.tls ? 443 : 80;
  }
  out.target = u.encoded_path().empty() ? "/" : std::string(u.encoded_path());
  if (u.has_query()) out.target += "?" + std::string(u.encoded_query());
  return out;
}

struct HttpClient::impl {
  std::string host;
  std::uint16_t port;
  std::chrono::milliseconds timeout;
  TlsClientOptions tls_options;
  net::io_context ioc;
  std::shared_ptr<ssl::context> tls_context;  // before the streams that use it
  std::optional<beast::tcp_stream> stream;
  std::optional<TlsStream> tls_stream;
  beast::flat_buffer buffer;

  bool connected() const { return stream || tls_stream; }
  void disconnect() {
    stream.reset();
    tls_stream.reset();
  }
  template <class F>
  decltype(auto) with_stream(F&& f) {
    return tls_stream ? f(*tls_stream) : f(*stream);
  }
};

HttpClient::HttpClient(std::string host, std::uint16_t port, std::chrono::milliseconds timeout,
                       TlsClientOptions tls)
    : impl_(std::make_unique<impl>()) {
  impl_->host = std::move(host);
  impl_->port = port;
  impl_->timeout = timeout;
  impl_->tls_options = std::move(tls);
}

result<std::unique_ptr<HttpClient>> HttpClient::from_url(std::string_view url, TlsClientOptions tls,
                                                         std::chrono::milliseconds timeout) {
  auto u = Url::parse(url);
  if (!u) return u.error();
  tls.enabled = u->tls;
  return std::make_unique<HttpClient>(u->host, u->port, timeout, std::move(tls));
}

HttpClient::~HttpClient() = default;

result<HttpResponse> HttpClient::request(std::string_view method, std::string_view target, std::string body,
                                         const std::vector<std::pair<std::string, std::string>>& headers) {
  auto& m = *impl_;
  for (int attempt = 0; attempt < 2; ++attempt) {
    beast::error_code ec;
    if (!m.connected()) {
      if (m.tls_options.enabled) {
        if (!m.tls_context) {
          auto ctx = client_context(m.tls_options);
          if (!ctx) return ctx.error();
          m.tls_context = std::move(*ctx);
        }
        m.tls_stream.emplace(m.ioc, *m.tls_context);
        if (auto r = prepare_tls(*m.tls_stream, m.tls_options, m.host); !r) {
          m.disconnect();
          return r.error();
        }
      } else {
        m.stream.emplace(m.ioc);
      }
      tcp::resolver resolver(m.ioc);
      auto endpoints = resolver.resolve(m.host, std::to_string(m.port), ec);
      auto& tcp_layer =
          m.with_stream([](auto& s) -> beast::tcp_stream& { return beast::get_lowest_layer(s); });
      if (!ec) {
        tcp_layer.expires_after(m.timeout);
        tcp_layer.async_connect(endpoints, [&ec](beast::error_code e, const tcp::endpoint&) { ec = e; });
        complete(m.ioc);
      }
      if (ec) {
        m.disconnect();
        return failure(fmt::format("cannot connect to {}:{}: {}", m.host, m.port, ec.message()));
      }
      if (m.tls_stream) {
        m.tls_stream->async_handshake(ssl::stream_base::client, [&ec](beast::error_code e) { ec = e; });
        complete(m.ioc);
        if (ec) {
          m.disconnect();
          return failure(tls_failure(fmt::format("TLS handshake with {}:{} failed", m.host, m.port), ec));
        }
      }
      m.buffer.clear();
    }
    http::request<http::string_body> req{http::string_to_verb(method), target, 11};
    req.set(http::field::host, m.host.find(':') == std::string::npos ? m.host : "[" + m.host + "]");
    for (const auto& [k, v] : headers) req.set(k, v);
    if (!body.empty()) {
      if (req.find(http::field::content_type) == req.end())
        req.set(http::field::content_type, "application/json");
      req.body() = body;
    }
    req.prepare_payload();
    http::response<http::string_body> res;
    m.with_stream([&](auto& s) {
      beast::get_lowest_layer(s).expires_after(m.timeout);
      http::async_write(s, req, [&ec](beast::error_code e, std::size_t) { ec = e; });
      complete(m.ioc);
      if (ec) return;
      http::async_read(s, m.buffer, res, [&ec](beast::error_code e, std::size_t) { ec = e; });
      complete(m.ioc);
    });
    if (ec) {
      m.disconnect();
      // A keep-alive connection the server closed meanwhile: try once on a new one.
      if (attempt == 0 &&
          (ec == http::error::end_of_stream || ec == net::error::connection_reset ||
           ec == net::error::broken_pipe || ec == net::error::eof || ec == ssl::error::stream_truncated))
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
    if (!res.keep_alive()) m.disconnect();
    return out;
  }
  return failure("unreachable");
}

}  // namespace pushbook::client
