// RedisBus: the EventBus backed by Redis.
//
// Threads: one Asio thread runs both connections (commands, pipelined; and the subscriber
// connection). Callers of publish/subscribe/last/history post a command to that thread and wait
// for its reply; many callers share the command connection's pipeline. publish_async and
// subscribe_async post and never wait: their replies are handled on the I/O thread (a
// subscribe_async's history read is queued from the confirmation's handler, and its reply
// applied there with the same catch-up rules as subscribe's). Catching subscribers up after a
// reconnect reads Redis with blocking calls, so it runs on a `control` thread, never on the I/O
// thread. Callbacks run on the subscriptions' executors, as with LocalBus.
//
// No gap and no duplicate between replay and live: a subscriber starts `buffering`; the topic's
// channel is SUBSCRIBEd and confirmed first, then the history is read (seq S, epoch E), then the
// buffered live events with seq <= S in epoch E are dropped and the others queued. PUBLISH runs in
// the same script as the INCR that numbers an event, so every event with seq > S reaches the
// confirmed channel, in seq order. A reconnect puts every exact-topic subscriber back into
// `buffering` and runs the same catch-up with since = the last seq it was given.
//
// Locking: `mutex` guards the channel registry (topic/pattern -> local subscribers); a
// subscription's own mutex guards its queue. Order: registry -> subscription.
#include <pushbook/redis_bus.hpp>

#include "detail/forced_unwind.hpp"
#include "detail/json_text.hpp"

#include <fmt/format.h>
#include <hiredis/hiredis.h>
#include <openssl/sha.h>
#include <boost/asio/connect.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <future>
#include <limits>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

namespace pushbook {
namespace {

namespace asio = boost::asio;
using generic_socket = asio::generic::stream_protocol::socket;
using reply_ptr = std::shared_ptr<redisReply>;
using reply_handler = std::function<void(result<reply_ptr>)>;

bool is_valid_pattern(std::string_view pattern) {
  if (pattern == "*") return true;
  if (pattern.size() > 2 && pattern.ends_with("/*"))
    return is_valid_topic(pattern.substr(0, pattern.size() - 2));
  return is_valid_topic(pattern);
}

// Where Redis is, parsed from RedisBusOptions::address.
struct endpoint_spec {
  bool unix_socket = false;
  std::string host, port, path, password;
  int database = 0;
};

endpoint_spec parse_address(const RedisBusOptions& o) {
  endpoint_spec e;
  e.password = o.password;
  e.database = o.database;
  std::string_view a = o.address;
  auto bad = [&] {
    return Exception(Error(errc::bad_request,
                           "a Redis address is redis://[:password@]host[:port][/db] or "
                           "unix:/path, not '" +
                               o.address + "'"));
  };
  if (a.starts_with("unix:")) {
    e.unix_socket = true;
    e.path = std::string(a.substr(5));
    if (e.path.empty()) throw bad();
    return e;
  }
  if (!a.starts_with("redis://")) throw bad();
  a.remove_prefix(8);
  if (auto at = a.rfind('@'); at != std::string_view::npos) {
    auto credentials = a.substr(0, at);
    if (auto colon = credentials.find(':'); colon != std::string_view::npos)
      credentials = credentials.substr(colon + 1);  // user:password, the user is not used
    e.password = std::string(credentials);
    a = a.substr(at + 1);
  }
  if (auto slash = a.find('/'); slash != std::string_view::npos) {
    auto db = a.substr(slash + 1);
    a = a.substr(0, slash);
    if (!db.empty()) {
      e.database = 0;
      for (char c : db) {
        if (c < '0' || c > '9' || e.database > 100000) throw bad();
        e.database = e.database * 10 + (c - '0');
      }
    }
  }
  e.port = "6379";
  if (auto colon = a.rfind(':'); colon != std::string_view::npos && a.find(']') == std::string_view::npos) {
    e.port = std::string(a.substr(colon + 1));
    a = a.substr(0, colon);
  }
  e.host = std::string(a);
  if (e.host.empty() || e.port.empty()) throw bad();
  return e;
}

std::string sha1_hex(std::string_view text) {
  unsigned char digest[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(text.data()), text.size(), digest);
  std::string out;
  for (unsigned char c : digest) out += fmt::format("{:02x}", c);
  return out;
}

// KEYS: epoch, seq, history stream, last. ARGV: data, history_limit, history_max_age_ms,
// topic_idle_ttl_ms, channel, candidate epoch, seq the publisher gives ('' for the next one).
// Returns {epoch, seq, time in microseconds}, or {epoch, current seq, ''} when the given seq is
// not above the topic's current one (a duplicate: nothing is written or published).
// A topic whose epoch key is gone (never published, expired, or Redis lost its data) starts a
// new numbering in a new epoch: whatever remains of the old one is deleted first.
// The given seq is compared and set here, in the same atomic script as the PUBLISH: two nodes
// relaying the same numbered event cannot both deliver it, and it costs no extra round trip.
// (Lua numbers are doubles: seq is at most 2^53, which publish() checks.)
constexpr std::string_view publish_script = R"lua(
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[1], epoch, 'PX', ARGV[4])
else
  if ARGV[7] ~= '' then
    local current = tonumber(redis.call('GET', KEYS[2]) or '0')
    if current >= tonumber(ARGV[7]) then return {tonumber(epoch), current, ''} end
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])  -- (a SET of the same value costs twice as much)
end
local seq
if ARGV[7] ~= '' then
  seq = ARGV[7]  -- kept as text: Lua would print a large number as 1e+15 in the entries below
  redis.call('SET', KEYS[2], seq, 'PX', ARGV[4])
else
  seq = redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local t = redis.call('TIME')
local us = t[1] .. string.format('%06d', tonumber(t[2]))
local entry = seq .. ':' .. us .. ':' .. ARGV[1]
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], seq .. '-0', 't', us, 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], entry, 'PX', ARGV[4])
redis.call('PUBLISH', ARGV[5], epoch .. ':' .. entry)
return {tonumber(epoch), tonumber(seq), us}
)lua";

// KEYS: epoch, seq, history stream, last. ARGV: since_seq, history_max_age_us, create ('1' to
// create the epoch when absent, as subscribe does), candidate epoch, topic_idle_ttl_ms,
// history_limit.
// Returns {epoch or '', seq, last entry or '', first seq kept in history or '', entries with
// seq > since as 'seq:us:data'}. Entries older than the age limit count as gone, and so do all
// but the newest history_limit: the publish script trims the stream approximately (MAXLEN ~,
// whole stream nodes at a time, which costs Redis less per publish), so it may hold a node's
// worth more than the limit, and the limit is applied here.
constexpr std::string_view read_script = R"lua(
local epoch = redis.call('GET', KEYS[1])
if not epoch and ARGV[3] == '1' then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('SET', KEYS[1], epoch, 'PX', ARGV[5])
end
if not epoch then return {'', '0', '', '', {}} end
local seq = redis.call('GET', KEYS[2]) or '0'
local last = redis.call('GET', KEYS[4]) or ''
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000000 + tonumber(t[2]) - tonumber(ARGV[2])
local since = tonumber(ARGV[1])
local first = ''
local out = {}
local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', ARGV[6])
for k = #newest, 1, -1 do
  local e = newest[k]
  local s = tonumber(string.match(e[1], '^(%d+)'))
  local f = e[2]
  local us, data
  for i = 1, #f, 2 do
    if f[i] == 't' then us = f[i + 1] elseif f[i] == 'd' then data = f[i + 1] end
  end
  if tonumber(us) >= oldest then
    if first == '' then first = tostring(s) end
    if s > since then out[#out + 1] = e[1]:match('^(%d+)') .. ':' .. us .. ':' .. data end
  end
end
return {epoch, seq, last, first, out}
)lua";

std::string_view reply_text(const redisReply* r) {
  return r && r->str ? std::string_view(r->str, r->len) : std::string_view();
}

std::uint64_t to_u64(std::string_view s) {
  std::uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return 0;
    v = v * 10 + static_cast<std::uint64_t>(c - '0');
  }
  return v;
}

// An event from its stored form "seq:us:data" (history entries, last value) in `epoch`.
EventPtr parse_entry(std::string_view topic, std::uint32_t epoch, std::string_view entry) {
  auto c1 = entry.find(':');
  if (c1 == std::string_view::npos) return nullptr;
  auto c2 = entry.find(':', c1 + 1);
  if (c2 == std::string_view::npos) return nullptr;
  const auto seq = to_u64(entry.substr(0, c1));
  const auto us = to_u64(entry.substr(c1 + 1, c2 - c1 - 1));
  boost::system::error_code ec;
  auto data = boost::json::parse(entry.substr(c2 + 1), ec);
  if (ec || seq == 0) return nullptr;
  const auto time = std::chrono::system_clock::time_point(
      std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::microseconds(us)));
  return std::make_shared<const Event>(std::string(topic), seq, time,
                                       std::make_shared<const boost::json::value>(std::move(data)), epoch);
}

// One connection to Redis, used only on the I/O thread. Commands are pipelined: written as they
// come (one write in flight, the rest batched), and replies are matched to them in order. In
// subscriber mode, "message"/"pmessage" pushes go to on_push instead.
class connection : public std::enable_shared_from_this<connection> {
 public:
  connection(asio::io_context& io, endpoint_spec spec, const RedisBusOptions& options, bool subscriber)
      : io_(io),
        socket_(io),
        connect_timer_(io),
        retry_timer_(io),
        spec_(std::move(spec)),
        options_(options),
        subscriber_(subscriber) {}
  ~connection() {
    if (reader_) redisReaderFree(reader_);
  }

  std::function<void()> on_ready;  // connected and handshaken
  std::function<void()> on_lost;   // was ready, now is not
  std::function<void(const reply_ptr&)> on_push;
  std::function<void(const std::string&)> on_handshake;  // sends what a fresh connection needs

  bool ready() const noexcept { return ready_; }

  void start() { do_connect(); }

  void shutdown() {
    stopped_ = true;
    retry_timer_.cancel();
    connect_timer_.cancel();
    close(Error(errc::shutting_down, "bus is closed"));
  }

  // Queues a command; `handler` gets its reply or an error (bus_unavailable when not connected).
  void send(const std::vector<std::string>& args, reply_handler handler) {
    if (!ready_ && !handshaking_) {
      handler(Error(errc::bus_unavailable, "Redis at " + where() + " is unreachable" + last_error_suffix()));
      return;
    }
    append(args, std::move(handler));
  }

  // A Redis that accepts commands but does not answer (stopped, stuck in a long script) is
  // treated as gone: the connection is closed, what was pending fails, reconnecting begins.
  void check_stalled(std::chrono::milliseconds timeout) {
    if (!sent_at_.empty() && std::chrono::steady_clock::now() - sent_at_.front() >= timeout)
      fail("no reply within " + std::to_string(timeout.count()) + " ms");
  }

  /// Commands sent and not answered yet.
  std::size_t pending() const { return pending_.size(); }

  std::string where() const {
    return spec_.unix_socket ? "unix:" + spec_.path : spec_.host + ":" + spec_.port;
  }

 private:
  std::string last_error_suffix() const { return last_error_.empty() ? "" : " (" + last_error_ + ")"; }

  void append(const std::vector<std::string>& args, reply_handler handler) {
    std::vector<const char*> argv;
    std::vector<std::size_t> lens;
    for (auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    char* cmd = nullptr;
    const int len = redisFormatCommandArgv(&cmd, static_cast<int>(args.size()), argv.data(), lens.data());
    if (len < 0) {
      handler(Error(errc::internal, "cannot format a Redis command"));
      return;
    }
    out_.append(cmd, static_cast<std::size_t>(len));
    redisFreeCommand(cmd);
    pending_.push_back(std::move(handler));
    sent_at_.push_back(std::chrono::steady_clock::now());
    do_write();
  }

  void do_connect() {
    if (stopped_) return;
    reader_reset();
    auto self = shared_from_this();
    connect_timer_.expires_after(options_.connect_timeout);
    connect_timer_.async_wait([this, self, generation = generation_](boost::system::error_code ec) {
      if (!ec && generation == generation_ && !ready_) fail("connect timed out");
    });
    if (spec_.unix_socket) {
      asio::local::stream_protocol::endpoint ep(spec_.path);
      socket_ = generic_socket(io_);
      socket_.async_connect(asio::generic::stream_protocol::endpoint(ep),
                            [this, self, generation = generation_](boost::system::error_code ec) {
                              if (generation == generation_) on_connect(ec);
                            });
      return;
    }
    auto resolver = std::make_shared<asio::ip::tcp::resolver>(io_);
    resolver->async_resolve(spec_.host, spec_.port,
                            [this, self, resolver, generation = generation_](
                                boost::system::error_code ec, asio::ip::tcp::resolver::results_type results) {
                              if (generation != generation_) return;
                              if (ec || results.empty())
                                return fail("cannot resolve " + spec_.host + ": " + ec.message());
                              asio::generic::stream_protocol::endpoint ep(results.begin()->endpoint());
                              socket_ = generic_socket(io_);
                              socket_.async_connect(ep,
                                                    [this, self, generation](boost::system::error_code ec2) {
                                                      if (generation == generation_) on_connect(ec2);
                                                    });
                            });
  }

  void on_connect(boost::system::error_code ec) {
    if (ec) return fail("connect: " + ec.message());
    if (!spec_.unix_socket) {
      boost::system::error_code ignored;
      socket_.set_option(asio::ip::tcp::no_delay(true), ignored);  // small pipelined commands
    }
    handshaking_ = true;
    do_read();
    // The handshake: AUTH, SELECT, and whatever the owner adds (SCRIPT LOAD). Ready once the
    // last reply came back; any error reply there fails the connection.
    auto step = [this](const result<reply_ptr>& r) {
      if (!r) return;  // the connection failed; fail() already handled it
      if ((*r)->type == REDIS_REPLY_ERROR) fail("handshake: " + std::string(reply_text(r->get())));
    };
    if (!spec_.password.empty()) append({"AUTH", spec_.password}, step);
    if (spec_.database != 0) append({"SELECT", std::to_string(spec_.database)}, step);
    if (on_handshake) on_handshake(where());
    append({"PING"}, [this, step](const result<reply_ptr>& r) {
      if (!r) return;
      step(r);
      if (!handshaking_) return;
      handshaking_ = false;
      ready_ = true;
      backoff_ = options_.reconnect_min;
      if (failures_ > 0)
        say(std::string(subscriber_ ? "subscriber" : "command") + " connection to Redis at " + where() +
            " established again after " + std::to_string(failures_) + " failure(s)");
      failures_ = 0;
      last_error_.clear();
      connect_timer_.cancel();
      if (on_ready) on_ready();
    });
  }

  void do_write() {
    if (writing_ || out_.empty() || !socket_.is_open()) return;
    writing_ = true;
    in_flight_.swap(out_);
    out_.clear();
    asio::async_write(socket_, asio::buffer(in_flight_),
                      [this, self = shared_from_this(), generation = generation_](
                          boost::system::error_code ec, std::size_t) {
                        if (generation != generation_) return;
                        writing_ = false;
                        in_flight_.clear();
                        if (ec) return fail("write: " + ec.message());
                        do_write();
                      });
  }

  void do_read() {
    socket_.async_read_some(
        asio::buffer(read_buf_), [this, self = shared_from_this(), generation = generation_](
                                     boost::system::error_code ec, std::size_t n) {
          if (generation != generation_) return;
          if (ec)
            return fail(ec == asio::error::eof ? "Redis closed the connection" : "read: " + ec.message());
          if (redisReaderFeed(reader_, read_buf_.data(), n) != REDIS_OK) return fail("protocol error");
          for (;;) {
            void* raw = nullptr;
            if (redisReaderGetReply(reader_, &raw) != REDIS_OK) return fail("protocol error");
            if (!raw) break;
            reply_ptr reply(static_cast<redisReply*>(raw), [](redisReply* r) { freeReplyObject(r); });
            const auto current = generation_;
            dispatch(reply);
            if (current != generation_) return;  // a handler failed the connection
          }
          do_read();
        });
  }

  void dispatch(const reply_ptr& reply) {
    if (subscriber_ && reply->type == REDIS_REPLY_ARRAY && reply->elements >= 3 &&
        reply->element[0]->type == REDIS_REPLY_STRING) {
      auto kind = reply_text(reply->element[0]);
      if (kind == "message" || kind == "pmessage") {
        if (on_push) on_push(reply);
        return;
      }
    }
    if (pending_.empty()) return fail("a reply nobody asked for");
    auto handler = std::move(pending_.front());
    pending_.pop_front();
    sent_at_.pop_front();
    handler(reply);
  }

  void reader_reset() {
    if (reader_) redisReaderFree(reader_);
    reader_ = redisReaderCreate();
  }

  // Closes the socket and fails what was pending; called for every failure.
  void close(const Error& why) {
    ++generation_;
    boost::system::error_code ignored;
    socket_.close(ignored);
    writing_ = false;
    out_.clear();
    in_flight_.clear();
    const bool was_ready = ready_;
    ready_ = handshaking_ = false;
    sent_at_.clear();
    auto pending = std::move(pending_);
    pending_.clear();
    for (auto& h : pending) h(why);
    if (was_ready && on_lost) on_lost();
  }

  void fail(const std::string& what) {
    if (stopped_) return;
    // One line when a connection is lost and one for the first failed attempt of a series; the
    // retries after it stay quiet until the connection is back.
    if (ready_ || failures_ == 0)
      say(std::string(subscriber_ ? "subscriber" : "command") + " connection to Redis at " + where() +
          (ready_ ? " lost: " : " failed: ") + what + "; reconnecting");
    ++failures_;
    last_error_ = what;
    close(Error(errc::bus_unavailable, "connection to Redis at " + where() + " lost: " + what +
                                           " (the command may or may not have been executed)"));
    retry_timer_.expires_after(backoff_);
    backoff_ = std::min(backoff_ * 2, options_.reconnect_max);
    retry_timer_.async_wait([this, self = shared_from_this()](boost::system::error_code ec) {
      if (!ec) do_connect();
    });
  }

  asio::io_context& io_;
  generic_socket socket_;
  asio::steady_timer connect_timer_, retry_timer_;
  endpoint_spec spec_;
  RedisBusOptions options_;
  bool subscriber_;
  redisReader* reader_ = nullptr;
  std::array<char, 64 * 1024> read_buf_{};
  std::string out_, in_flight_;
  bool writing_ = false;
  bool ready_ = false, handshaking_ = false, stopped_ = false;
  std::uint64_t generation_ = 0;  // bumped on close: handlers of an older socket do nothing
  std::deque<reply_handler> pending_;
  std::deque<std::chrono::steady_clock::time_point> sent_at_;  // when each pending command was queued
  std::chrono::milliseconds backoff_{options_.reconnect_min};
  std::string last_error_;
  std::uint64_t failures_ = 0;  // since the connection was last ready

  void say(const std::string& line) {
    if (options_.log) options_.log("RedisBus: " + line);
  }
};

// What a subscriber resumes from (SubscribeOptions, or where it was when the connection was lost).
struct catch_up_request {
  std::optional<std::uint64_t> since_seq;
  std::optional<std::uint32_t> since_epoch;
  bool snapshot = true;
};

}  // namespace

struct RedisBus::impl : std::enable_shared_from_this<RedisBus::impl> {
  struct subscription;
  using sub_ptr = std::shared_ptr<subscription>;
  struct pending_subscribe;
  using op_ptr = std::shared_ptr<pending_subscribe>;

  // A channel (exact topic) or pattern (wildcard) this node subscribes to in Redis.
  struct channel_state {
    std::vector<sub_ptr> subs;
    bool confirmed = false;  // Redis confirmed the (re)subscription on the current connection
    bool missed = false;     // the connection was lost since: wildcard subscribers get a gap
    // subscribe_async calls waiting for the confirmation (their catch-up read starts then).
    std::vector<op_ptr> waiting;
  };

  RedisBusOptions options;
  endpoint_spec spec;
  std::string publish_sha{sha1_hex(publish_script)}, read_sha{sha1_hex(read_script)};
  std::shared_ptr<ThreadPool> delivery_pool;

  asio::io_context io;
  std::shared_ptr<connection> commands, subscriber;
  asio::steady_timer stall_timer{io};
  std::thread io_thread;
  std::atomic<std::thread::id> io_thread_id;
  std::unique_ptr<ThreadPool> control;  // catch-ups after reconnects (blocking reads of Redis)

  mutable std::mutex mutex;
  std::condition_variable changed;  // confirmations, connection state
  std::unordered_map<std::string, std::shared_ptr<channel_state>> topics, patterns;
  // subscribe_async calls not finished yet: failed with shutting_down when the bus closes.
  std::unordered_map<pending_subscribe*, op_ptr> pending_ops;
  bool commands_ready = false, subscriber_ready = false;
  std::atomic<bool> closed{false};

  std::mutex random_mutex;
  std::mt19937 random{std::random_device{}()};

  std::atomic<std::uint64_t> published{0}, delivered{0}, dropped{0}, slow_ends{0}, live_subs{0}, received{0},
      reconnects{0}, publish_failures{0}, resyncs{0}, connects{0};

  explicit impl(RedisBusOptions o)
      : options(std::move(o)),
        spec(parse_address(options)),
        delivery_pool(std::make_shared<ThreadPool>(std::max<std::size_t>(1, options.delivery_threads))),
        control(std::make_unique<ThreadPool>(1)) {
    if (options.topic_idle_ttl < std::chrono::milliseconds(1))
      options.topic_idle_ttl = std::chrono::milliseconds(1);
    if (options.reconnect_min < std::chrono::milliseconds(1))
      options.reconnect_min = std::chrono::milliseconds(1);
    options.reconnect_max = std::max(options.reconnect_max, options.reconnect_min);
  }

  void start();
  void stop();

  std::string key(std::string_view topic, std::string_view what) const {
    // The topic in braces: a Redis Cluster hash tag, so a topic's keys share a slot.
    return options.key_prefix + "{" + std::string(topic) + "}:" + std::string(what);
  }
  std::string channel_prefix() const { return options.key_prefix + "ev:"; }

  std::string candidate_epoch() {
    std::lock_guard lock(random_mutex);
    std::uint32_t e = 0;
    while (e == 0) e = static_cast<std::uint32_t>(random());
    return std::to_string(e);
  }

  bool on_io_thread() const { return std::this_thread::get_id() == io_thread_id; }
  // Cancels the subscriptions, stops the catch-up thread and the I/O thread. Not on the I/O thread.
  void teardown();

  // The publish script's command for `data` on `topic_name`, and the event its reply means.
  // `json` is the payload's text; `data` what the event holds (the value, or that text).
  std::vector<std::string> publish_command(std::string_view topic_name, std::string json,
                                           const PublishOptions& publish_options);
  template <class Payload>
  result<EventPtr> published_event(std::string_view topic_name, Payload data,
                                   std::optional<std::uint64_t> asked_seq, result<reply_ptr> r);
  // publish_async of either kind of payload, once checked.
  template <class Payload>
  static void publish_async(const std::shared_ptr<impl>& self, std::string_view topic_name, Payload data,
                            std::string json, const PublishOptions& options, PublishCallback done);

  // On the I/O thread: while commands are pending on either connection, a timer checks every
  // command_timeout that Redis still answers; one that does not is treated as gone
  // (check_stalled), so that callbacks get bus_unavailable rather than waiting forever. A caller
  // that gave up waiting (call(), subscribe()) also asks for a check at once, but that one can
  // come a little early (the command was written after the caller began to wait); the watch is
  // what makes sure the stalled connection is given up.
  void watch_stalls() {
    if (stall_watch_armed) return;
    stall_watch_armed = true;
    stall_timer.expires_after(options.command_timeout);
    stall_timer.async_wait([weak = weak_from_this()](boost::system::error_code ec) {
      auto self = weak.lock();
      if (!self) return;
      self->stall_watch_armed = false;
      if (ec || self->closed.load()) return;
      self->commands->check_stalled(self->options.command_timeout);
      self->subscriber->check_stalled(self->options.command_timeout);
      if (self->commands->pending() > 0 || self->subscriber->pending() > 0) self->watch_stalls();
    });
  }
  bool stall_watch_armed = false;  // I/O thread only

  // Runs a command on the command connection from any thread but the I/O thread; waits for the
  // reply at most command_timeout.
  result<reply_ptr> call(std::vector<std::string> args) {
    if (closed.load()) return Error(errc::shutting_down, "bus is closed");
    if (on_io_thread())
      return Error(errc::bad_request,
                   "a blocking RedisBus call from its own I/O thread (an inline callback)");
    auto promise = std::make_shared<std::promise<result<reply_ptr>>>();
    auto future = promise->get_future();
    asio::post(io, [this, args = std::move(args), promise]() mutable {
      eval_or_send(std::move(args), [promise](result<reply_ptr> r) { promise->set_value(std::move(r)); });
      watch_stalls();
    });
    if (future.wait_for(options.command_timeout) != std::future_status::ready) {
      asio::post(io, [this] {
        commands->check_stalled(options.command_timeout);
        watch_stalls();
      });
      return Error(errc::bus_unavailable, "Redis at " + commands->where() + " did not answer within " +
                                              std::to_string(options.command_timeout.count()) + " ms");
    }
    auto r = future.get();
    if (r && (*r)->type == REDIS_REPLY_ERROR)
      return Error(errc::internal, "Redis: " + std::string(reply_text(r->get())));
    return r;
  }

  // On the I/O thread: sends the command; an EVALSHA refused with NOSCRIPT (Redis restarted and
  // lost its script cache) is sent again as EVAL with the script's text, which caches it again.
  void eval_or_send(std::vector<std::string> args, reply_handler handler) {
    if (args[0] != "EVALSHA") return commands->send(args, std::move(handler));
    auto retry = args;
    commands->send(args, [this, retry = std::move(retry), handler](result<reply_ptr> r) mutable {
      if (r && (*r)->type == REDIS_REPLY_ERROR && reply_text(r->get()).starts_with("NOSCRIPT")) {
        retry[0] = "EVAL";
        retry[1] = std::string(retry[1] == publish_sha ? publish_script : read_script);
        return commands->send(retry, std::move(handler));
      }
      handler(std::move(r));
    });
  }

  struct read_result {
    std::uint32_t epoch = 0;
    std::uint64_t seq = 0;
    EventPtr last;
    std::uint64_t first_kept = 0;  // 0: history is empty
    std::vector<EventPtr> entries;
  };
  std::vector<std::string> read_command(std::string_view topic, std::uint64_t since_seq, bool create_epoch);
  result<read_result> parse_read(std::string_view topic, result<reply_ptr> r);
  // Blocking: read_command, call, parse_read.
  result<read_result> read(std::string_view topic, std::uint64_t since_seq, bool create_epoch);

  void on_message(const reply_ptr& reply);
  void on_subscriber_ready();
  void on_subscriber_lost();
  void on_commands_ready();
  void send_subscribe(bool pattern, const std::string& name, const std::shared_ptr<channel_state>& state);
  void send_unsubscribe(bool pattern, const std::string& name);
  bool catch_up(const sub_ptr& sub, catch_up_request req, Error* error);
  void catch_up_later(const sub_ptr& sub);
  // The halves of a catch-up, shared by catch_up() (blocking) and subscribe_async (a read on the
  // I/O thread): what the read starts from, what its result does, and a read that failed.
  struct read_start {
    std::uint64_t losses = 0;
    bool live = false;
  };
  read_start begin_read(const sub_ptr& sub);
  // Returns true when the topic must be read again (with `req` as it leaves it).
  // `source`: the subscription's snapshot_source already called (subscribe_async calls it off the
  // I/O thread); null: apply_read calls it when it needs it.
  bool apply_read(const sub_ptr& sub, catch_up_request& req, const read_start& start, const read_result& t,
                  const std::shared_ptr<const boost::json::value>* source = nullptr);
  void read_failed(const sub_ptr& sub);

  // subscribe_async (see pending_subscribe); all but make_subscription on the I/O thread.
  sub_ptr make_subscription(std::string_view pattern, DeliveryCallback callback, const SubscribeOptions& o);
  // Registers `sub` (and `op`, waiting for the confirmation unless the channel has it already)
  // and sends the channel's SUBSCRIBE when it is new. Returns the channel and whether it was
  // confirmed at registration.
  std::pair<std::shared_ptr<channel_state>, bool> register_subscription(const sub_ptr& sub, const op_ptr& op);
  void arm(const op_ptr& op);
  void on_confirmed(const op_ptr& op);
  void read_async(const op_ptr& op);
  void finish(const op_ptr& op, Error error);
  void fail_pending(const Error& error);
  void unregister(const sub_ptr& sub);
  std::vector<sub_ptr> all_subscriptions();
};

struct RedisBus::impl::subscription final : detail::SubscriptionState,
                                            std::enable_shared_from_this<subscription> {
  struct item {
    Delivery::Kind kind;
    EventPtr event;
  };

  std::weak_ptr<impl> bus;
  std::string pattern;
  bool wildcard = false;
  DeliveryCallback callback;
  ExecutorPtr executor;
  std::size_t max_queue;
  OverflowPolicy overflow;
  std::function<std::shared_ptr<const boost::json::value>()> snapshot_source;

  mutable std::mutex mutex;
  std::condition_variable idle;
  std::deque<item> queue;
  std::size_t replay_pending = 0;
  std::uint64_t dropped_pending = 0;
  bool unknown_gap_pending = false;
  bool scheduled = false, running = false;
  std::thread::id runner;
  bool ended = false, end_delivered = false;
  Error end_reason;
  std::atomic<bool> cancelled{false};

  // Catching up: live events are held in `buffer` until history has been read.
  bool buffering = false;
  bool catching_up = false;
  bool again = false;              // asked to catch up while catching up: run once more
  std::uint64_t losses = 0;        // subscriber connections lost so far (a read before one is stale)
  bool live_ok = false;            // the topic's channel is confirmed on the current connection
  bool buffer_overflowed = false;  // the buffer was cleared: read history again
  std::vector<EventPtr> buffer;
  // The position of what was queued last: later live events at or below it are duplicates.
  std::uint32_t last_epoch = 0;
  std::uint64_t last_seq = 0;

  bool active() const noexcept override {
    if (cancelled.load(std::memory_order_acquire)) return false;
    std::lock_guard lock(mutex);
    return !ended;
  }

  // With `mutex` held. Returns true when a drain must be posted.
  bool enqueue_locked(Delivery::Kind kind, const EventPtr& ev, impl& owner) {
    if (ended || cancelled.load(std::memory_order_relaxed)) return false;
    if (kind == Delivery::Kind::event && queue.size() - replay_pending >= max_queue) {
      if (overflow == OverflowPolicy::end_subscription) {
        queue.clear();
        replay_pending = 0;
        ended = true;
        end_reason = Error(errc::slow_consumer, "subscriber to '" + pattern + "' fell " +
                                                    std::to_string(max_queue) + " events behind");
        owner.slow_ends.fetch_add(1, std::memory_order_relaxed);
        owner.live_subs.fetch_sub(1, std::memory_order_relaxed);
        return schedule_locked();
      }
      queue.pop_front();
      if (replay_pending > 0) --replay_pending;
      ++dropped_pending;
      owner.dropped.fetch_add(1, std::memory_order_relaxed);
    }
    queue.push_back({kind, ev});
    if (ev) {
      last_epoch = ev->epoch();
      last_seq = ev->seq();
    }
    return schedule_locked();
  }

  bool schedule_locked() {
    if (scheduled) return false;
    scheduled = true;
    return true;
  }

  // A live event from Redis (I/O thread). Returns true when a drain must be posted.
  bool live(const EventPtr& ev, impl& owner) {
    std::lock_guard lock(mutex);
    if (buffering) {
      if (buffer.size() >= max_queue + 64) {
        // Held back too long (catching up is slow): what is dropped here is older than the
        // history read that follows, so that read covers it.
        buffer.clear();
        buffer_overflowed = true;
      }
      buffer.push_back(ev);
      return false;
    }
    if (!wildcard && ev->epoch() == last_epoch && ev->seq() <= last_seq) return false;  // seen
    return enqueue_locked(Delivery::Kind::event, ev, owner);
  }

  // A gap of unknown size (a wildcard subscription after a lost connection).
  bool lost_events() {
    std::lock_guard lock(mutex);
    if (ended || cancelled.load(std::memory_order_relaxed)) return false;
    unknown_gap_pending = true;
    return schedule_locked();
  }

  void post_drain() {
    executor->post([self = shared_from_this()] { self->drain(); });
  }

  void drain() {
    constexpr int batch = 64;
    auto owner = bus.lock();
    for (int n = 0;; ++n) {
      Delivery d;
      {
        std::unique_lock lock(mutex);
        running = false;
        if (cancelled.load(std::memory_order_relaxed) || n == batch) {
          if (n == batch && !cancelled.load(std::memory_order_relaxed)) {
            lock.unlock();
            idle.notify_all();
            post_drain();
            return;
          }
          scheduled = false;
          lock.unlock();
          idle.notify_all();
          return;
        }
        if (dropped_pending > 0 || unknown_gap_pending) {
          d.kind = Delivery::Kind::gap;
          // A lost connection's gap is of unknown size: `dropped` counts only known drops.
          d.dropped = dropped_pending;
          dropped_pending = 0;
          unknown_gap_pending = false;
        } else if (!queue.empty()) {
          auto it = std::move(queue.front());
          queue.pop_front();
          if (replay_pending > 0) --replay_pending;
          d.kind = it.kind;
          d.event = std::move(it.event);
        } else if (ended && !end_delivered) {
          end_delivered = true;
          d.kind = Delivery::Kind::ended;
          d.reason = end_reason;
        } else {
          scheduled = false;
          lock.unlock();
          idle.notify_all();
          return;
        }
        running = true;
        runner = std::this_thread::get_id();
      }
      try {
        callback(d);
      }
      PUSHBOOK_RETHROW_FORCED_UNWIND
      catch (...) {
        // A throwing callback must not take the delivery thread down; the next event still goes.
      }
      if (owner && d.event) owner->delivered.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void cancel() noexcept override {
    if (cancelled.exchange(true, std::memory_order_acq_rel)) return;
    bool was_live;
    {
      std::lock_guard lock(mutex);
      was_live = !ended;
    }
    if (auto owner = bus.lock()) {
      if (was_live) owner->live_subs.fetch_sub(1, std::memory_order_relaxed);
      owner->unregister(shared_from_this());
    }
    std::unique_lock lock(mutex);
    queue.clear();
    buffer.clear();
    replay_pending = 0;
    idle.wait(lock, [&] { return !running || runner == std::this_thread::get_id(); });
  }
};

// One subscribe_async in progress. Created by the caller, then touched only on the I/O thread:
// registered there, the channel's confirmation (at once when the channel has it) starts the
// catch-up read, whose reply finishes it; the timer (command_timeout per step) or the bus
// closing finish it with an error instead. `finished` makes whichever comes first the only one.
struct RedisBus::impl::pending_subscribe {
  explicit pending_subscribe(asio::io_context& io) : timer(io) {}
  sub_ptr sub;
  catch_up_request req;
  SubscribeCallback done;
  asio::steady_timer timer;
  std::uint64_t timer_generation = 0;  // a timer handler of an older step does nothing
  bool reading = false;                // confirmed: the history read is in flight
  bool finished = false;
};

// --- Redis reads ---------------------------------------------------------------------------------

std::vector<std::string> RedisBus::impl::read_command(std::string_view topic, std::uint64_t since_seq,
                                                      bool create_epoch) {
  const auto max_age_us =
      std::chrono::duration_cast<std::chrono::microseconds>(options.history_max_age).count();
  return {"EVALSHA",
          read_sha,
          "4",
          key(topic, "epoch"),
          key(topic, "seq"),
          key(topic, "h"),
          key(topic, "last"),
          std::to_string(since_seq),
          std::to_string(max_age_us),
          create_epoch ? "1" : "0",
          candidate_epoch(),
          std::to_string(options.topic_idle_ttl.count()),
          std::to_string(options.history_limit)};
}

result<RedisBus::impl::read_result> RedisBus::impl::read(std::string_view topic, std::uint64_t since_seq,
                                                         bool create_epoch) {
  return parse_read(topic, call(read_command(topic, since_seq, create_epoch)));
}

result<RedisBus::impl::read_result> RedisBus::impl::parse_read(std::string_view topic, result<reply_ptr> r) {
  if (r && (*r)->type == REDIS_REPLY_ERROR)
    r = Error(errc::internal, "Redis: " + std::string(reply_text(r->get())));
  if (!r) return r.error();
  const redisReply* rep = r->get();
  if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 5 || rep->element[4]->type != REDIS_REPLY_ARRAY)
    return Error(errc::internal, "unexpected reply of the read script");
  read_result out;
  out.epoch = static_cast<std::uint32_t>(to_u64(reply_text(rep->element[0])));
  out.seq = to_u64(reply_text(rep->element[1]));
  if (auto last = reply_text(rep->element[2]); !last.empty()) out.last = parse_entry(topic, out.epoch, last);
  out.first_kept = to_u64(reply_text(rep->element[3]));
  const redisReply* entries = rep->element[4];
  for (std::size_t i = 0; i < entries->elements; ++i)
    if (auto ev = parse_entry(topic, out.epoch, reply_text(entries->element[i]))) out.entries.push_back(ev);
  return out;
}

// --- Routing of live events (I/O thread) ---------------------------------------------------------

void RedisBus::impl::on_message(const reply_ptr& reply) {
  // ["message", channel, payload] or ["pmessage", pattern, channel, payload]
  const bool pmessage = reply_text(reply->element[0]) == "pmessage";
  if (pmessage && reply->elements < 4) return;
  const auto channel = reply_text(reply->element[pmessage ? 2 : 1]);
  const auto payload = reply_text(reply->element[pmessage ? 3 : 2]);
  const auto prefix = channel_prefix();
  if (!channel.starts_with(prefix)) return;
  const auto topic = channel.substr(prefix.size());
  const auto colon = payload.find(':');
  if (colon == std::string_view::npos) return;
  auto ev = parse_entry(topic, static_cast<std::uint32_t>(to_u64(payload.substr(0, colon))),
                        payload.substr(colon + 1));
  if (!ev) return;
  received.fetch_add(1, std::memory_order_relaxed);
  std::vector<sub_ptr> to_post;
  {
    std::lock_guard lock(mutex);
    std::shared_ptr<channel_state> state;
    if (pmessage) {
      auto pattern = reply_text(reply->element[1]);
      if (pattern.starts_with(prefix)) {
        auto it = patterns.find(std::string(pattern.substr(prefix.size())));
        if (it != patterns.end()) state = it->second;
      }
    } else if (auto it = topics.find(std::string(topic)); it != topics.end()) {
      state = it->second;
    }
    if (state)
      for (auto& sub : state->subs)
        if (sub->live(ev, *this)) to_post.push_back(sub);
  }
  for (auto& sub : to_post) sub->post_drain();
}

void RedisBus::impl::send_subscribe(bool pattern, const std::string& name,
                                    const std::shared_ptr<channel_state>& channel) {
  std::weak_ptr<channel_state> weak = channel;
  subscriber->send({pattern ? "PSUBSCRIBE" : "SUBSCRIBE", channel_prefix() + name},
                   [this, weak, pattern](result<reply_ptr> r) {
                     if (!r || (*r)->type == REDIS_REPLY_ERROR) return;  // a reconnect resubscribes
                     auto state = weak.lock();
                     if (!state) return;
                     std::vector<sub_ptr> gaps, to_catch_up;
                     std::vector<op_ptr> waiting;
                     {
                       std::lock_guard lock(mutex);
                       state->confirmed = true;
                       waiting.swap(state->waiting);
                       for (auto& sub : state->subs) {
                         std::lock_guard sl(sub->mutex);
                         sub->live_ok = true;
                       }
                       if (state->missed) {
                         state->missed = false;
                         (pattern ? gaps : to_catch_up) = state->subs;
                       }
                     }
                     changed.notify_all();
                     for (auto& op : waiting) on_confirmed(op);
                     for (auto& sub : gaps)
                       if (sub->lost_events()) sub->post_drain();
                     for (auto& sub : to_catch_up) catch_up_later(sub);
                   });
}

void RedisBus::impl::send_unsubscribe(bool pattern, const std::string& name) {
  subscriber->send({pattern ? "PUNSUBSCRIBE" : "UNSUBSCRIBE", channel_prefix() + name},
                   [](result<reply_ptr>) {});
}

void RedisBus::impl::on_subscriber_ready() {
  if (connects.fetch_add(1) >= 2) reconnects.fetch_add(1);
  std::vector<std::pair<std::string, std::shared_ptr<channel_state>>> exact, wild;
  {
    std::lock_guard lock(mutex);
    subscriber_ready = true;
    for (auto& [name, state] : topics) exact.emplace_back(name, state);
    for (auto& [name, state] : patterns) wild.emplace_back(name, state);
  }
  changed.notify_all();
  for (auto& [name, state] : exact) send_subscribe(false, name, state);
  for (auto& [name, state] : wild) send_subscribe(true, name, state);
}

void RedisBus::impl::on_subscriber_lost() {
  std::lock_guard lock(mutex);
  subscriber_ready = false;
  // Whatever is published until the resubscription is confirmed is not received: exact-topic
  // subscribers hold live events back and catch up from history once confirmed again.
  for (auto& [name, state] : topics) {
    state->confirmed = false;
    state->missed = true;
    for (auto& sub : state->subs) {
      std::lock_guard sl(sub->mutex);
      sub->buffering = true;
      sub->live_ok = false;
      ++sub->losses;
    }
  }
  for (auto& [name, state] : patterns) {
    state->confirmed = false;
    state->missed = true;
  }
}

void RedisBus::impl::on_commands_ready() {
  if (connects.fetch_add(1) >= 2) reconnects.fetch_add(1);
  std::vector<sub_ptr> waiting;
  {
    std::lock_guard lock(mutex);
    commands_ready = true;
    // Catch-ups that failed while the command connection was down are retried now.
    for (auto& [name, state] : topics)
      if (state->confirmed)
        for (auto& sub : state->subs) {
          std::lock_guard sl(sub->mutex);
          if (sub->buffering && !sub->catching_up) waiting.push_back(sub);
        }
  }
  changed.notify_all();
  for (auto& sub : waiting) catch_up_later(sub);
}

// --- Catching up ---------------------------------------------------------------------------------

// Reads the topic from Redis and queues, for `sub`, what it missed (LocalBus's rules), then the
// live events held back meanwhile that are newer than what was read. Returns false when Redis
// could not be read (the subscriber stays buffering). Not on the I/O thread.
bool RedisBus::impl::catch_up(const sub_ptr& sub, catch_up_request req, Error* error) {
  for (;;) {
    const auto start = begin_read(sub);
    auto r = read(sub->pattern, req.since_seq.value_or(0), true);
    if (!r) {
      if (error) *error = r.error();
      read_failed(sub);
      return false;
    }
    if (!apply_read(sub, req, start, *r)) return true;
  }
}

RedisBus::impl::read_start RedisBus::impl::begin_read(const sub_ptr& sub) {
  // The read joins live events without a gap only when the channel was confirmed before it
  // and stayed so until the result is applied.
  std::lock_guard lock(sub->mutex);
  sub->buffer_overflowed = false;
  sub->again = false;
  return {sub->losses, sub->live_ok};
}

void RedisBus::impl::read_failed(const sub_ptr& sub) {
  std::lock_guard lock(sub->mutex);
  sub->catching_up = false;
}

bool RedisBus::impl::apply_read(const sub_ptr& sub, catch_up_request& req, const read_start& start,
                                const read_result& t,
                                const std::shared_ptr<const boost::json::value>* source) {
  std::vector<std::pair<Delivery::Kind, EventPtr>> initial;
  auto snapshot = [&] {
    if (t.last) return initial.emplace_back(Delivery::Kind::snapshot, t.last), void();
    if (!sub->snapshot_source) return;
    if (auto data = source ? *source : sub->snapshot_source())
      initial.emplace_back(
          Delivery::Kind::snapshot,
          std::make_shared<const Event>(sub->pattern, t.seq, std::chrono::system_clock::now(),
                                        std::move(data), t.epoch));
  };
  auto since = req.since_seq;
  if (req.since_epoch && *req.since_epoch != t.epoch) since.reset();  // renumbered
  if (!t.last) {
    if (since || req.snapshot) snapshot();
  } else if (!since) {
    if (req.snapshot) snapshot();
  } else if (*since < t.seq) {
    const std::uint64_t first_kept = t.first_kept == 0 ? t.seq + 1 : t.first_kept;
    if (*since + 1 >= first_kept)
      for (auto& ev : t.entries) initial.emplace_back(Delivery::Kind::event, ev);
    else
      snapshot();
  } else if (*since > t.seq) {
    snapshot();
  }
  bool post = false, read_again = false;
  {
    std::lock_guard lock(sub->mutex);
    if (sub->buffer_overflowed) return true;  // live events were lost while reading: read again
    if (sub->ended || sub->cancelled.load()) {
      sub->catching_up = false;
      return false;
    }
    for (auto& [kind, ev] : initial) {
      sub->queue.push_back({kind, ev});
      ++sub->replay_pending;
    }
    sub->last_epoch = t.epoch;
    sub->last_seq = t.seq;
    if (sub->losses != start.losses || !start.live) {
      // The channel was not confirmed throughout the read (a connection lost before or during
      // it): what was read stands, but live events may be missing after it. Stay buffering;
      // the resubscription's confirmation catches up again (at once when it came meanwhile).
      std::erase_if(sub->buffer, [&](const EventPtr& ev) {
        return ev->epoch() == sub->last_epoch && ev->seq() <= sub->last_seq;
      });
      read_again = sub->again;
      if (read_again)
        req = {sub->last_seq, sub->last_epoch, true};
      else
        sub->catching_up = false;
    } else {
      auto held = std::move(sub->buffer);
      sub->buffer.clear();
      sub->buffering = false;
      sub->catching_up = false;
      for (auto& ev : held)
        if (!(ev->epoch() == sub->last_epoch && ev->seq() <= sub->last_seq))
          post = sub->enqueue_locked(Delivery::Kind::event, ev, *this) || post;
    }
    if (!sub->queue.empty() || sub->dropped_pending > 0 || sub->unknown_gap_pending || sub->ended)
      post = sub->schedule_locked() || post;
  }
  if (post) sub->post_drain();  // outside the lock: an inline executor drains right here
  return read_again;
}

void RedisBus::impl::catch_up_later(const sub_ptr& sub) {
  {
    std::lock_guard lock(sub->mutex);
    if (sub->catching_up) {
      sub->again = true;  // the running catch-up looks again before it finishes
      return;
    }
    if (!sub->buffering) return;
    sub->catching_up = true;
  }
  control->post([weak = weak_from_this(), sub] {
    auto self = weak.lock();
    if (!self || self->closed.load() || sub->cancelled.load()) return;
    catch_up_request req;
    {
      std::lock_guard lock(sub->mutex);
      req.since_seq = sub->last_seq;
      req.since_epoch = sub->last_epoch;
    }
    // Failure leaves the subscriber buffering; the next (re)connection retries.
    if (self->catch_up(sub, req, nullptr)) self->resyncs.fetch_add(1, std::memory_order_relaxed);
  });
}

void RedisBus::impl::unregister(const sub_ptr& sub) {
  std::lock_guard lock(mutex);
  auto& registry = sub->wildcard ? patterns : topics;
  auto it = registry.find(sub->pattern);
  if (it == registry.end()) return;
  std::erase(it->second->subs, sub);
  if (!it->second->subs.empty()) return;
  registry.erase(it);
  // The last local subscriber left: this node stops receiving the topic.
  if (!closed.load())
    asio::post(io, [this, wildcard = sub->wildcard, name = sub->pattern] {
      std::lock_guard relock(mutex);
      auto& reg = wildcard ? patterns : topics;
      if (!reg.contains(name)) {
        // Sent from the I/O thread in order with any SUBSCRIBE of a newer subscriber.
        send_unsubscribe(wildcard, name);
      }
    });
}

std::vector<RedisBus::impl::sub_ptr> RedisBus::impl::all_subscriptions() {
  std::lock_guard lock(mutex);
  std::vector<sub_ptr> all;
  for (auto* registry : {&topics, &patterns})
    for (auto& [name, state] : *registry) all.insert(all.end(), state->subs.begin(), state->subs.end());
  return all;
}

void RedisBus::impl::start() {
  commands = std::make_shared<connection>(io, spec, options, false);
  subscriber = std::make_shared<connection>(io, spec, options, true);
  commands->on_handshake = [this](const std::string&) {
    // Cache both scripts; EVALSHA also falls back to EVAL on NOSCRIPT.
    commands->send({"SCRIPT", "LOAD", std::string(publish_script)}, [](result<reply_ptr>) {});
    commands->send({"SCRIPT", "LOAD", std::string(read_script)}, [](result<reply_ptr>) {});
  };
  commands->on_ready = [this] { on_commands_ready(); };
  commands->on_lost = [this] {
    {
      std::lock_guard lock(mutex);
      commands_ready = false;
    }
    changed.notify_all();
  };
  subscriber->on_ready = [this] { on_subscriber_ready(); };
  subscriber->on_lost = [this] {
    on_subscriber_lost();
    changed.notify_all();
  };
  subscriber->on_push = [this](const reply_ptr& r) { on_message(r); };
  asio::post(io, [this] {
    commands->start();
    subscriber->start();
  });
  io_thread = std::thread([this] {
    auto guard = asio::make_work_guard(io);
    io_thread_id = std::this_thread::get_id();
    io.run();
  });
}

void RedisBus::impl::stop() {
  asio::post(io, [this] {
    fail_pending(Error(errc::shutting_down, "bus is closed"));
    commands->shutdown();
    subscriber->shutdown();
    io.stop();
  });
  if (io_thread.joinable()) io_thread.join();
}

// --- RedisBus ------------------------------------------------------------------------------------

RedisBus::RedisBus(RedisBusOptions options) : impl_(std::make_shared<impl>(std::move(options))) {
  impl_->start();
}

RedisBus::~RedisBus() {
  impl_->closed.store(true);
  if (impl_->on_io_thread()) {
    // The last reference went in one of the bus's own callbacks (a `done`, an inline delivery):
    // the I/O thread cannot join itself. The teardown runs on a thread of its own, which joins
    // the I/O thread once this callback has returned, and the impl goes with it.
    std::thread([impl = std::move(impl_)] { impl->teardown(); }).detach();
    return;
  }
  impl_->teardown();
}

void RedisBus::impl::teardown() {
  for (auto& sub : all_subscriptions()) sub->cancel();
  control.reset();  // waits for a catch-up in progress; queued ones see `closed`
  stop();
}

bool RedisBus::available() const noexcept {
  std::lock_guard lock(impl_->mutex);
  return impl_->commands_ready && impl_->subscriber_ready;
}

bool RedisBus::wait_connected(std::chrono::milliseconds timeout) const {
  std::unique_lock lock(impl_->mutex);
  return impl_->changed.wait_for(lock, timeout,
                                 [&] { return impl_->commands_ready && impl_->subscriber_ready; });
}

namespace {
Error check_publish(std::string_view topic_name, const std::shared_ptr<const boost::json::value>& data,
                    const PublishOptions& options, bool closed) {
  if (!data) return Error(errc::bad_request, "publish needs data (a JSON value, null is fine)");
  if (!is_valid_topic(topic_name))
    return Error(errc::invalid_topic, "invalid topic '" + std::string(topic_name.substr(0, 300)) + "'");
  if (options.seq && (*options.seq == 0 || *options.seq > max_publish_seq))
    return Error(errc::bad_request, "publish seq must be 1.." + std::to_string(max_publish_seq) + ", not " +
                                        std::to_string(*options.seq));
  if (closed) return Error(errc::shutting_down, "bus is closed");
  return {};
}
}  // namespace

std::vector<std::string> RedisBus::impl::publish_command(std::string_view topic_name, std::string json,
                                                         const PublishOptions& publish_options) {
  return {"EVALSHA",
          publish_sha,
          "4",
          key(topic_name, "epoch"),
          key(topic_name, "seq"),
          key(topic_name, "h"),
          key(topic_name, "last"),
          std::move(json),
          std::to_string(options.history_limit),
          std::to_string(options.history_max_age.count()),
          std::to_string(options.topic_idle_ttl.count()),
          channel_prefix() + std::string(topic_name),
          candidate_epoch(),
          publish_options.seq ? std::to_string(*publish_options.seq) : std::string()};
}

template <class Payload>
result<EventPtr> RedisBus::impl::published_event(std::string_view topic_name, Payload data,
                                                 std::optional<std::uint64_t> asked_seq,
                                                 result<reply_ptr> r) {
  if (r && (*r)->type == REDIS_REPLY_ERROR)
    r = Error(errc::internal, "Redis: " + std::string(reply_text(r->get())));
  if (!r) {
    if (r.error().is(errc::bus_unavailable)) publish_failures.fetch_add(1, std::memory_order_relaxed);
    return r.error();
  }
  const redisReply* rep = r->get();
  if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 3 || rep->element[0]->type != REDIS_REPLY_INTEGER ||
      rep->element[1]->type != REDIS_REPLY_INTEGER)
    return Error(errc::internal, "unexpected reply of the publish script");
  if (reply_text(rep->element[2]).empty())
    return Error(errc::already_exists,
                 "topic '" + std::string(topic_name) + "' already has seq " +
                     std::to_string(rep->element[1]->integer) + " (epoch " +
                     format_epoch(static_cast<std::uint32_t>(rep->element[0]->integer)) + "); seq " +
                     std::to_string(asked_seq.value_or(0)) + " is not delivered again");
  const auto us = to_u64(reply_text(rep->element[2]));
  const auto time = std::chrono::system_clock::time_point(
      std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::microseconds(us)));
  published.fetch_add(1, std::memory_order_relaxed);
  return EventPtr(std::make_shared<const Event>(
      std::string(topic_name), static_cast<std::uint64_t>(rep->element[1]->integer), time, std::move(data),
      static_cast<std::uint32_t>(rep->element[0]->integer)));
}

result<EventPtr> RedisBus::publish(std::string_view topic_name,
                                   std::shared_ptr<const boost::json::value> data,
                                   const PublishOptions& options) {
  if (auto e = check_publish(topic_name, data, options, impl_->closed.load(std::memory_order_relaxed));
      e.code)
    return e;
  auto& b = *impl_;
  return b.published_event(topic_name, data, options.seq,
                           b.call(b.publish_command(topic_name, boost::json::serialize(*data), options)));
}

namespace {
// The checks of publish_json: the text's first, then publish's.
Error check_publish_json(std::string_view topic_name, const std::shared_ptr<const std::string>& json_text,
                         const PublishOptions& options, bool closed, bool check_text = true) {
  if (!json_text) return Error(errc::bad_request, "publish_json needs one JSON value: no text");
  if (auto why = check_text ? detail::json_text_error(*json_text) : std::nullopt)
    return Error(errc::bad_request, "publish_json needs one JSON value: " + *why);
  static const auto null = std::make_shared<const boost::json::value>();
  return check_publish(topic_name, null, options, closed);
}
}  // namespace

result<EventPtr> RedisBus::publish_json(std::string_view topic_name,
                                        std::shared_ptr<const std::string> json_text,
                                        const PublishOptions& options) {
  if (auto e =
          check_publish_json(topic_name, json_text, options, impl_->closed.load(std::memory_order_relaxed));
      e.code)
    return e;
  auto& b = *impl_;
  auto args = b.publish_command(topic_name, *json_text, options);
  return b.published_event(topic_name, std::move(json_text), options.seq, b.call(std::move(args)));
}

void RedisBus::publish_async(std::string_view topic_name, std::shared_ptr<const boost::json::value> data,
                             const PublishOptions& options, PublishCallback done) {
  if (auto e = check_publish(topic_name, data, options, impl_->closed.load(std::memory_order_relaxed));
      e.code) {
    if (done) done(std::move(e));
    return;
  }
  auto json = boost::json::serialize(*data);
  impl::publish_async(impl_, topic_name, std::move(data), std::move(json), options, std::move(done));
}

void RedisBus::publish_json_async(std::string_view topic_name, std::shared_ptr<const std::string> json_text,
                                  const PublishOptions& options, PublishCallback done) {
  if (auto e =
          check_publish_json(topic_name, json_text, options, impl_->closed.load(std::memory_order_relaxed));
      e.code) {
    if (done) done(std::move(e));
    return;
  }
  std::string json = *json_text;
  impl::publish_async(impl_, topic_name, std::move(json_text), std::move(json), options, std::move(done));
}

void RedisBus::publish_trusted_json_async(std::string_view topic_name,
                                          std::shared_ptr<const std::string> json_text,
                                          const PublishOptions& options, PublishCallback done) {
  if (auto e = check_publish_json(topic_name, json_text, options,
                                  impl_->closed.load(std::memory_order_relaxed), false);
      e.code) {
    if (done) done(std::move(e));
    return;
  }
  std::string json = *json_text;
  impl::publish_async(impl_, topic_name, std::move(json_text), std::move(json), options, std::move(done));
}

template <class Payload>
void RedisBus::impl::publish_async(const std::shared_ptr<impl>& impl_, std::string_view topic_name,
                                   Payload data, std::string json, const PublishOptions& options,
                                   PublishCallback done) {
  auto& b = *impl_;
  auto args = b.publish_command(topic_name, std::move(json), options);
  // Posted, not sent here: the I/O thread owns the connection. Posts from one thread run in
  // order, so the commands go out, and Redis runs them, in the order of the calls.
  // The handlers hold the bus weakly: they live in its io_context and its connection.
  asio::post(
      b.io, [weak = std::weak_ptr<impl>(impl_), args = std::move(args), topic = std::string(topic_name),
             data = std::move(data), seq = options.seq, done = std::move(done)]() mutable {
        auto self = weak.lock();
        if (!self) {
          if (done) done(Error(errc::shutting_down, "bus is closed"));
          return;
        }
        self->eval_or_send(std::move(args), [weak, topic = std::move(topic), data = std::move(data), seq,
                                             done = std::move(done)](result<reply_ptr> r) mutable {
          auto owner = weak.lock();
          auto ev = owner ? owner->published_event(topic, std::move(data), seq, std::move(r))
                          : result<EventPtr>(Error(errc::shutting_down, "bus is closed"));
          if (!done) return;
          try {
            done(std::move(ev));
          }
          PUSHBOOK_RETHROW_FORCED_UNWIND
          catch (...) {
            // The caller's callback must not take the I/O thread down.
          }
        });
        self->watch_stalls();
      });
}

namespace {
bool is_wildcard(std::string_view pattern) { return pattern == "*" || pattern.ends_with("/*"); }

Error check_subscribe(std::string_view pattern, const DeliveryCallback& callback,
                      const SubscribeOptions& options, bool closed) {
  if (!is_valid_pattern(pattern))
    return Error(errc::invalid_topic, "invalid topic pattern '" + std::string(pattern.substr(0, 300)) + "'");
  if (!callback) return Error(errc::bad_request, "subscribe needs a callback");
  if (options.max_queue == 0) return Error(errc::bad_request, "max_queue must be at least 1");
  if (closed) return Error(errc::shutting_down, "bus is closed");
  if (is_wildcard(pattern) && options.since_seq)
    return Error(errc::bad_request,
                 "since_seq cannot be used with a wildcard pattern; wildcard subscriptions are live only");
  return {};
}
}  // namespace

RedisBus::impl::sub_ptr RedisBus::impl::make_subscription(std::string_view pattern, DeliveryCallback callback,
                                                          const SubscribeOptions& o) {
  const bool wildcard = is_wildcard(pattern);
  auto sub = std::make_shared<subscription>();
  sub->bus = weak_from_this();
  sub->pattern = std::string(pattern);
  sub->wildcard = wildcard;
  sub->callback = std::move(callback);
  sub->executor = o.executor ? o.executor : delivery_pool;
  sub->max_queue = o.max_queue;
  sub->overflow = o.overflow;
  sub->snapshot_source = o.snapshot_source;
  sub->buffering = !wildcard;
  sub->catching_up = !wildcard;
  return sub;
}

std::pair<std::shared_ptr<RedisBus::impl::channel_state>, bool> RedisBus::impl::register_subscription(
    const sub_ptr& sub, const op_ptr& op) {
  std::shared_ptr<channel_state> state;
  bool first = false, confirmed = false;
  {
    std::lock_guard lock(mutex);
    auto& slot = (sub->wildcard ? patterns : topics)[sub->pattern];
    if (!slot) {
      slot = std::make_shared<channel_state>();
      first = true;
    }
    slot->subs.push_back(sub);
    confirmed = slot->confirmed;
    {
      std::lock_guard sl(sub->mutex);
      sub->live_ok = confirmed;
    }
    if (op) {
      pending_ops.emplace(op.get(), op);
      // Confirmed already: the catch-up starts at once (on the I/O thread, below); otherwise the
      // confirmation starts it (send_subscribe), on this connection or the next.
      if (!slot->confirmed) slot->waiting.push_back(op);
    }
    state = slot;
  }
  live_subs.fetch_add(1, std::memory_order_relaxed);
  if (first)
    asio::post(io, [this, wildcard = sub->wildcard, name = sub->pattern, channel = state] {
      send_subscribe(wildcard, name, channel);
    });
  return {state, confirmed};
}

void RedisBus::impl::arm(const op_ptr& op) {
  const auto generation = ++op->timer_generation;
  op->timer.expires_after(options.command_timeout);
  op->timer.async_wait([weak = weak_from_this(), op, generation](boost::system::error_code ec) {
    auto self = weak.lock();
    if (ec || !self || op->finished || generation != op->timer_generation) return;
    // As the blocking calls do: a Redis that does not answer is dropped as stalled.
    if (op->reading) {
      self->commands->check_stalled(self->options.command_timeout);
      self->finish(op, Error(errc::bus_unavailable,
                             "Redis at " + self->commands->where() + " did not answer within " +
                                 std::to_string(self->options.command_timeout.count()) + " ms"));
    } else {
      self->subscriber->check_stalled(self->options.command_timeout);
      self->finish(op, Error(errc::bus_unavailable, "Redis at " + self->subscriber->where() +
                                                        " did not confirm the subscription to '" +
                                                        op->sub->pattern + "'"));
    }
  });
}

void RedisBus::impl::on_confirmed(const op_ptr& op) {
  if (op->finished) return;
  if (op->sub->wildcard) return finish(op, {});
  op->reading = true;
  read_async(op);
}

void RedisBus::impl::read_async(const op_ptr& op) {
  arm(op);  // each read gets command_timeout, as each blocking call does
  const auto start = begin_read(op->sub);
  eval_or_send(read_command(op->sub->pattern, op->req.since_seq.value_or(0), true),
               [weak = weak_from_this(), op, start](result<reply_ptr> r) {
                 auto self = weak.lock();
                 if (!self || op->finished) return;
                 auto t = self->parse_read(op->sub->pattern, std::move(r));
                 if (!t) {
                   self->read_failed(op->sub);
                   return self->finish(op, t.error());
                 }
                 if (!t->last && op->sub->snapshot_source) {
                   // Redis has nothing of the topic: the snapshot may come from the source (the
                   // gateway's store read, which may block): called on the control thread, never
                   // on the I/O thread; the read is applied back here. The source is the
                   // caller's to bound: no command_timeout while it runs.
                   ++op->timer_generation;
                   op->timer.cancel();
                   return self->control->post([weak, op, start, t = std::move(*t)]() mutable {
                     std::shared_ptr<const boost::json::value> data;
                     try {
                       data = op->sub->snapshot_source();
                     }
                     PUSHBOOK_RETHROW_FORCED_UNWIND
                     catch (...) {
                       // A source that throws gives no snapshot, as one that returns null.
                     }
                     auto again = weak.lock();
                     if (!again) return;
                     asio::post(again->io,
                                [weak, op, start, t = std::move(t), data = std::move(data)]() mutable {
                                  auto owner = weak.lock();
                                  if (!owner || op->finished) return;
                                  if (owner->apply_read(op->sub, op->req, start, t, &data))
                                    return owner->read_async(op);
                                  owner->finish(op, {});
                                });
                   });
                 }
                 if (self->apply_read(op->sub, op->req, start, *t)) return self->read_async(op);
                 self->finish(op, {});
               });
  watch_stalls();
}

void RedisBus::impl::finish(const op_ptr& op, Error error) {
  if (op->finished) return;
  op->finished = true;
  ++op->timer_generation;
  op->timer.cancel();
  {
    std::lock_guard lock(mutex);
    pending_ops.erase(op.get());
    auto& registry = op->sub->wildcard ? patterns : topics;
    if (auto it = registry.find(op->sub->pattern); it != registry.end()) std::erase(it->second->waiting, op);
  }
  // A subscription the bus's destructor cancelled meanwhile is no success.
  if (!error.code && (closed.load() || op->sub->cancelled.load()))
    error = Error(errc::shutting_down, "bus is closed");
  auto done = std::move(op->done);
  op->done = nullptr;
  // On failure the subscription goes before `done` runs: nothing was delivered (an exact topic
  // buffers until its catch-up applies; a wildcard receives nothing before its confirmation).
  if (error.code) op->sub->cancel();
  try {
    if (error.code)
      done(std::move(error));
    else
      done(Subscription(op->sub));
  }
  PUSHBOOK_RETHROW_FORCED_UNWIND
  catch (...) {
    // The caller's callback must not take the I/O thread down.
  }
}

void RedisBus::impl::fail_pending(const Error& error) {
  std::vector<op_ptr> ops;
  {
    std::lock_guard lock(mutex);
    for (auto& [raw, op] : pending_ops) ops.push_back(op);
  }
  for (auto& op : ops) finish(op, error);
}

void RedisBus::subscribe_async(std::string_view pattern, DeliveryCallback callback, SubscribeOptions options,
                               SubscribeCallback done) {
  if (!done) done = [](result<Subscription>) {};
  if (auto e = check_subscribe(pattern, callback, options, impl_->closed.load(std::memory_order_relaxed));
      e.code)
    return done(std::move(e));
  auto& b = *impl_;
  auto op = std::make_shared<impl::pending_subscribe>(b.io);
  op->sub = b.make_subscription(pattern, std::move(callback), options);
  op->req = {options.since_seq, options.since_epoch, options.snapshot};
  op->done = std::move(done);
  // Everything else on the I/O thread, which then owns the op: registered there, so that the
  // timer, the confirmation and the read's reply are never concurrent. Posts from one thread run
  // in order, so subscriptions are registered (and their SUBSCRIBEs sent) in the order of calls.
  asio::post(b.io, [weak = std::weak_ptr<impl>(impl_), op] {
    auto self = weak.lock();
    if (!self || self->closed.load()) {
      op->finished = true;
      auto report = std::move(op->done);
      try {
        report(Error(errc::shutting_down, "bus is closed"));
      }
      PUSHBOOK_RETHROW_FORCED_UNWIND
      catch (...) {
      }
      return;
    }
    self->arm(op);
    if (self->register_subscription(op->sub, op).second) self->on_confirmed(op);
  });
}

result<Subscription> RedisBus::subscribe(std::string_view pattern, DeliveryCallback callback,
                                         SubscribeOptions options) {
  if (auto e = check_subscribe(pattern, callback, options, impl_->closed.load(std::memory_order_relaxed));
      e.code)
    return e;
  const bool wildcard = is_wildcard(pattern);
  if (impl_->on_io_thread())
    return Error(errc::bad_request, "subscribe from RedisBus's own I/O thread (an inline callback)");

  auto sub = impl_->make_subscription(pattern, std::move(callback), options);
  auto state = impl_->register_subscription(sub, nullptr).first;
  Subscription handle(sub);  // cancels (and unregisters) on every early return below
  {
    // This node receives the topic's events only once Redis confirmed the subscription.
    std::unique_lock lock(impl_->mutex);
    if (!impl_->changed.wait_for(lock, impl_->options.command_timeout, [&] { return state->confirmed; })) {
      asio::post(impl_->io, [b = impl_.get()] {
        b->subscriber->check_stalled(b->options.command_timeout);
        b->watch_stalls();
      });
      return Error(errc::bus_unavailable, "Redis at " + impl_->subscriber->where() +
                                              " did not confirm the subscription to '" + sub->pattern + "'");
    }
  }
  if (wildcard) return result<Subscription>(std::move(handle));
  Error error;
  catch_up_request req{options.since_seq, options.since_epoch, options.snapshot};
  if (!impl_->catch_up(sub, req, &error)) return error;
  return result<Subscription>(std::move(handle));
}

EventPtr RedisBus::last(std::string_view topic_name) const {
  if (!is_valid_topic(topic_name)) return nullptr;
  auto r = impl_->read(topic_name, std::numeric_limits<std::uint64_t>::max() / 2, false);
  return r ? r->last : nullptr;
}

std::vector<EventPtr> RedisBus::history(std::string_view topic_name, std::uint64_t since_seq) const {
  if (!is_valid_topic(topic_name)) return {};
  auto r = impl_->read(topic_name, since_seq, false);
  return r ? std::move(r->entries) : std::vector<EventPtr>{};
}

RedisBusStats RedisBus::stats() const {
  RedisBusStats st;
  st.published = impl_->published.load();
  st.delivered = impl_->delivered.load();
  st.dropped = impl_->dropped.load();
  st.slow_consumer_ends = impl_->slow_ends.load();
  st.subscriptions = impl_->live_subs.load();
  st.received = impl_->received.load();
  st.reconnects = impl_->reconnects.load();
  st.publish_failures = impl_->publish_failures.load();
  st.resyncs = impl_->resyncs.load();
  {
    std::lock_guard lock(impl_->mutex);
    st.channels = impl_->topics.size() + impl_->patterns.size();
  }
  return st;
}

}  // namespace pushbook
