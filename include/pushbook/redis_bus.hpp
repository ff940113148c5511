// pushbook/redis_bus.hpp: an EventBus backed by Redis, so that several processes (gateway nodes)
// share one numbering per topic, one history and one stream of events.
//
// Every publish runs one Lua script in Redis that, atomically, increments the topic's sequence
// counter, reads (or creates) the topic's epoch, appends {seq, time, data} to the topic's capped
// history stream, stores the last value and PUBLISHes the event on the topic's channel. A node
// SUBSCRIBEs to a topic's channel while it has local subscribers of the topic (PSUBSCRIBE for a
// trailing wildcard) and fans the events out locally, with LocalBus's delivery semantics.
//
// What differs from LocalBus (see also docs/architecture.md, "RedisBus"):
// - publish() needs Redis: while Redis is unreachable it fails with errc::bus_unavailable (never
//   queued, never dropped silently). A publish whose connection is lost before its reply came
//   also fails with bus_unavailable, although Redis may have executed it: the event may then be
//   delivered although publish() reported failure (at most a duplicate, never a lost event; a
//   publisher that numbers its events with PublishOptions::seq and retries gets already_exists
//   instead of a duplicate).
// - subscribe() needs Redis too (it waits for the SUBSCRIBE confirmation and reads history) and
//   fails with errc::bus_unavailable when it cannot get them within command_timeout.
//   subscribe_async() does the same without blocking any thread (the gateway's hub uses it).
// - last() and history() read Redis: while it is unreachable they return nullptr / nothing.
// - When the connection is lost, events published meanwhile by other nodes are not received
//   live. After reconnecting the bus resubscribes and each exact-topic subscriber catches up as
//   if it resubscribed with since = the last seq it was given: the missed events from history,
//   or a snapshot where history does not reach or the epoch changed (Redis lost its data).
//   Wildcard subscribers cannot be caught up (they have no history): they get a `gap` delivery
//   with `dropped` = 0, meaning "an unknown number of events was missed".
// - Timestamps come from Redis's clock (TIME), in microseconds, so every node agrees on them.
// - With inline_executor, live callbacks run on the bus's I/O thread, not on the publisher's,
//   and must not call publish(), subscribe(), last() or history() of this bus (publish() from
//   that thread fails with errc::bad_request rather than deadlocking).
// - Topics are forgotten by Redis key expiry (topic_idle_ttl after their last publish, even while
//   a node has subscribers: Redis cannot see them) rather than by an LRU bound on the number of
//   topics (Redis's maxmemory policy is that bound). The next publish then starts a new epoch at
//   seq 1, which live subscribers receive as an ordinary event of the new epoch.
#pragma once

#include <pushbook/event_bus.hpp>
#include <pushbook/export.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace pushbook {

struct RedisBusOptions {
  /// Where Redis is: "redis://[:password@]host[:port][/db]" (port 6379 by default) or
  /// "unix:/path/to/redis.sock" (database and password from `database` and `password`).
  std::string address = "redis://127.0.0.1:6379";
  /// Sent with AUTH on connect when not empty (a password in `address` takes precedence).
  std::string password;
  /// Selected on connect when not 0 (a database in `address` takes precedence).
  int database = 0;
  /// Prepended to every key and channel this bus uses, so that several pushbook deployments (or
  /// tests) can share one Redis. Buses that should see each other's events use the same prefix.
  std::string key_prefix = "pushbook:";
  /// History kept per topic in Redis: at most this many events are replayed or returned by
  /// history() (Redis trims the stream approximately, a stream node at a time, so it may store
  /// up to ~100 more; reads apply the exact limit)...
  std::size_t history_limit = 256;
  /// ...and none older than this (entries are filtered by age when read; the whole history
  /// stream expires this long after the topic's last publish).
  std::chrono::milliseconds history_max_age = std::chrono::minutes(10);
  /// A topic's keys (sequence counter, epoch, last value) expire this long after its last
  /// publish, so that one-off topics such as booking/<id> do not grow Redis's memory.
  std::chrono::milliseconds topic_idle_ttl = std::chrono::hours(1);
  /// Time allowed to establish a connection (TCP connect and handshake).
  std::chrono::milliseconds connect_timeout = std::chrono::seconds(2);
  /// Time a blocking call (publish, subscribe, last, history) waits for its reply.
  std::chrono::milliseconds command_timeout = std::chrono::seconds(2);
  /// Reconnect backoff: the first retry after reconnect_min, doubling up to reconnect_max.
  std::chrono::milliseconds reconnect_min = std::chrono::milliseconds(50);
  std::chrono::milliseconds reconnect_max = std::chrono::seconds(2);
  /// Threads of the default delivery executor (used by subscriptions that name none).
  std::size_t delivery_threads = 1;
  /// Receives a line when a connection to Redis is lost, fails, or is established again (from
  /// the bus's I/O thread: it must not block). Empty: nothing is logged.
  std::function<void(const std::string&)> log;
};

/// Counters of a RedisBus.
struct RedisBusStats {
  std::uint64_t published = 0;
  std::uint64_t delivered = 0;
  std::uint64_t dropped = 0;
  std::uint64_t slow_consumer_ends = 0;
  std::uint64_t subscriptions = 0;
  /// Event messages this node received from Redis (its routing: only what it subscribed to).
  std::uint64_t received = 0;
  /// Channels and patterns this node is subscribed to in Redis now.
  std::uint64_t channels = 0;
  /// Connections (re)established after the first one.
  std::uint64_t reconnects = 0;
  /// Publishes that failed because Redis was unreachable (errc::bus_unavailable).
  std::uint64_t publish_failures = 0;
  /// Subscribers caught up after a reconnect (from history or a snapshot).
  std::uint64_t resyncs = 0;
};

/// The EventBus backed by Redis: one command connection (pipelined: concurrent publishes share
/// it) and one subscriber connection, run by Boost.Asio on a thread of the bus's own.
class PUSHBOOK_EXPORT RedisBus final : public EventBus {
 public:
  /// Starts connecting in the background; the constructor does not wait for Redis.
  /// Throws pushbook::Exception (errc::bad_request) for an address it cannot parse.
  explicit RedisBus(RedisBusOptions options = {});
  /// Ends every subscription (no more callbacks start), waits for running callbacks and
  /// closes the connections.
  ~RedisBus() override;
  RedisBus(const RedisBus&) = delete;
  RedisBus& operator=(const RedisBus&) = delete;

  using EventBus::publish;
  /// Errors: those of EventBus::publish, and errc::bus_unavailable while Redis is unreachable.
  /// PublishOptions::seq is compared and set by the publish script, atomically in Redis, so it
  /// holds across every node sharing the Redis: of two nodes relaying the same numbered event,
  /// exactly one delivers it. A publish that failed with bus_unavailable although Redis ran it,
  /// retried with the same seq, fails with already_exists instead of delivering it twice.
  result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                           const PublishOptions& options) override;
  using EventBus::publish_async;
  /// Pipelined: the script is queued on the command connection and `done` runs on the bus's I/O
  /// thread with the reply (bus_unavailable when Redis is unreachable or does not answer within
  /// command_timeout). `done` must not block nor call the bus's blocking functions.
  void publish_async(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                     const PublishOptions& options, PublishCallback done) override;
  /// publish() and publish_async() with the payload's text (EventBus::publish_json): sent to
  /// Redis as it is, and kept as it is by the event returned.
  result<EventPtr> publish_json(std::string_view topic, std::shared_ptr<const std::string> json_text,
                                const PublishOptions& options) override;
  void publish_json_async(std::string_view topic, std::shared_ptr<const std::string> json_text,
                          const PublishOptions& options, PublishCallback done) override;
  /// Errors: those of EventBus::subscribe, and errc::bus_unavailable while Redis is unreachable.
  /// Blocks for two round trips (the SUBSCRIBE confirmation, then the history read), each up to
  /// command_timeout; refused (bad_request) on the bus's I/O thread. subscribe_async does not block.
  result<Subscription> subscribe(std::string_view pattern, DeliveryCallback callback,
                                 SubscribeOptions options = {}) override;
  /// Never blocks, from any thread including the bus's I/O thread (an inline callback, another
  /// `done`). The subscriber is registered on the I/O thread; once the topic's channel is
  /// confirmed (at once when this node already has it) the history read is queued on the command
  /// connection, and its reply is applied with subscribe()'s catch-up rules (no gap, no
  /// duplicate against live events; a read that raced with a lost connection is read again).
  /// `done` runs on the I/O thread, after the replay or snapshot was handed to the subscription's
  /// executor (with inline_executor(): delivered); it must not block nor call the bus's blocking
  /// functions. A wildcard is done once confirmed. Errors as subscribe(): argument errors before
  /// returning, on the caller's thread; bus_unavailable when the confirmation, or a read, takes
  /// longer than command_timeout (the subscription is then cancelled: nothing is delivered);
  /// shutting_down when the bus is destroyed first (its destructor calls every pending `done`).
  void subscribe_async(std::string_view pattern, DeliveryCallback callback, SubscribeOptions options,
                       SubscribeCallback done) override;
  /// nullptr as well when Redis is unreachable.
  EventPtr last(std::string_view topic) const override;
  /// Nothing as well when Redis is unreachable.
  std::vector<EventPtr> history(std::string_view topic, std::uint64_t since_seq = 0) const override;

  /// Waits until both connections are established (or `timeout` passes); true when they are.
  bool wait_connected(std::chrono::milliseconds timeout) const;
  /// Both connections are established (connected and handshaken) now.
  bool available() const noexcept override;
  RedisBusStats stats() const;

 private:
  void publish_trusted_json_async(std::string_view topic, std::shared_ptr<const std::string> json_text,
                                  const PublishOptions& options, PublishCallback done) override;
  struct impl;
  std::shared_ptr<impl> impl_;
};

}  // namespace pushbook
