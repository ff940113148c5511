// BookingEngine.
//
// Threads: callers of submit()/cancel()/confirm()/release(); `workers` decider threads; one
// timer thread (handler timeouts, hold expiry, publish retries); any thread a host handler
// completes on; whichever thread the bus answers a publish_async on (publishing's next steps).
//
// Locks, always taken in this order (never the reverse):
//   queue_mutex -> resources_mutex          (a worker hands over between them, see worker())
//   booking lock (per id, striped) -> resources_mutex -> lane shard mutex
//   issued_mutex -> lane shard mutex; relay_mutex and the unpublished-ids stripes are taken alone
//   idempotency_mutex (never held with another engine lock)
// With a bus that answers publish_async before returning (LocalBus) the bus's own locks come
// after these.
//
// Store first, then memory, then publish: every state change is committed to the store
// (BookingStore::commit_async) and only its completion changes the in-memory resource counts and
// publishes. The one thing memory does ahead of the store is a worker's reservation of units for
// a booking being decided: it is tentative (the booking is still processing in the store, and a
// restart recomputes counts from stored states), and it keeps those units from anyone else until
// the decision is stored.
//
// Order of a booking's events: changes of one booking are made under its booking lock. With an
// inline store (MemoryStore) the completion runs inside that lock; with a store that completes
// on its own thread, completions run there one at a time in commit order, and the engine never
// commits a booking's next version before the previous one completed. Either way "booking/<id>"
// sees the versions in order. Completions never take a booking lock (a thread holding one may be
// waiting for the store), and never wait for the store.
// Resource availability events are handed to the bus under resources_mutex for the same reason;
// the publish lanes keep that order to the bus. Callbacks of subscribers that use
// inline_executor() may run under these locks (LocalBus) and must not call back into the engine.
//
// Published means relayed (docs/architecture.md): "booking/<id>" events carry seq = version, so
// the bus drops a version published twice. Events go out with publish_async, in per-topic lanes
// (see "publishing" below): an event the bus refuses is published again after a backoff, and
// later events of its topic wait behind it (never around it: a later version published first
// would make the bus drop the earlier one as a duplicate, and a user/ or resource/ topic's last
// value would go back in time). A change's events go user/ first, booking/ last: once
// booking/<id> took a version, its user/ event went out before it, which is what a relay relies
// on (below).
// Lane shard mutexes are taken under the booking lock and resources_mutex, and under
// issued_mutex; never the reverse. The bus and the store are never called with either held.
#include <pushbook/booking_engine.hpp>

#include "detail/adaptive_spin.hpp"
#include "detail/booking_id.hpp"
#include "detail/forced_unwind.hpp"
#include "detail/front_queue.hpp"
#include "detail/json_text.hpp"
#include "detail/string_hash.hpp"
#include "detail/timer_queue.hpp"

#include <fmt/format.h>
#include <boost/json/serialize.hpp>
#include <boost/unordered/unordered_flat_map.hpp>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

namespace pushbook {
namespace {

using steady = std::chrono::steady_clock;

using detail::string_hash;

// The request as the idempotency check compares it: equal strings mean the same request. Stored
// with the key, so a restarted engine compares retries the same way.
std::string fingerprint(const BookingRequest& r) {
  std::string f;
  for (const auto& l : r.lines) fmt::format_to(std::back_inserter(f), "{}:{};", l.resource, l.quantity);
  f += '|';
  if (r.hold_for) f += std::to_string(r.hold_for->count());
  f += '|';
  f += boost::json::serialize(r.metadata);
  return f;
}

}  // namespace

struct Completion::state {
  std::weak_ptr<detail::engine_core> engine;
  Booking booking;
  steady::time_point submitted;
  steady::time_point deadline;  // the handler must answer by then (counted from its call)
  std::atomic<bool> done{false};
  std::mutex timer_mutex;
  std::optional<detail::TimerQueue::timer_id> timer;
};

struct detail::engine_core : std::enable_shared_from_this<engine_core> {
  struct job {
    Booking booking;
    steady::time_point submitted;
  };
  struct idempotency_entry {
    std::string fingerprint;
    std::string booking_id;
    steady::time_point expires;
    // The booking's first version is stored: a retry that finds no booking then knows the store
    // let it go (MemoryStore retention), not that it is still being stored.
    bool stored = false;
  };
  // What one user has going, for the per-user quotas.
  struct user_usage {
    std::size_t in_flight = 0;
    std::uint64_t held_units = 0;
  };

  EventBusPtr bus;
  EngineOptions options;
  std::shared_ptr<BookingStore> store;
  detail::BookingIdGenerator ids;

  mutable std::shared_mutex resources_mutex;
  std::unordered_map<std::string, ResourceState, string_hash, std::equal_to<>> resources;

  std::array<std::mutex, 64> booking_locks;

  std::mutex idempotency_mutex;
  std::unordered_map<std::string, idempotency_entry> idempotency;
  std::deque<std::pair<steady::time_point, std::string>> idempotency_order;

  std::mutex queue_mutex;
  std::condition_variable queue_cv;
  std::deque<job> queue;
  std::atomic<std::size_t> queued{0};  // slots taken, including ones being filled by submit()
  std::size_t parked_workers = 0;      // guarded by queue_mutex
  std::atomic<bool> stopping{false};
  std::vector<std::thread> workers;
  std::mutex shutdown_mutex;

  std::mutex resources_admin_mutex;  // serialises add_resource and set_capacity (put_capacity)
  result<void> put_capacity(std::string_view id, std::uint32_t capacity, bool create);
  // Resources recovered from the store that no add_resource() of this process has named yet:
  // their first add_resource() reconciles instead of failing with already_exists.
  std::unordered_set<std::string, string_hash, std::equal_to<>> undeclared;  // resources_mutex

  // Per-user quotas (EngineOptions::max_in_flight_per_user, max_held_units_per_user); a user
  // with nothing going has no entry. Not kept at all when both quotas are off.
  bool quotas = false;
  std::mutex usage_mutex;
  std::unordered_map<std::string, user_usage, string_hash, std::equal_to<>> usage;

  std::mutex in_flight_mutex;
  std::condition_variable in_flight_cv;
  // Bookings whose processing commit was started and that are not decided (and stored) yet.
  std::atomic<std::uint64_t> in_flight{0};

  std::atomic<std::uint64_t> accepted{0}, confirmed{0}, rejected{0}, held{0}, cancelled{0}, released{0},
      expired{0}, replays{0}, invalid{0}, overloaded{0}, store_errors{0}, recovered{0}, quota_refused{0},
      publish_failures{0}, publish_retries{0}, publish_dropped{0}, relayed{0}, taken_over{0}, claims_lost{0};

  LatencyHistogram ack_latency, decision_latency;

  // Declared last: destroyed first, so no timer runs against a half-destroyed engine.
  detail::TimerQueue timers;

  engine_core(EventBusPtr b, EngineOptions o)
      : bus(std::move(b)),
        options(std::move(o)),
        store(options.store ? options.store : std::make_shared<MemoryStore>()),
        ids(options.node_id.value_or(detail::BookingIdGenerator::random_node_id()),
            detail::BookingIdGenerator::random_counter_start()),
        quotas(options.max_in_flight_per_user > 0 || options.max_held_units_per_user > 0) {}

  std::mutex& lock_for(std::string_view booking_id) {
    return booking_locks[string_hash{}(booking_id) % booking_locks.size()];
  }

  // --- publishing ---------------------------------------------------------------------------
  //
  // Events go to the bus with publish_async: no thread of the engine (nor a gateway thread
  // submitting a booking) waits for the bus, and a bus over the network (RedisBus) takes them
  // pipelined. What keeps them in order is the engine's, not the bus's:
  //  - a topic has at most one event in flight: the next waits in the topic's lane until the
  //    previous one is taken (or dropped), so a topic's events reach the bus in the order the
  //    engine made them, whichever thread the outcomes come back on and however a refusal and a
  //    reconnection interleave;
  //  - one change's events (a chain) go one after the other: user/<user>, then booking/<id>
  //    once user/ was taken (a relay: booking/<id>, then user/ only if the version was new);
  //  - a refused event is published again after a backoff (timer thread), its lane waiting
  //    behind it; a resource's lane keeps only its latest state meanwhile;
  //  - while a relay of a booking is under way (at start), the booking's new changes wait for it
  //    (parked), so its user/ event, which follows the relayed booking/ one, is not overtaken.
  // Lanes are taken in the caller's order: resource events under resources_mutex, a booking's
  // under its booking lock, so "the order the engine made them" is the order of those locks.

  // One change's events, published in order.
  struct chain {
    std::vector<OutboxEvent> events;
    std::size_t next = 0;  // the event being published
    // A relay: events[0] is booking/<id>; when the bus already has that version, the rest went
    // with it before (the order above), and is not published again.
    bool relay = false;
    // Set for a booking's change: the store hears the version is published once all went.
    std::string booking_id;
    std::uint64_t version = 0;
    bool retried = false;   // waited behind a refusal (EngineStats::publish_retries)
    unsigned failures = 0;  // refusals of the current event in a row, for the backoff
    // Hand-offs to the bus (send()) and answers taken: at most one is outstanding, so the answer
    // to send number N moves `answers` from N - 1 to N, once (a bus that answers twice, or answers
    // and then throws, is heard once).
    std::atomic<std::uint64_t> sends{0}, answers{0};
    bool take_answer(std::uint64_t send) {
      auto expected = send - 1;
      return answers.compare_exchange_strong(expected, send, std::memory_order_acq_rel);
    }
    std::size_t remaining() const { return events.size() - next; }
  };
  using chain_ptr = std::shared_ptr<chain>;
  struct lane {
    chain_ptr head;                  // the chain whose event is at the bus or to be retried
    front_queue<chain_ptr> waiting;  // behind it
    bool failing = false;            // the head's event was refused at least once
  };
  struct lane_shard {
    std::mutex mutex;
    // Busy topics only: a lane is made and freed for nearly every event. Open addressing, so
    // that costs no node allocation and a lookup no walk along a chain.
    boost::unordered_flat_map<std::string, lane, string_hash, std::equal_to<>> lanes;
  };
  std::array<lane_shard, 16> lane_shards;
  // Events not yet taken by the bus (in flight, waiting in a lane or to be retried).
  std::atomic<std::size_t> pending_events{0};
  // Publishes handed to the bus whose outcome has not come back (and ones about to be handed):
  // shutdown() waits for none, since the outcome runs engine code.
  std::mutex issued_mutex;
  std::condition_variable issued_cv;
  std::size_t issued = 0;           // issued_mutex
  bool publishing_stopped = false;  // issued_mutex: shutdown() is waiting for `issued`
  // Booking ids with a chain not finished, and how many: the gateway's snapshot of such a booking
  // from the store would be ahead of its events on the bus (publishing()).
  struct unpublished_shard {
    std::mutex mutex;
    boost::unordered_flat_map<std::string, unsigned, string_hash, std::equal_to<>> ids;
  };
  std::array<unpublished_shard, 16> unpublished_ids;
  // Chains of bookings being relayed, parked until the relay is done (relay_mutex).
  std::mutex relay_mutex;
  std::unordered_map<std::string, std::vector<chain_ptr>, string_hash, std::equal_to<>> relaying;
  std::atomic<std::size_t> relays{0};  // entries in `relaying`: publish() looks without the mutex

  lane_shard& shard_for(std::string_view topic) {
    return lane_shards[string_hash{}(topic) % lane_shards.size()];
  }
  static bool is_resource_topic(std::string_view topic) { return topic.starts_with("resource/"); }

  // The engine's own counts of `r` changed. Caller holds resources_mutex.
  void publish_resource(const ResourceState& r) {
    // A store that holds the counts of several processes reports them (publish_counts); this
    // process's counts know only its own bookings.
    if (store_counts) return;
    publish_resource_event(r);
  }

  void publish_resource_event(const ResourceState& r) {
    auto c = std::make_shared<chain>();
    c->events.push_back({"resource/" + r.id, detail::json_text(r), r.version});
    // Never dropped for the bound: a resource's lane holds at most two events (one at the bus, the
    // latest state behind it), and a dropped state would leave the topic's last value stale for
    // good (resources are not relayed).
    start(std::move(c), false);
  }

  // The counts a shared store's transaction left (BookingStore::on_resource_counts, on the
  // store's completion thread), numbered with the resource's version in the store: the bus drops
  // a version older than one another process already published.
  void publish_counts(std::vector<ResourceState> counts) {
    for (const auto& r : counts)
      if (r.version > 0 && r.version <= max_publish_seq) publish_resource_event(r);
  }
  bool store_counts = false;  // set before recover(): the store reports resource counts

  // The events announcing `b`: user/<user>, then booking/<id> numbered by the version, one JSON
  // text shared by both. In this order: see the top of this file.
  static std::vector<OutboxEvent> events_for(const Booking& b) {
    auto data = detail::json_text(b);
    std::vector<OutboxEvent> events;
    events.reserve(2);
    events.push_back({"user/" + b.user, data, 0});
    events.push_back({"booking/" + b.id, std::move(data), b.version});
    return events;
  }

  // Publishes a stored change's events; the store hears that the version is published once the
  // last of them went.
  void publish(std::vector<OutboxEvent> events, const Booking& b) {
    auto c = std::make_shared<chain>();
    c->events = std::move(events);
    c->booking_id = b.id;
    c->version = b.version;
    if (relays.load(std::memory_order_acquire) > 0) {
      std::lock_guard lock(relay_mutex);
      if (auto it = relaying.find(b.id); it != relaying.end()) {
        mark_unpublished(b.id);
        it->second.push_back(std::move(c));
        return;
      }
    }
    mark_unpublished(b.id);
    start(std::move(c));
  }

  // Publishes a version found unpublished in the store (at start, or handed over by a store
  // shared with a process that died: BookingStore::Takeover::relay): booking/<id> first, and its
  // user/ event only when the bus took the version (not a duplicate).
  void relay(const Booking& b) {
    auto events = events_for(b);
    std::swap(events[0], events[1]);
    auto c = std::make_shared<chain>();
    c->events = std::move(events);
    c->relay = true;
    c->booking_id = b.id;
    c->version = b.version;
    relayed.fetch_add(1, std::memory_order_relaxed);
    {
      std::lock_guard lock(relay_mutex);
      relaying.try_emplace(b.id);
      relays.store(relaying.size(), std::memory_order_release);
    }
    mark_unpublished(b.id);
    start(std::move(c));
  }

  // A relay of `id` is done (published or dropped): the changes parked behind it go now.
  void relay_done(const std::string& id) {
    std::vector<chain_ptr> parked;
    {
      std::lock_guard lock(relay_mutex);
      auto it = relaying.find(id);
      if (it == relaying.end()) return;
      parked = std::move(it->second);
      relaying.erase(it);
      relays.store(relaying.size(), std::memory_order_release);
    }
    bool stopped;
    {
      std::lock_guard lock(issued_mutex);
      stopped = publishing_stopped;
    }
    for (auto& c : parked) {
      if (stopped) {  // the relay was dropped at shutdown: so are the changes behind it
        publish_dropped.fetch_add(c->remaining(), std::memory_order_relaxed);
        chain_done(*c);
      } else {
        start(std::move(c));
      }
    }
  }

  unpublished_shard& unpublished_for(std::string_view id) {
    return unpublished_ids[string_hash{}(id) % unpublished_ids.size()];
  }
  void mark_unpublished(const std::string& id) {
    auto& shard = unpublished_for(id);
    std::lock_guard lock(shard.mutex);
    ++shard.ids[id];
  }
  // c is finished or dropped: its booking has one unfinished chain less (and a relay is done).
  void chain_done(const chain& c) {
    if (c.booking_id.empty()) return;
    {
      auto& shard = unpublished_for(c.booking_id);
      std::lock_guard lock(shard.mutex);
      if (auto it = shard.ids.find(c.booking_id); it != shard.ids.end() && --it->second == 0)
        shard.ids.erase(it);
    }
    if (c.relay) relay_done(c.booking_id);
  }
  bool publishing(std::string_view id) {
    auto& shard = unpublished_for(id);
    std::lock_guard lock(shard.mutex);
    return shard.ids.contains(id);
  }

  // `bounded`: dropped (and counted) when max_publish_backlog events already wait for the bus.
  void start(chain_ptr c, bool bounded = true) {
    const auto n = c->remaining();
    if (pending_events.fetch_add(n, std::memory_order_acq_rel) >= options.max_publish_backlog && bounded) {
      pending_events.fetch_sub(n, std::memory_order_acq_rel);
      publish_dropped.fetch_add(n, std::memory_order_relaxed);
      chain_done(*c);
      return;
    }
    advance(std::move(c));
  }

  // Publishes c's current event now when its topic has nothing in flight, else queues it in the
  // topic's lane.
  void advance(chain_ptr c) {
    const auto& ev = c->events[c->next];
    {
      auto& shard = shard_for(ev.topic);
      std::lock_guard lock(shard.mutex);
      auto [it, free] = shard.lanes.try_emplace(ev.topic);
      if (free) {
        it->second.head = c;
      } else {
        auto& ln = it->second;
        if (is_resource_topic(ev.topic) && !ln.waiting.empty()) {
          // A resource event carries the whole state: the waiting one takes the newer state.
          ln.waiting.back()->events[0].json = ev.json;
          ln.waiting.back()->events[0].seq = ev.seq;
          pending_events.fetch_sub(1, std::memory_order_acq_rel);
          return;
        }
        if (ln.failing) c->retried = true;
        ln.waiting.push_back(std::move(c));
        return;
      }
    }
    issue(std::move(c), true);
  }

  // Hands c's current event to the bus. Its topic's lane is c's. `fresh` is false for a retry
  // from the timer thread, which shutdown() may have overtaken (then it is dropped).
  void issue(chain_ptr c, bool fresh) {
    {
      std::unique_lock lock(issued_mutex);
      if (publishing_stopped && !fresh) {
        // Only retries come here once publishing stopped: the event stays unpublished (a
        // durable store relays its version at the next start).
        lock.unlock();
        abandon(std::move(c));
        return;
      }
      ++issued;
    }
    // A bus that answers before publish_async returns (LocalBus, any bus using the default)
    // would recurse once per event waiting in a lane or chain: this thread's first issue()
    // publishes what the answers start, in a loop.
    thread_local std::vector<std::pair<engine_core*, chain_ptr>>* deferred = nullptr;
    if (deferred) {
      try {
        deferred->emplace_back(this, c);
      } catch (...) {
        published(std::move(c), Error(errc::internal, "out of memory"));  // retried later
      }
      return;
    }
    // The thread's own list, reused (no allocation per issue): in use only between here and the
    // end of the loop below, where a nested issue() appends to it through `deferred`.
    thread_local std::vector<std::pair<engine_core*, chain_ptr>> work;
    work.clear();
    try {
      work.emplace_back(this, c);
    } catch (...) {
      published(std::move(c), Error(errc::internal, "out of memory"));
      return;
    }
    deferred = &work;
    struct reset {
      ~reset() {
        deferred = nullptr;
        work.clear();  // what was moved out of it: nothing held
      }
    } reset_deferred;
    for (std::size_t i = 0; i < work.size(); ++i) {
      auto [engine, next] = std::move(work[i]);
      engine->send(std::move(next));
    }
  }

  // Hands c's current event to the bus; its answer comes to published() exactly once, also when
  // publish_async throws.
  void send(chain_ptr c) {
    const auto& ev = c->events[c->next];
    PublishOptions po;
    if (ev.seq > 0) po.seq = ev.seq;
    const auto send = c->sends.fetch_add(1, std::memory_order_relaxed) + 1;
    try {
      // The text is the engine's own (detail::json_text): the bus does not check it again.
      detail::TrustedJson::publish_async(*bus, ev.topic, ev.json, po, [this, c, send](result<EventPtr> r) {
        if (c->take_answer(send)) published(c, r);
      });
    } catch (const std::exception& e) {
      if (c->take_answer(send)) published(std::move(c), Error(errc::internal, e.what()));
    }
  }

  enum class publish_outcome { accepted, duplicate, refused, failed };

  publish_outcome classify(const result<EventPtr>& r) {
    if (r) return publish_outcome::accepted;
    if (r.error().is(errc::already_exists)) return publish_outcome::duplicate;
    if (r.error().is(errc::bad_request) || r.error().is(errc::invalid_topic)) {
      publish_dropped.fetch_add(1, std::memory_order_relaxed);  // never better on a retry
      return publish_outcome::refused;
    }
    publish_failures.fetch_add(1, std::memory_order_relaxed);
    return publish_outcome::failed;
  }

  // The bus's answer for c's current event (any thread). The last thing it does with the engine
  // is to count the publish as answered: shutdown() returns once none is left.
  void published(chain_ptr c, const result<EventPtr>& r) {
    struct answered {
      engine_core* engine;
      ~answered() {
        std::lock_guard lock(engine->issued_mutex);
        if (--engine->issued == 0) engine->issued_cv.notify_all();
      }
    } count_answered{this};
    const auto outcome = classify(r);
    // The lane to pass on is this event's topic's: `keep` holds the chain, and so the topic's
    // name, while c moves on (no copy of the name per event).
    const chain_ptr keep = c;
    const std::string& topic = keep->events[keep->next].topic;
    if (outcome == publish_outcome::failed) {
      retry_later(std::move(c));
    } else {
      pending_events.fetch_sub(1, std::memory_order_acq_rel);
      if (c->retried) publish_retries.fetch_add(1, std::memory_order_relaxed);
      c->failures = 0;
      bool finished = ++c->next == c->events.size();
      if (!finished && c->relay && outcome == publish_outcome::duplicate) {
        // The bus had this version: the rest of the change went before it.
        pending_events.fetch_sub(c->remaining(), std::memory_order_acq_rel);
        finished = true;
      }
      // c joins its next topic's lane before it leaves this one. Leaving first opened a window in
      // which c was in no lane: a later change of the same booking could find this lane free, go
      // through it and take the next topic ahead of c (version 2 on booking/<id> before version
      // 1, which the bus then dropped as a duplicate).
      if (!finished) advance(std::move(c));
      // The topic's lane passes to its next waiting chain, or is freed.
      chain_ptr behind;
      {
        auto& shard = shard_for(topic);
        std::lock_guard lock(shard.mutex);
        auto it = shard.lanes.find(topic);
        if (it->second.waiting.empty()) {
          shard.lanes.erase(it);
        } else {
          it->second.failing = false;
          behind = std::move(it->second.waiting.front());
          it->second.waiting.pop_front();
          it->second.head = behind;
        }
      }
      if (finished) {
        if (!c->booking_id.empty()) store->published(c->booking_id, c->version);
        chain_done(*c);
      }
      if (behind) issue(std::move(behind), true);
    }
  }

  // c's current event was refused: it keeps its lane (events of its topic wait behind it) and is
  // published again after a backoff; on shutdown it is dropped instead.
  void retry_later(chain_ptr c) {
    const auto& topic = c->events[c->next].topic;
    c->retried = true;
    {
      auto& shard = shard_for(topic);
      std::lock_guard lock(shard.mutex);
      auto& ln = shard.lanes.find(topic)->second;
      ln.failing = true;
      for (auto& w : ln.waiting) w->retried = true;
      if (is_resource_topic(topic) && !ln.waiting.empty()) {
        // The retry carries the resource's latest state; the waiting one goes.
        c->events[0].json = ln.waiting.back()->events[0].json;
        c->events[0].seq = ln.waiting.back()->events[0].seq;  // the state's number goes with it
        pending_events.fetch_sub(ln.waiting.size(), std::memory_order_acq_rel);
        ln.waiting.clear();
      }
    }
    {
      std::unique_lock lock(issued_mutex);
      if (publishing_stopped) {
        lock.unlock();
        abandon(std::move(c));
        return;
      }
    }
    const auto backoff = std::chrono::milliseconds(std::min(20 << std::min(c->failures, 6u), 1000));
    ++c->failures;
    // The timer queue is destroyed before the rest of the engine, and runs nothing after
    // shutdown(): `this` is valid when it runs.
    timers.schedule(steady::now() + backoff,
                    [this, c = std::move(c)]() mutable { issue(std::move(c), false); });
  }

  // Drops c (and the chains waiting in its lane): the bus refuses and the engine is stopping.
  void abandon(chain_ptr c) {
    std::vector<chain_ptr> dropped{std::move(c)};
    {
      const auto& topic = dropped[0]->events[dropped[0]->next].topic;
      auto& shard = shard_for(topic);
      std::lock_guard lock(shard.mutex);
      if (auto it = shard.lanes.find(topic); it != shard.lanes.end()) {
        for (auto& w : it->second.waiting) dropped.push_back(std::move(w));
        shard.lanes.erase(it);
      }
    }
    for (const auto& d : dropped) {
      pending_events.fetch_sub(d->remaining(), std::memory_order_acq_rel);
      publish_dropped.fetch_add(d->remaining(), std::memory_order_relaxed);
      chain_done(*d);
    }
  }

  // From now on refused events are dropped rather than retried.
  void stop_publishing() {
    std::lock_guard lock(issued_mutex);
    publishing_stopped = true;
  }

  // Once the timers stopped (no retry and no expiry hands the bus anything more): waits for the
  // bus to answer what it was handed, then drops what is left (retries the timers discarded, and
  // what waited behind them).
  void wait_published() {
    {
      std::unique_lock lock(issued_mutex);
      issued_cv.wait(lock, [&] { return issued == 0; });
    }
    for (auto& shard : lane_shards) {
      std::vector<chain_ptr> left;
      {
        std::lock_guard sl(shard.mutex);
        for (auto& [topic, ln] : shard.lanes) {
          if (ln.head) left.push_back(std::move(ln.head));
          for (auto& w : ln.waiting) left.push_back(std::move(w));
        }
        shard.lanes.clear();
      }
      for (const auto& d : left) {
        pending_events.fetch_sub(d->remaining(), std::memory_order_acq_rel);
        publish_dropped.fetch_add(d->remaining(), std::memory_order_relaxed);
        chain_done(*d);
      }
    }
  }

  // Commits `b` and waits; on success runs `then` (memory changes) and hands the events to the
  // bus, in the store's completion, before returning. Caller holds the booking's lock.
  result<void> commit_and_wait(const Booking& b, const std::function<void()>& then) {
    StateChange change{b, events_for(b), {}};
    std::promise<result<void>> stored;
    store->commit_async(change, [&](result<void> r) {
      if (r) {
        if (then) then();
        publish(change.events, b);
      }
      stored.set_value(std::move(r));
    });
    auto r = stored.get_future().get();
    if (!r) store_errors.fetch_add(1, std::memory_order_relaxed);
    return r;
  }

  // --- capacity ----------------------------------------------------------------------------

  // Caller holds resources_mutex exclusively. All lines or none. With `confirm`, the units go
  // straight to confirmed (no handler and no hold: nothing can still reject the booking).
  // Resources whose availability changed are added to `touched`, to be announced once.
  std::optional<std::string> try_reserve(const std::vector<BookingLine>& lines, bool confirm,
                                         std::vector<ResourceState*>& touched) {
    for (const auto& l : lines) {
      auto it = resources.find(l.resource);
      if (it == resources.end()) return fmt::format("resource '{}' was removed", l.resource);
      if (it->second.available() < l.quantity)
        return fmt::format("'{}' has {} of {} units free", l.resource, it->second.available(), l.quantity);
    }
    for (const auto& l : lines) {
      auto& r = resources.find(l.resource)->second;
      (confirm ? r.confirmed : r.reserved) += l.quantity;
      if (std::find(touched.begin(), touched.end(), &r) == touched.end()) touched.push_back(&r);
    }
    return std::nullopt;
  }

  // Moves units between the reserved and confirmed counts, or frees them. Caller holds
  // resources_mutex exclusively.
  enum class capacity_change { reserved_to_confirmed, free_reserved, free_confirmed };
  void apply(const std::vector<BookingLine>& lines, capacity_change change) {
    for (const auto& l : lines) {
      auto it = resources.find(l.resource);
      if (it == resources.end()) continue;
      auto& r = it->second;
      switch (change) {
        case capacity_change::reserved_to_confirmed:
          r.reserved -= l.quantity;
          r.confirmed += l.quantity;
          // Availability is unchanged, but the event carries the reserved and confirmed counts
          // too: a subscriber (or a late snapshot) must never see stale ones.
          publish_resource(r);
          break;
        case capacity_change::free_reserved:
          r.reserved -= l.quantity;
          publish_resource(r);
          break;
        case capacity_change::free_confirmed:
          r.confirmed -= l.quantity;
          publish_resource(r);
          break;
      }
    }
  }

  void change_capacity(const std::vector<BookingLine>& lines, capacity_change change) {
    std::unique_lock lock(resources_mutex);
    apply(lines, change);
  }

  // --- validation --------------------------------------------------------------------------

  result<void> validate(const BookingRequest& r) const {
    if (!is_valid_id(r.user))
      return Error(errc::bad_request, "user must be 1-128 characters of letters, digits and -_.:@+=~");
    if (r.lines.empty()) return Error(errc::bad_request, "a booking needs at least one line");
    if (r.lines.size() > options.max_lines)
      return Error(errc::bad_request, fmt::format("a booking may have at most {} lines", options.max_lines));
    if (!r.idempotency_key.empty() && !is_valid_id(r.idempotency_key))
      return Error(errc::bad_request,
                   "idempotency_key must be 1-128 characters of letters, digits and -_.:@+=~");
    if (r.hold_for && (r.hold_for->count() <= 0 || *r.hold_for > options.max_hold))
      return Error(errc::bad_request,
                   fmt::format("a hold must last from 1 ms to {} ms", options.max_hold.count()));
    if (r.hold_for && options.max_held_units_per_user > 0) {
      const auto asked = units_of(r.lines);
      if (asked > options.max_held_units_per_user)
        return Error(errc::bad_request,
                     fmt::format("a hold of {} units can never be granted: a user may hold at most {}", asked,
                                 options.max_held_units_per_user));
    }
    if (!r.metadata.empty() && options.max_metadata_bytes > 0) {
      if (const auto size = boost::json::serialize(r.metadata).size(); size > options.max_metadata_bytes)
        return Error(errc::bad_request, fmt::format("metadata is {} bytes as JSON; at most {} are allowed",
                                                    size, options.max_metadata_bytes));
    }
    std::shared_lock lock(resources_mutex);
    for (std::size_t i = 0; i < r.lines.size(); ++i) {
      const auto& l = r.lines[i];
      if (!is_valid_id(l.resource))
        return Error(errc::bad_request, fmt::format("lines[{}]: invalid resource id", i));
      if (l.quantity < 1)
        return Error(errc::bad_request, fmt::format("lines[{}]: quantity must be at least 1", i));
      for (std::size_t j = 0; j < i; ++j)
        if (r.lines[j].resource == l.resource)
          return Error(errc::bad_request,
                       fmt::format("lines[{}]: resource '{}' appears twice", i, l.resource));
      auto it = resources.find(l.resource);
      if (it == resources.end())
        return Error(errc::not_found, fmt::format("unknown resource '{}'", l.resource));
      if (l.quantity > it->second.capacity)
        return Error(errc::exceeds_capacity, fmt::format("'{}' has only {} units, {} asked", l.resource,
                                                         it->second.capacity, l.quantity));
    }
    return {};
  }

  // --- per-user quotas ---------------------------------------------------------------------

  static std::uint64_t units_of(const std::vector<BookingLine>& lines) {
    std::uint64_t n = 0;
    for (const auto& l : lines) n += l.quantity;
    return n;
  }
  // The units a booking counts against its user's held-units quota while it is in `status`.
  static std::uint64_t hold_units(const Booking& b, BookingStatus status) {
    const bool counts = status == BookingStatus::held || (status == BookingStatus::processing && b.hold_for);
    return counts ? units_of(b.lines) : 0;
  }

  // Counts a new booking of `r.user` against the quotas, or says which one it exceeds. With
  // `check` false (recovery) it only counts.
  result<void> take_quota(const std::string& user, std::size_t bookings, std::uint64_t hold,
                          bool check = true) {
    if (!quotas) return {};
    std::lock_guard lock(usage_mutex);
    auto& u = usage[user];
    if (check && options.max_in_flight_per_user > 0 &&
        u.in_flight + bookings > options.max_in_flight_per_user) {
      const auto in_flight_now = u.in_flight;
      if (u.in_flight == 0 && u.held_units == 0) usage.erase(user);
      return Error(errc::quota_exceeded,
                   fmt::format("user '{}' has {} bookings being decided, the most allowed; "
                               "retry once one is decided",
                               user, in_flight_now));
    }
    if (check && hold > 0 && options.max_held_units_per_user > 0 &&
        u.held_units + hold > options.max_held_units_per_user) {
      const auto held_now = u.held_units;
      if (u.in_flight == 0 && u.held_units == 0) usage.erase(user);
      return Error(errc::quota_exceeded,
                   fmt::format("user '{}' holds {} units; {} more would pass the {} allowed", user, held_now,
                               hold, options.max_held_units_per_user));
    }
    u.in_flight += bookings;
    u.held_units += hold;
    return {};
  }

  void give_back_quota(const std::string& user, std::size_t bookings, std::uint64_t hold) {
    if (!quotas || (bookings == 0 && hold == 0)) return;
    std::lock_guard lock(usage_mutex);
    auto it = usage.find(user);
    if (it == usage.end()) return;
    auto& u = it->second;
    u.in_flight -= std::min(u.in_flight, bookings);
    u.held_units -= std::min(u.held_units, hold);
    if (u.in_flight == 0 && u.held_units == 0) usage.erase(it);
  }

  // --- idempotency -------------------------------------------------------------------------

  static std::string idempotency_slot(const BookingRequest& r) { return r.user + '\n' + r.idempotency_key; }

  void forget_expired_keys(steady::time_point now) {  // caller holds idempotency_mutex
    while (!idempotency_order.empty() &&
           (idempotency_order.front().first <= now || idempotency.size() > options.max_idempotency_keys)) {
      auto it = idempotency.find(idempotency_order.front().second);
      if (it != idempotency.end() && it->second.expires == idempotency_order.front().first)
        idempotency.erase(it);
      idempotency_order.pop_front();
    }
  }

  void forget_key(const std::string& slot) {
    std::lock_guard lock(idempotency_mutex);
    idempotency.erase(slot);
  }

  void mark_key_stored(const std::string& slot, const std::string& booking_id) {
    std::lock_guard lock(idempotency_mutex);
    if (auto it = idempotency.find(slot); it != idempotency.end() && it->second.booking_id == booking_id)
      it->second.stored = true;
  }

  // --- deciding ----------------------------------------------------------------------------

  // The last thing a decision's thread does with the engine: shutdown() may return (and the
  // engine go) as soon as in_flight is 0, so the decrement happens under the mutex shutdown()
  // waits with, and nothing of the engine is touched after it.
  void finish_in_flight(steady::time_point submitted, bool decided = true) {
    if (decided) decision_latency.record(steady::now() - submitted);
    std::lock_guard lock(in_flight_mutex);
    if (in_flight.fetch_sub(1, std::memory_order_acq_rel) == 1) in_flight_cv.notify_all();
  }

  // Where a booking's units are when it is decided.
  enum class units { none, reserved, confirmed };

  // Decides a processing booking whose units (`held_units`) are tentatively in memory: stores the
  // decided version, then moves or frees those units and publishes. A commit the store refuses
  // leaves the booking processing (in the store and in memory, units still set aside) and is
  // tried again after a backoff; during shutdown it is left to the next start's recovery.
  void decide(Booking b, steady::time_point submitted, bool approve, RejectReason reason, std::string message,
              units held_units, unsigned attempt = 0) {
    std::lock_guard lock(lock_for(b.id));
    auto decided = std::make_shared<Booking>(b);
    const auto now = wall_clock::now();
    decided->updated_at = now;
    ++decided->version;
    if (approve && b.hold_for) {
      decided->status = BookingStatus::held;
      decided->expires_at = now + *b.hold_for;
    } else if (approve) {
      decided->status = BookingStatus::confirmed;
    } else {
      decided->status = BookingStatus::rejected;
      decided->reason = reason;
      decided->reason_message = message;
    }
    StateChange change{*decided, events_for(*decided), {}};
    store->commit_async(change, [this, decided, events = change.events, original = std::move(b), submitted,
                                 approve, reason, message = std::move(message), held_units,
                                 attempt](result<void> r) mutable {
      if (!r && approve && r.error().is(errc::sold_out))
        return capacity_refused(std::move(original), submitted, r.error().message, held_units);
      if (!r && r.error().is(errc::invalid_transition)) return claim_lost(original, submitted, held_units);
      if (!r)
        return decision_not_stored(std::move(original), submitted, approve, reason, std::move(message),
                                   held_units, attempt);
      const auto& d = *decided;
      if (d.status == BookingStatus::confirmed && held_units == units::reserved)
        change_capacity(d.lines, capacity_change::reserved_to_confirmed);
      if (d.status == BookingStatus::rejected && held_units == units::reserved)
        change_capacity(d.lines, capacity_change::free_reserved);
      if (d.status == BookingStatus::rejected && held_units == units::confirmed)
        change_capacity(d.lines, capacity_change::free_confirmed);
      // The quota comes back before anyone can see the decision: a client that submits again on
      // seeing it is never refused for the booking it just saw decided.
      give_back_quota(d.user, 1, hold_units(original, BookingStatus::processing) - hold_units(d, d.status));
      publish(std::move(events), d);  // this completion runs once: its copy goes to the chain
      switch (d.status) {
        case BookingStatus::held: {
          held.fetch_add(1, std::memory_order_relaxed);
          arm_expiry(d.id, *d.expires_at);
          break;
        }
        case BookingStatus::confirmed: confirmed.fetch_add(1, std::memory_order_relaxed); break;
        default: rejected.fetch_add(1, std::memory_order_relaxed); break;
      }
      finish_in_flight(submitted);
    });
  }

  void decision_not_stored(Booking b, steady::time_point submitted, bool approve, RejectReason reason,
                           std::string message, units held_units, unsigned attempt) {
    store_errors.fetch_add(1, std::memory_order_relaxed);
    if (stopping.load()) {
      // Shutting down: the booking stays processing in the store, and the next start decides it.
      finish_in_flight(submitted);
      return;
    }
    const auto backoff = std::chrono::milliseconds(std::min(20 << std::min(attempt, 6u), 1000));
    // On the timer thread: never from the store's completion, which must not take a booking lock.
    timers.schedule(steady::now() + backoff, [this, b = std::move(b), submitted, approve, reason,
                                              message = std::move(message), held_units, attempt]() mutable {
      // The timer queue is destroyed before the rest of the engine, and shutdown() waits for
      // in-flight bookings, so `this` is valid here.
      decide(std::move(b), submitted, approve, reason, std::move(message), held_units, attempt + 1);
    });
  }

  // A store that enforces capacity itself (PostgresStore, shared by several processes) refused
  // the approval: the units this process set aside were taken by another one. Nothing of the
  // approval was stored, so the booking is still processing there: it is rejected as sold out,
  // which frees the units set aside here. On the timer thread: a completion must not take a
  // booking lock.
  void capacity_refused(Booking b, steady::time_point submitted, std::string message, units held_units) {
    timers.schedule(steady::now(), [this, b = std::move(b), submitted, message = std::move(message),
                                    held_units]() mutable {
      decide(std::move(b), submitted, false, RejectReason::sold_out, std::move(message), held_units);
    });
  }

  // A store shared by several processes refused the decision: the booking is no longer this
  // process's to decide (it stalled past its lease and another process took the booking over,
  // PostgresStore). Nothing of the decision was stored; the units set aside here and the quota
  // come back, nothing is published: the other process decides and publishes.
  void claim_lost(const Booking& b, steady::time_point submitted, units held_units) {
    claims_lost.fetch_add(1, std::memory_order_relaxed);
    if (held_units == units::reserved) change_capacity(b.lines, capacity_change::free_reserved);
    if (held_units == units::confirmed) change_capacity(b.lines, capacity_change::free_confirmed);
    give_back_quota(b.user, 1, hold_units(b, BookingStatus::processing));
    finish_in_flight(submitted, false);
  }

  // A submit whose key the store says another process stored first (submit_async): the same
  // request (fingerprint) is answered with that booking, as a replay; a different one is
  // idempotency_conflict. Runs on the timer thread; ends the submit's in-flight count.
  void answer_foreign_key(const Booking& mine, const std::string& slot, const std::string& fp,
                          steady::time_point t0, Error conflict, BookingEngine::SubmitCallback done) {
    auto answer = [&]() -> result<Ack> {
      auto key = store->find_key(mine.user, mine.idempotency_key);
      if (!key) return key.error();
      if (!*key) return conflict;  // gone meanwhile: nothing to replay
      if ((*key)->fingerprint != fp) {
        invalid.fetch_add(1, std::memory_order_relaxed);
        return Error(errc::idempotency_conflict,
                     fmt::format("idempotency key '{}' was used for a different request (booking '{}')",
                                 mine.idempotency_key, (*key)->booking_id));
      }
      auto stored = store->load((*key)->booking_id);
      if (!stored) return stored.error();
      if (!*stored) return conflict;
      {
        // Later retries of this key at this process are answered from memory.
        std::lock_guard lock(idempotency_mutex);
        if (auto it = idempotency.find(slot); it != idempotency.end() && it->second.booking_id == mine.id) {
          it->second.booking_id = (*key)->booking_id;
          it->second.stored = true;
        }
      }
      replays.fetch_add(1, std::memory_order_relaxed);
      ack_latency.record(steady::now() - t0);
      return Ack{(*stored)->id, (*stored)->status, true, (*stored)->version};
    };
    auto outcome = answer();
    if (!outcome) forget_key(slot);
    try {
      done(std::move(outcome));
    } catch (...) {
      // A throwing callback must not take the timer thread down.
    }
    finish_in_flight(t0, false);
  }

  // A booking another process ACKed and stopped deciding, claimed for this one by the store
  // (BookingStore::on_takeover, on the store's thread): queued for the workers like a recovered
  // one. Never called once shutdown() began (it clears the callback first).
  void take_over(Booking b) {
    if (b.attempt == 0) b.attempt = 2;
    (void)take_quota(b.user, 1, hold_units(b, BookingStatus::processing), false);
    taken_over.fetch_add(1, std::memory_order_relaxed);
    in_flight.fetch_add(1, std::memory_order_acq_rel);
    if (options.recovery == RecoveryPolicy::reject) {
      // The host asked that no handler run twice: rejected as a recovered booking would be. On
      // the timer thread: this is the store's lease thread, which must not wait for a commit.
      timers.schedule(steady::now(), [this, b = std::move(b)]() mutable {
        decide(std::move(b), steady::now(), false, RejectReason::recovery,
               "taken over from a process that stopped deciding it (recovery policy: reject)", units::none);
      });
      return;
    }
    queued.fetch_add(1, std::memory_order_relaxed);
    bool wake;
    {
      std::lock_guard lock(queue_mutex);
      queue.push_back({std::move(b), steady::now()});
      wake = parked_workers > 0;
    }
    if (wake) queue_cv.notify_one();
  }

  // Expires the hold at `expires_at` (at once when that has passed).
  void arm_expiry(const std::string& id, wall_clock::time_point expires_at) {
    const auto left = std::max(expires_at - wall_clock::now(), wall_clock::duration::zero());
    std::weak_ptr<engine_core> weak = weak_from_this();
    timers.schedule(steady::now() + std::chrono::duration_cast<steady::duration>(left), [weak, id] {
      if (auto self = weak.lock()) self->expire(id);
    });
  }

  Decision timeout_decision() const {
    return Decision::declined(fmt::format("no answer within {} ms", options.handler_timeout.count()));
  }

  // Returns true when this call decided the booking (the first of handler answer and timeout).
  bool complete(const std::shared_ptr<Completion::state>& st, Decision d, RejectReason reason) {
    if (st->done.exchange(true, std::memory_order_acq_rel)) return false;
    {
      std::lock_guard lock(st->timer_mutex);
      if (st->timer) timers.cancel(*st->timer);
    }
    if (!d.approve && d.failed) reason = RejectReason::handler_error;
    decide(st->booking, st->submitted, d.approve, d.approve ? RejectReason::none : reason,
           std::move(d.message), units::reserved);
    return true;
  }

  void run_handler(job j) {
    auto st = std::make_shared<Completion::state>();
    st->engine = weak_from_this();
    st->booking = std::move(j.booking);
    if (st->booking.attempt == 0) st->booking.attempt = 1;
    st->submitted = j.submitted;
    st->deadline = steady::now() + options.handler_timeout;
    {
      // Armed before the handler runs, so that a handler that blocks is timed out on time (the
      // booking is decided and its units freed while the worker is still stuck in it).
      std::weak_ptr<Completion::state> weak = st;
      std::lock_guard lock(st->timer_mutex);
      st->timer = timers.schedule(st->deadline, [this, weak] {
        // The timer queue is destroyed before the rest of the engine, so `this` is valid here.
        if (auto s = weak.lock()) complete(s, timeout_decision(), RejectReason::handler_timeout);
      });
    }
    try {
      options.handler(st->booking, Completion(st));
    }
    PUSHBOOK_RETHROW_FORCED_UNWIND
    catch (const std::exception& e) {
      complete(st, Decision::error(e.what()), RejectReason::handler_error);
    }
    catch (...) {
      complete(st, Decision::error("handler threw"), RejectReason::handler_error);
    }
  }

  // Waits for work, spinning briefly before parking (detail::AdaptiveSpin, the worker's own).
  // Returns false when the engine stops and the queue is drained. Caller holds queue_mutex.
  bool wait_for_work(std::unique_lock<std::mutex>& qlock, detail::AdaptiveSpin& spin) {
    if (queue.empty() && !stopping.load()) {
      qlock.unlock();
      spin.spin([this] { return queued.load(std::memory_order_relaxed) > 0; });
      qlock.lock();
      if (queue.empty() && !stopping.load()) {
        spin.parking();
        while (queue.empty() && !stopping.load()) {
          ++parked_workers;
          queue_cv.wait(qlock);
          --parked_workers;
        }
        spin.woken();
      }
    }
    return !queue.empty();
  }

  // Takes up to max_batch bookings off the front of the queue (qlock held, queue not empty) and
  // decides them as a worker does: the resources lock is taken before the queue's is let go, so
  // reservations happen in the order bookings arrived, whichever thread picks them. Returns with
  // qlock released.
  void take_and_decide(std::unique_lock<std::mutex>& qlock, std::vector<job>& batch,
                       std::vector<std::optional<std::string>>& outcome,
                       std::vector<ResourceState*>& touched) {
    const std::size_t max_batch = options.handler ? 1 : 64;
    batch.clear();
    outcome.clear();
    touched.clear();
    {
      const auto n = std::min(queue.size(), max_batch);
      for (std::size_t i = 0; i < n; ++i) {
        batch.push_back(std::move(queue.front()));
        queue.pop_front();
      }
      queued.fetch_sub(n, std::memory_order_relaxed);
      if (stopping.load()) {
        qlock.unlock();
        for (auto& j : batch)
          decide(std::move(j.booking), j.submitted, false, RejectReason::shutdown, "engine shut down",
                 units::none);
        return;
      }
      std::unique_lock rlock(resources_mutex);
      qlock.unlock();
      for (const auto& j : batch)
        outcome.push_back(try_reserve(j.booking.lines, !options.handler && !j.booking.hold_for, touched));
      for (auto* r : touched) publish_resource(*r);
    }
    for (std::size_t i = 0; i < batch.size(); ++i) {
      auto& j = batch[i];
      if (outcome[i]) {
        decide(std::move(j.booking), j.submitted, false, RejectReason::sold_out, std::move(*outcome[i]),
               units::none);
      } else if (!options.handler) {
        const auto where = j.booking.hold_for ? units::reserved : units::confirmed;
        decide(std::move(j.booking), j.submitted, true, RejectReason::none, {}, where);
      } else {
        run_handler(std::move(j));
      }
    }
  }

  // The submitting thread's turn as a worker (EngineOptions::decide_on_caller): its booking's
  // completion queued it in arrival order without waking a worker; this decides the front batch
  // (that booking, behind any that came earlier) and wakes a worker for what is left. Nothing to
  // do when a worker took it meanwhile. Not from a store completion (decide takes booking locks).
  void help_once() {
    std::vector<job> batch;
    std::vector<std::optional<std::string>> outcome;
    std::vector<ResourceState*> touched;
    {
      std::unique_lock qlock(queue_mutex);
      if (queue.empty()) return;
      take_and_decide(qlock, batch, outcome, touched);
    }
    bool wake;
    {
      std::lock_guard qlock(queue_mutex);
      wake = !queue.empty() && parked_workers > 0;
    }
    if (wake) queue_cv.notify_one();
  }

  void worker() {
    // Without a handler deciding is quick, so a worker takes a batch: one lock hand-off and one
    // availability event per resource for many bookings. With a handler (which may block) it
    // takes one booking at a time so that the other workers share the load.
    std::vector<job> batch;
    std::vector<std::optional<std::string>> outcome;
    std::vector<ResourceState*> touched;
    detail::AdaptiveSpin spin;
    for (;;) {
      std::unique_lock qlock(queue_mutex);
      if (!wait_for_work(qlock, spin)) return;
      take_and_decide(qlock, batch, outcome, touched);
    }
  }

  // --- transitions after the decision ------------------------------------------------------

  // Applies `to` to a booking currently in `from`, with its capacity change, under its lock.
  // The change is stored first; memory and events follow only when it is.
  result<Booking> transition(std::string_view id, BookingStatus from, BookingStatus to,
                             std::optional<capacity_change> change, std::string_view verb) {
    std::lock_guard lock(lock_for(id));
    auto loaded = store->load(id);
    if (!loaded) return loaded.error();
    if (!*loaded) return Error(errc::not_found, fmt::format("no booking '{}'", id));
    auto& b = **loaded;
    if (b.status != from) {
      if (from == BookingStatus::held && is_decided(b.status) && b.hold_for)
        return Error(errc::invalid_transition,
                     fmt::format("cannot {} booking '{}': its hold already reached '{}'", verb, id,
                                 to_string(b.status)));
      return Error(errc::invalid_transition, fmt::format("cannot {} booking '{}': it is '{}', not '{}'", verb,
                                                         id, to_string(b.status), to_string(from)));
    }
    b.status = to;
    b.updated_at = wall_clock::now();
    if (to != BookingStatus::held) b.expires_at.reset();
    ++b.version;
    auto r = commit_and_wait(b, [&] {
      if (change) change_capacity(b.lines, *change);
      // Before the change is published, as for decisions.
      if (from == BookingStatus::held) give_back_quota(b.user, 0, units_of(b.lines));
    });
    if (!r) return r.error();
    return std::move(b);
  }

  void expire(const std::string& id) {
    auto r =
        transition(id, BookingStatus::held, BookingStatus::expired, capacity_change::free_reserved, "expire");
    if (r) {
      expired.fetch_add(1, std::memory_order_relaxed);
    } else if (r.error().is(errc::store_failed) && !stopping.load()) {
      // Still held in the store and in memory: try again shortly.
      std::weak_ptr<engine_core> weak = weak_from_this();
      timers.schedule(steady::now() + std::chrono::milliseconds(100), [weak, id] {
        if (auto self = weak.lock()) self->expire(id);
      });
    }
  }

  // --- recovery ----------------------------------------------------------------------------

  // Rebuilds memory from the store (see docs/architecture.md, "Durability and recovery").
  // Runs in the constructor, before any worker starts.
  void recover() {
    const auto wall_now = wall_clock::now();
    const auto steady_now = steady::now();
    auto state = store->recover(wall_now - options.idempotency_window);
    if (!state) throw Exception(Error(errc::store_failed, "recovery: " + state.error().message));
    // Versions stored and maybe never published (the process died in between): published now,
    // before anything new, each version at most once on booking/<id> (the bus drops what it has).
    // A bus that refuses them (Redis not there yet) gets them again later, still ahead of every
    // new event of their topics.
    for (const auto& b : state->unpublished) relay(b);
    {
      std::unique_lock lock(resources_mutex);
      for (auto& r : state->resources) {
        undeclared.insert(r.id);
        auto& mine = resources[r.id];
        mine = std::move(r);
        // The store's counts (a store that reports counts numbers them): published either way.
        publish_resource_event(mine);
        mine.version = 0;  // memory's counts are not the store's numbered ones
      }
    }
    {
      std::lock_guard lock(idempotency_mutex);
      std::sort(state->keys.begin(), state->keys.end(),
                [](const auto& a, const auto& b) { return a.created_at < b.created_at; });
      for (auto& k : state->keys) {
        const auto left = k.created_at + options.idempotency_window - wall_now;
        const auto expires = steady_now + std::chrono::duration_cast<steady::duration>(left);
        auto slot = k.user + '\n' + k.key;
        idempotency.insert_or_assign(
            slot, idempotency_entry{std::move(k.fingerprint), std::move(k.booking_id), expires, true});
        idempotency_order.emplace_back(expires, std::move(slot));
      }
    }
    for (const auto& b : state->held) {
      (void)take_quota(b.user, 0, units_of(b.lines), false);
      arm_expiry(b.id, b.expires_at.value_or(wall_now));
    }
    for (auto& b : state->processing) {
      if (b.attempt == 0) b.attempt = 2;  // its handler may have run before the restart
      (void)take_quota(b.user, 1, hold_units(b, BookingStatus::processing), false);
      recovered.fetch_add(1, std::memory_order_relaxed);
      in_flight.fetch_add(1, std::memory_order_acq_rel);
      accepted.fetch_add(1, std::memory_order_relaxed);
      if (options.recovery == RecoveryPolicy::reject) {
        decide(std::move(b), steady_now, false, RejectReason::recovery,
               "found undecided after a restart (recovery policy: reject)", units::none);
      } else {
        // Beyond max_queue if need be: these were ACKed, they are never refused.
        queued.fetch_add(1, std::memory_order_relaxed);
        queue.push_back({std::move(b), steady_now});
      }
    }
  }
};

bool Completion::operator()(Decision decision) const {
  auto engine = state_->engine.lock();
  if (!engine) return false;
  // An answer after the deadline (a handler that blocked past it) counts as no answer.
  if (std::chrono::steady_clock::now() > state_->deadline) {
    engine->complete(state_, engine->timeout_decision(), RejectReason::handler_timeout);
    return false;
  }
  return engine->complete(state_, std::move(decision), RejectReason::rejected_by_handler);
}

BookingEngine::BookingEngine(EventBusPtr bus, EngineOptions options) {
  if (!bus) throw Exception(Error(errc::bad_request, "BookingEngine needs an event bus"));
  impl_ = std::make_shared<detail::engine_core>(std::move(bus), std::move(options));
  try {
    // Cleared (and waited for) by shutdown() once no commit of this engine is left.
    impl_->store_counts = impl_->store->on_resource_counts(
        [p = impl_.get()](std::vector<ResourceState> counts) { p->publish_counts(std::move(counts)); });
    impl_->recover();
    const auto n = std::max<std::size_t>(1, impl_->options.workers);
    for (std::size_t i = 0; i < n; ++i) impl_->workers.emplace_back([p = impl_.get()] { p->worker(); });
    // shutdown() clears it before anything stops, and clearing waits for a call in progress.
    impl_->store->on_takeover([p = impl_.get()](Booking b, BookingStore::Takeover what) {
      if (what == BookingStore::Takeover::relay)
        p->relay(b);
      else
        p->take_over(std::move(b));
    });
  } catch (...) {
    // The relays and resource events recover() handed to the bus call back into the engine:
    // stop what started and wait for those answers before the engine goes.
    impl_->store->on_resource_counts(nullptr);
    {
      std::lock_guard lock(impl_->queue_mutex);
      impl_->stopping.store(true);
    }
    impl_->queue_cv.notify_all();
    for (auto& t : impl_->workers)
      if (t.joinable()) t.join();
    impl_->stop_publishing();
    impl_->timers.stop();
    impl_->wait_published();
    throw;
  }
}

BookingEngine::~BookingEngine() { shutdown(); }

void BookingEngine::shutdown() {
  std::lock_guard once(impl_->shutdown_mutex);
  // No booking of another process's is taken over from here on (what this one claimed and does
  // not decide goes to another process once its claim runs out).
  impl_->store->on_takeover(nullptr);
  {
    std::lock_guard lock(impl_->queue_mutex);
    impl_->stopping.store(true);
  }
  impl_->queue_cv.notify_all();
  for (auto& t : impl_->workers)
    if (t.joinable()) t.join();
  // Handlers still deciding finish, or time out, and their commits complete, before the engine
  // goes.
  {
    std::unique_lock lock(impl_->in_flight_mutex);
    impl_->in_flight_cv.wait(lock, [&] { return impl_->in_flight.load() == 0; });
  }
  // The store's counts after those commits are published; later ones (a hold expiring now) are
  // not.
  impl_->store->on_resource_counts(nullptr);
  // From here on, an event the bus refuses is dropped, not retried (a durable store relays its
  // version at the next start).
  impl_->stop_publishing();
  // Then no timer runs any more (holds no longer expire, nothing refused is retried): a timer
  // holding the last reference to the engine would otherwise destroy it, and its timer queue, on
  // the timer thread. A timer running now (an expiry handing events to the bus) finishes first.
  impl_->timers.stop();
  // The bus answers what it was handed; what is still waiting (behind a refusal) is dropped.
  impl_->wait_published();
}

// Capacity changes are serialised by resources_admin_mutex and never hold resources_mutex while
// the store commits (the store's completions take resources_mutex). Memory's capacity is never
// above the store's: an increase is stored first, a decrease is applied to memory first (checked
// against what is in use, so no booking can take the units meanwhile) and undone if the store
// refuses it.
result<void> detail::engine_core::put_capacity(std::string_view id, std::uint32_t capacity, bool create) {
  std::lock_guard admin(resources_admin_mutex);
  std::optional<std::uint32_t> before;
  {
    std::unique_lock lock(resources_mutex);
    auto it = resources.find(id);
    if (it != resources.end()) {
      if (create && !undeclared.contains(id))
        return Error(errc::already_exists, fmt::format("resource '{}' already exists", id));
      auto& r = it->second;
      if (capacity < r.reserved + r.confirmed)
        return Error(errc::capacity_in_use,
                     fmt::format("'{}' has {} units reserved or confirmed; capacity cannot drop to {}", id,
                                 r.reserved + r.confirmed, capacity));
      if (capacity == r.capacity && create) {  // reconciled: the store already says so
        undeclared.erase(std::string(id));
        return {};
      }
      before = r.capacity;
      if (capacity < r.capacity) {
        r.capacity = capacity;
        publish_resource(r);
      }
    } else if (!create) {
      return Error(errc::not_found, fmt::format("unknown resource '{}'", id));
    }
  }
  if (auto stored = store->put_resource(id, capacity); !stored) {
    store_errors.fetch_add(1, std::memory_order_relaxed);
    if (before && capacity < *before) {
      std::unique_lock lock(resources_mutex);
      auto& r = resources.find(id)->second;
      r.capacity = *before;
      publish_resource(r);
    }
    return stored.error();
  }
  std::unique_lock lock(resources_mutex);
  if (create) undeclared.erase(std::string(id));  // reconciled: a second add_resource is a duplicate
  auto& r = resources[std::string(id)];
  r.id = std::string(id);
  if (r.capacity != capacity || !before) {
    r.capacity = capacity;
    publish_resource(r);
  }
  return {};
}

result<void> BookingEngine::add_resource(std::string_view id, std::uint32_t capacity) {
  if (!is_valid_id(id))
    return Error(errc::bad_request, "resource id must be 1-128 characters of letters, digits and -_.:@+=~");
  return impl_->put_capacity(id, capacity, true);
}

result<void> BookingEngine::set_capacity(std::string_view id, std::uint32_t capacity) {
  return impl_->put_capacity(id, capacity, false);
}

result<ResourceState> BookingEngine::resource(std::string_view id) const {
  std::shared_lock lock(impl_->resources_mutex);
  auto it = impl_->resources.find(id);
  if (it == impl_->resources.end()) return Error(errc::not_found, fmt::format("unknown resource '{}'", id));
  return it->second;
}

result<std::uint32_t> BookingEngine::availability(std::string_view id) const {
  auto r = resource(id);
  if (!r) return r.error();
  return r->available();
}

std::vector<ResourceState> BookingEngine::resources() const {
  std::shared_lock lock(impl_->resources_mutex);
  std::vector<ResourceState> out;
  out.reserve(impl_->resources.size());
  for (const auto& [id, r] : impl_->resources) out.push_back(r);
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  return out;
}

result<Ack> BookingEngine::submit(BookingRequest request) {
  std::promise<result<Ack>> answered;
  auto answer = answered.get_future();
  submit_async(std::move(request), [&answered](result<Ack> r) { answered.set_value(std::move(r)); });
  return answer.get();
}

void BookingEngine::submit_async(BookingRequest request, SubmitCallback done) {
  const auto t0 = steady::now();
  auto& m = *impl_;
  if (m.stopping.load(std::memory_order_relaxed))
    return done(Error(errc::shutting_down, "engine is shutting down"));
  if (auto v = m.validate(request); !v) {
    m.invalid.fetch_add(1, std::memory_order_relaxed);
    return done(v.error());
  }

  std::string booking_id;
  std::string slot;
  std::string fp;
  if (!request.idempotency_key.empty()) {
    slot = detail::engine_core::idempotency_slot(request);
    fp = fingerprint(request);
    std::unique_lock lock(m.idempotency_mutex);
    m.forget_expired_keys(t0);
    if (auto it = m.idempotency.find(slot); it != m.idempotency.end()) {
      if (it->second.fingerprint != fp) {
        m.invalid.fetch_add(1, std::memory_order_relaxed);
        return done(Error(errc::idempotency_conflict,
                          fmt::format("idempotency key '{}' was used for a different request (booking '{}')",
                                      request.idempotency_key, it->second.booking_id)));
      }
      Ack ack{it->second.booking_id, BookingStatus::processing, true, 1};
      // An ACK means stored: a retry that arrives while the first submit is still storing the
      // booking (or whose store cannot say) gets an error to retry on, never an ACK for a booking
      // that may yet fail to be stored.
      const bool first_stored = it->second.stored;
      lock.unlock();
      auto stored = m.store->load(ack.booking_id);
      if (!stored) return done(stored.error());
      if (!*stored && first_stored)
        return done(
            Error(errc::not_found, fmt::format("booking '{}' of idempotency key '{}' was decided and is "
                                               "no longer kept; the key stays used",
                                               ack.booking_id, request.idempotency_key)));
      if (!*stored)
        return done(Error(errc::overloaded, fmt::format("booking '{}' of idempotency key '{}' is still being "
                                                        "stored; retry",
                                                        ack.booking_id, request.idempotency_key)));
      ack.status = (*stored)->status;
      ack.version = (*stored)->version;
      m.replays.fetch_add(1, std::memory_order_relaxed);
      m.ack_latency.record(steady::now() - t0);
      return done(std::move(ack));
    }
    booking_id = m.ids.next();
    const auto expires = t0 + m.options.idempotency_window;
    m.idempotency.emplace(slot, detail::engine_core::idempotency_entry{fp, booking_id, expires});
    m.idempotency_order.emplace_back(expires, slot);
  } else {
    booking_id = m.ids.next();
  }

  const auto quota_units = request.hold_for ? detail::engine_core::units_of(request.lines) : 0;
  if (auto q = m.take_quota(request.user, 1, quota_units); !q) {
    if (!slot.empty()) m.forget_key(slot);
    m.quota_refused.fetch_add(1, std::memory_order_relaxed);
    return done(q.error());
  }
  // Take a queue slot before anything is stored, so "overloaded" never leaves a booking behind.
  if (m.queued.fetch_add(1, std::memory_order_acq_rel) >= m.options.max_queue) {
    m.queued.fetch_sub(1, std::memory_order_acq_rel);
    m.give_back_quota(request.user, 1, quota_units);
    if (!slot.empty()) m.forget_key(slot);
    m.overloaded.fetch_add(1, std::memory_order_relaxed);
    return done(Error(errc::overloaded, fmt::format("{} bookings are waiting to be decided; retry later",
                                                    m.options.max_queue)));
  }

  auto b = std::make_shared<Booking>();
  b->id = std::move(booking_id);
  b->user = std::move(request.user);
  b->lines = std::move(request.lines);
  b->metadata = std::move(request.metadata);
  b->idempotency_key = std::move(request.idempotency_key);
  b->hold_for = request.hold_for;
  b->created_at = b->updated_at = wall_clock::now();
  // Counted in flight from here: shutdown() waits for this commit's completion.
  m.in_flight.fetch_add(1, std::memory_order_acq_rel);
  // Deciding on this thread (decide_on_caller): when the commit completes within commit_async
  // (MemoryStore; or a store thread that was quick), the completion queues the booking without
  // waking a worker, and this thread decides the queue's front once commit_async returned. A
  // completion that comes later (on the store's thread) wakes a worker as before. `keep`: deciding
  // here ends with the booking's lock released after in_flight reached 0, which lets shutdown()
  // return: the core must outlive that.
  struct caller_slot {
    std::mutex mutex;
    bool returned = false;  // commit_async returned
    bool queued = false;    // the completion queued the booking for this thread to decide
  };
  std::shared_ptr<caller_slot> here;
  std::shared_ptr<detail::engine_core> keep;
  if (!m.options.handler && m.options.decide_on_caller) {
    here = std::make_shared<caller_slot>();
    keep = impl_;
  }
  StateChange change{*b, detail::engine_core::events_for(*b), fp};
  // Nobody else knows this booking id before the completion, so no booking lock is needed.
  // `fp` is copied, not moved: `change` refers to it until commit_async has serialised it.
  auto commit = [&] {
    m.store->commit_async(change, [&m, b, events = change.events, slot = std::move(slot), fp, t0, quota_units,
                                   here, done = std::move(done)](result<void> stored) mutable {
      if (!stored && !slot.empty() && stored.error().is(errc::idempotency_conflict)) {
        // Another process stored this user's key first (a store shared by several processes): the
        // same request gets that booking, a different one the conflict. Read on the timer thread
        // (a completion must not wait for the store); still in flight until answered.
        m.queued.fetch_sub(1, std::memory_order_acq_rel);
        m.give_back_quota(b->user, 1, quota_units);
        m.timers.schedule(steady::now(), [&m, b, slot = std::move(slot), fp = std::move(fp), t0,
                                          done = std::move(done), e = stored.error()]() mutable {
          m.answer_foreign_key(*b, slot, fp, t0, std::move(e), std::move(done));
        });
        return;
      }
      if (!stored) {
        m.store_errors.fetch_add(1, std::memory_order_relaxed);
        m.queued.fetch_sub(1, std::memory_order_acq_rel);
        m.give_back_quota(b->user, 1, quota_units);
        if (!slot.empty()) m.forget_key(slot);
        Error e = stored.error();
        m.finish_in_flight(t0, false);
        return done(std::move(e));
      }
      if (!slot.empty()) m.mark_key_stored(slot, b->id);
      m.publish(std::move(events), *b);  // this completion runs once: its copy goes to the chain
      m.accepted.fetch_add(1, std::memory_order_relaxed);
      Ack ack{b->id, BookingStatus::processing, false, b->version};
      bool wake = false;
      {
        // Held until the booking is queued: the submitting thread, once commit_async returned,
        // either finds `queued` and the booking in the queue, or has said it returned (then a
        // worker is woken here).
        std::unique_lock<std::mutex> caller;
        if (here) caller = std::unique_lock(here->mutex);
        std::unique_lock lock(m.queue_mutex);
        if (m.stopping.load()) {
          // shutdown() began meanwhile; the workers may be gone. Decided on the timer thread: a
          // completion must not take a booking lock.
          lock.unlock();
          m.queued.fetch_sub(1, std::memory_order_acq_rel);
          m.timers.schedule(steady::now(), [&m, b, t0] {
            m.decide(std::move(*b), t0, false, RejectReason::shutdown, "engine shut down",
                     detail::engine_core::units::none);
          });
        } else {
          m.queue.push_back({std::move(*b), t0});
          if (here && !here->returned)
            here->queued = true;  // submit_async decides it, in its place in the queue
          else
            wake = m.parked_workers > 0;
        }
      }
      if (wake) m.queue_cv.notify_one();
      m.ack_latency.record(steady::now() - t0);
      done(std::move(ack));
    });
  };
  // Said even when commit_async throws (a `done` that threw): the booking is then left to a worker.
  auto returned = [&here] {
    std::lock_guard lock(here->mutex);
    here->returned = true;
    return here->queued;
  };
  try {
    commit();
  } catch (...) {
    if (here && returned()) m.queue_cv.notify_one();
    throw;
  }
  if (here && returned()) m.help_once();
}

result<Booking> BookingEngine::get(std::string_view booking_id) const {
  auto b = impl_->store->load(booking_id);
  if (!b) return b.error();
  if (!*b) return Error(errc::not_found, fmt::format("no booking '{}'", booking_id));
  return std::move(**b);
}

result<Booking> BookingEngine::cancel(std::string_view booking_id) {
  auto r = impl_->transition(booking_id, BookingStatus::confirmed, BookingStatus::cancelled,
                             detail::engine_core::capacity_change::free_confirmed, "cancel");
  if (r) impl_->cancelled.fetch_add(1, std::memory_order_relaxed);
  return r;
}

result<Booking> BookingEngine::confirm(std::string_view booking_id) {
  auto r = impl_->transition(booking_id, BookingStatus::held, BookingStatus::confirmed,
                             detail::engine_core::capacity_change::reserved_to_confirmed, "confirm");
  if (r) impl_->confirmed.fetch_add(1, std::memory_order_relaxed);
  return r;
}

result<Booking> BookingEngine::release(std::string_view booking_id) {
  auto r = impl_->transition(booking_id, BookingStatus::held, BookingStatus::released,
                             detail::engine_core::capacity_change::free_reserved, "release");
  if (r) impl_->released.fetch_add(1, std::memory_order_relaxed);
  return r;
}

EngineStats BookingEngine::stats() const {
  const auto& m = *impl_;
  EngineStats s;
  s.accepted = m.accepted.load();
  s.confirmed = m.confirmed.load();
  s.rejected = m.rejected.load();
  s.held = m.held.load();
  s.cancelled = m.cancelled.load();
  s.released = m.released.load();
  s.expired = m.expired.load();
  s.idempotent_replays = m.replays.load();
  s.invalid = m.invalid.load();
  s.overloaded = m.overloaded.load();
  s.store_errors = m.store_errors.load();
  s.recovered = m.recovered.load();
  s.in_flight = m.in_flight.load();
  s.queue_depth = m.queued.load();
  {
    std::lock_guard lock(impl_->queue_mutex);
    s.parked_workers = impl_->parked_workers;
  }
  s.quota_exceeded = m.quota_refused.load();
  s.publish_failures = m.publish_failures.load();
  s.publish_retries = m.publish_retries.load();
  s.publish_backlog = m.pending_events.load();
  s.publish_dropped = m.publish_dropped.load();
  s.relayed = m.relayed.load();
  s.taken_over = m.taken_over.load();
  s.claims_lost = m.claims_lost.load();
  s.ack_latency = m.ack_latency.summary();
  s.decision_latency = m.decision_latency.summary();
  return s;
}

const EventBusPtr& BookingEngine::bus() const noexcept { return impl_->bus; }
bool BookingEngine::store_available() const noexcept { return impl_->store->available(); }

bool BookingEngine::publishing(std::string_view booking_id) const { return impl_->publishing(booking_id); }

}  // namespace pushbook
