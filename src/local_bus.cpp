// LocalBus: the in-process EventBus.
//
// Locking: topics live in shards; a shard's mutex guards its topics' sequence counters, history,
// last values and direct subscriber lists. publish() assigns the sequence number and enqueues the
// event to every matching subscriber while holding the topic's shard lock, so every subscriber
// sees a topic's events in sequence order, and subscribe() takes the same lock to compute its
// replay and register atomically: nothing published concurrently falls between replay and live.
// Enqueueing never blocks (queues are bounded and have an overflow policy); executors are only
// posted to after the shard lock is released, so a callback may publish again, even inline.
// Lock order: shard -> wildcard registry -> subscription.
#include <pushbook/event_bus.hpp>

#include "detail/forced_unwind.hpp"
#include "detail/front_queue.hpp"
#include "detail/json_text.hpp"
#include "detail/string_hash.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <random>
#include <shared_mutex>
#include <thread>

#include <boost/unordered/unordered_flat_map.hpp>

namespace pushbook {
namespace {

using steady = std::chrono::steady_clock;

using detail::front_queue;
using detail::string_hash;

bool is_valid_pattern(std::string_view pattern) {
  if (pattern == "*") return true;
  if (pattern.size() > 2 && pattern.ends_with("/*"))
    return is_valid_topic(pattern.substr(0, pattern.size() - 2));
  return is_valid_topic(pattern);
}

}  // namespace

struct LocalBus::impl {
  struct subscription;
  using sub_ptr = std::shared_ptr<subscription>;
  using post_list = std::vector<sub_ptr>;

  struct topic {
    std::uint64_t seq = 0;
    std::uint32_t epoch = 0;
    front_queue<EventPtr> history;
    EventPtr last;
    std::vector<sub_ptr> subs;
    steady::time_point last_activity;
    topic* lru_prev = nullptr;  // intrusive LRU list of the shard: no allocation per topic
    topic* lru_next = nullptr;
    std::shared_ptr<const std::string> name;  // shared with its events (Event::topic)
  };

  struct shard {
    std::mutex mutex;
    // Keys view the topic's own name, so a topic costs one string, not two. Open addressing: a
    // lookup reads one group of slots and the topic it finds, where a node map walks a chain of
    // nodes scattered over the heap (with tens of thousands of booking topics, the misses of that
    // walk and of rehashing were ~4% of a pushed booking's server CPU); and no node to allocate.
    boost::unordered_flat_map<std::string_view, std::unique_ptr<topic>, string_hash, std::equal_to<>> topics;
    topic* lru_head = nullptr;  // least recently active
    topic* lru_tail = nullptr;  // most recently active

    void lru_unlink(topic* t) {
      (t->lru_prev ? t->lru_prev->lru_next : lru_head) = t->lru_next;
      (t->lru_next ? t->lru_next->lru_prev : lru_tail) = t->lru_prev;
      t->lru_prev = t->lru_next = nullptr;
    }
    void lru_push_back(topic* t) {
      t->lru_prev = lru_tail;
      t->lru_next = nullptr;
      (lru_tail ? lru_tail->lru_next : lru_head) = t;
      lru_tail = t;
    }
  };

  static constexpr std::size_t shard_count = 32;

  LocalBusOptions options;
  std::shared_ptr<ThreadPool> delivery_pool;
  std::array<shard, shard_count> shards;
  std::shared_mutex wildcard_mutex;
  std::vector<sub_ptr> wildcard_subs;
  std::atomic<std::size_t> wildcard_count{0};
  std::atomic<bool> closed{false};

  std::atomic<std::uint64_t> published{0}, delivered{0}, dropped{0}, slow_ends{0}, live_subs{0};
  std::atomic<std::uint64_t> topic_count{0};

  std::uint32_t epoch_base = static_cast<std::uint32_t>(std::random_device{}());
  std::atomic<std::uint64_t> topics_created{0};

  explicit impl(LocalBusOptions o)
      : options(o),
        delivery_pool(std::make_shared<ThreadPool>(std::max<std::size_t>(1, o.delivery_threads))) {}

  shard& shard_for(std::string_view topic_name) { return shards[string_hash{}(topic_name) % shard_count]; }

  topic& find_or_create(shard& s, std::string_view name, steady::time_point now) {
    auto it = s.topics.find(name);
    if (it != s.topics.end()) return *it->second;
    auto t = std::make_unique<topic>();
    t->name = std::make_shared<const std::string>(name);
    // Each incarnation of a topic numbers from 1 in an epoch of its own: random per bus, then
    // one more per topic created, so a topic forgotten and made again differs from before.
    t->epoch =
        epoch_base + static_cast<std::uint32_t>(topics_created.fetch_add(1, std::memory_order_relaxed));
    t->last_activity = now;
    s.lru_push_back(t.get());
    auto& ref = *t;
    s.topics.emplace(std::string_view(*ref.name), std::move(t));
    topic_count.fetch_add(1, std::memory_order_relaxed);
    return ref;
  }

  void touch(shard& s, topic& t, steady::time_point now) {
    t.last_activity = now;
    if (s.lru_tail != &t) {
      s.lru_unlink(&t);
      s.lru_push_back(&t);
    }
  }

  void trim_history(topic& t, std::chrono::system_clock::time_point now) {
    std::size_t drop =
        t.history.size() > options.history_limit ? t.history.size() - options.history_limit : 0;
    const auto oldest_allowed = now - options.history_max_age;
    while (drop < t.history.size() && t.history[drop]->time() < oldest_allowed) ++drop;
    if (drop > 0) t.history.drop_front(drop);
  }

  void evict_idle(shard& s, steady::time_point now);
  void unregister(const sub_ptr& sub);
  std::vector<sub_ptr> all_subscriptions();
};

struct LocalBus::impl::subscription final : detail::SubscriptionState,
                                            std::enable_shared_from_this<subscription> {
  struct item {
    Delivery::Kind kind;
    EventPtr event;
  };

  std::weak_ptr<impl> bus;
  std::string pattern;
  bool wildcard = false;
  std::string prefix;  // wildcard: topics starting with this match
  DeliveryCallback callback;
  ExecutorPtr executor;
  std::size_t max_queue;
  OverflowPolicy overflow;

  mutable std::mutex mutex;
  std::condition_variable idle;
  front_queue<item> queue;
  std::size_t replay_pending = 0;  // leading queue items that came from replay
  std::uint64_t dropped_pending = 0;
  bool scheduled = false;  // a drain is posted or running
  bool running = false;    // a callback is executing
  std::thread::id runner;
  bool ended = false;  // ended by the bus; `ended` delivery still owed
  bool end_delivered = false;
  Error end_reason;
  std::atomic<bool> cancelled{false};

  bool active() const noexcept override {
    if (cancelled.load(std::memory_order_acquire)) return false;
    std::lock_guard lock(mutex);
    return !ended;
  }

  bool matches(std::string_view topic_name) const noexcept { return topic_name.starts_with(prefix); }

  // Called with the topic's shard lock held. Never blocks. Appends to `to_post` when a drain
  // must be posted once the shard lock is released.
  // Returns false when the subscription is no longer active (the caller may forget it).
  bool enqueue(Delivery::Kind kind, const EventPtr& ev, impl& owner, post_list& to_post) {
    std::lock_guard lock(mutex);
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
        schedule(to_post);
        return false;
      }
      queue.pop_front();
      if (replay_pending > 0) --replay_pending;
      ++dropped_pending;
      owner.dropped.fetch_add(1, std::memory_order_relaxed);
    }
    queue.push_back({kind, ev});
    schedule(to_post);
    return true;
  }

  // Queues replayed or snapshot items during subscribe (before the subscription is visible).
  void enqueue_initial(Delivery::Kind kind, const EventPtr& ev) {
    std::lock_guard lock(mutex);
    queue.push_back({kind, ev});
    ++replay_pending;
  }

  void schedule(post_list& to_post) {
    if (!scheduled) {
      scheduled = true;
      to_post.push_back(shared_from_this());
    }
  }

  void post_drain() {
    executor->post([self = shared_from_this()] { self->drain(); });
  }

  // Runs on the executor. One drain at a time per subscription (`scheduled`), so callbacks never
  // overlap and keep queue order. Yields back to the executor after a batch to stay fair.
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
        if (dropped_pending > 0) {
          d.kind = Delivery::Kind::gap;
          d.dropped = dropped_pending;
          dropped_pending = 0;
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
    replay_pending = 0;
    // Wait for a callback running on another thread; from inside the callback, just return.
    idle.wait(lock, [&] { return !running || runner == std::this_thread::get_id(); });
  }
};

// Forgets up to a few idle topics nobody subscribes to. Amortised over publishes and
// subscribes, so no sweeper thread is needed.
void LocalBus::impl::evict_idle(shard& s, steady::time_point now) {
  const std::size_t shard_limit = std::max<std::size_t>(1, options.max_topics / shard_count);
  for (int i = 0; i < 4 && s.lru_head; ++i) {
    topic* t = s.lru_head;
    if (now - t->last_activity < options.topic_idle_ttl && s.topics.size() <= shard_limit) return;
    std::erase_if(t->subs, [](const sub_ptr& sub) { return !sub->active(); });
    if (!t->subs.empty()) {
      touch(s, *t, now);  // still wanted: look again after another ttl
      continue;
    }
    s.lru_unlink(t);
    s.topics.erase(s.topics.find(std::string_view(*t->name)));  // destroys t
    topic_count.fetch_sub(1, std::memory_order_relaxed);
  }
}

void LocalBus::impl::unregister(const sub_ptr& sub) {
  if (sub->wildcard) {
    std::unique_lock lock(wildcard_mutex);
    auto before = wildcard_subs.size();
    std::erase(wildcard_subs, sub);
    wildcard_count.fetch_sub(before - wildcard_subs.size(), std::memory_order_relaxed);
    return;
  }
  auto& s = shard_for(sub->pattern);
  std::lock_guard lock(s.mutex);
  auto it = s.topics.find(sub->pattern);
  if (it != s.topics.end()) std::erase(it->second->subs, sub);
}

std::vector<LocalBus::impl::sub_ptr> LocalBus::impl::all_subscriptions() {
  std::vector<sub_ptr> all;
  for (auto& s : shards) {
    std::lock_guard lock(s.mutex);
    for (auto& [name, t] : s.topics) all.insert(all.end(), t->subs.begin(), t->subs.end());
  }
  std::shared_lock lock(wildcard_mutex);
  all.insert(all.end(), wildcard_subs.begin(), wildcard_subs.end());
  return all;
}

LocalBus::LocalBus(LocalBusOptions options) : impl_(std::make_shared<impl>(options)) {}

LocalBus::~LocalBus() {
  impl_->closed.store(true);
  // Cancel outside the shard locks: cancel() takes them to unregister.
  for (auto& sub : impl_->all_subscriptions()) sub->cancel();
}

result<EventPtr> LocalBus::publish(std::string_view topic_name,
                                   std::shared_ptr<const boost::json::value> data,
                                   const PublishOptions& options) {
  if (!data) return Error(errc::bad_request, "publish needs data (a JSON value, null is fine)");
  return publish_event(topic_name, std::move(data), options);
}

result<EventPtr> LocalBus::publish_json(std::string_view topic_name,
                                        std::shared_ptr<const std::string> json_text,
                                        const PublishOptions& options) {
  if (!json_text) return Error(errc::bad_request, "publish_json needs one JSON value: no text");
  if (auto why = detail::json_text_error(*json_text))
    return Error(errc::bad_request, "publish_json needs one JSON value: " + *why);
  return publish_event(topic_name, std::move(json_text), options);
}

void LocalBus::publish_json_async(std::string_view topic_name, std::shared_ptr<const std::string> json_text,
                                  const PublishOptions& options, PublishCallback done) {
  auto r = publish_json(topic_name, std::move(json_text), options);
  if (done) done(std::move(r));
}

void LocalBus::publish_trusted_json_async(std::string_view topic_name,
                                          std::shared_ptr<const std::string> json_text,
                                          const PublishOptions& options, PublishCallback done) {
  auto r = json_text
               ? publish_event(topic_name, std::move(json_text), options)
               : result<EventPtr>(Error(errc::bad_request, "publish_json needs one JSON value: no text"));
  if (done) done(std::move(r));
}

template <class Payload>
result<EventPtr> LocalBus::publish_event(std::string_view topic_name, Payload data,
                                         const PublishOptions& options) {
  if (!is_valid_topic(topic_name))
    return Error(errc::invalid_topic, "invalid topic '" + std::string(topic_name.substr(0, 300)) + "'");
  if (options.seq && (*options.seq == 0 || *options.seq > max_publish_seq))
    return Error(errc::bad_request, "publish seq must be 1.." + std::to_string(max_publish_seq) + ", not " +
                                        std::to_string(*options.seq));
  if (impl_->closed.load(std::memory_order_relaxed)) return Error(errc::shutting_down, "bus is closed");
  auto& s = impl_->shard_for(topic_name);
  const auto now = std::chrono::system_clock::now();
  const auto steady_now = steady::now();
  impl::post_list to_post;
  EventPtr ev;
  {
    std::lock_guard lock(s.mutex);
    auto& t = impl_->find_or_create(s, topic_name, steady_now);
    // Compared and set under the topic's lock: of two publishes of one numbered event, exactly
    // one is delivered. A duplicate changes nothing (not even the topic's activity).
    if (options.seq && t.seq >= *options.seq)
      return Error(errc::already_exists, "topic '" + *t.name + "' already has seq " + std::to_string(t.seq) +
                                             " (epoch " + format_epoch(t.epoch) + "); seq " +
                                             std::to_string(*options.seq) + " is not delivered again");
    t.seq = options.seq ? *options.seq : t.seq + 1;
    ev = std::make_shared<const Event>(t.name, t.seq, now, std::move(data), t.epoch);
    t.history.push_back(ev);
    impl_->trim_history(t, now);
    t.last = ev;
    std::erase_if(t.subs, [&](const impl::sub_ptr& sub) {
      return !sub->enqueue(Delivery::Kind::event, ev, *impl_, to_post);
    });
    if (impl_->wildcard_count.load(std::memory_order_relaxed) > 0) {
      std::shared_lock wlock(impl_->wildcard_mutex);
      for (auto& sub : impl_->wildcard_subs)
        if (sub->matches(topic_name)) sub->enqueue(Delivery::Kind::event, ev, *impl_, to_post);
    }
    impl_->touch(s, t, steady_now);
    impl_->evict_idle(s, steady_now);
  }
  impl_->published.fetch_add(1, std::memory_order_relaxed);
  for (auto& sub : to_post) sub->post_drain();
  return ev;
}

result<Subscription> LocalBus::subscribe(std::string_view pattern, DeliveryCallback callback,
                                         SubscribeOptions options) {
  if (!is_valid_pattern(pattern))
    return Error(errc::invalid_topic, "invalid topic pattern '" + std::string(pattern.substr(0, 300)) + "'");
  if (!callback) return Error(errc::bad_request, "subscribe needs a callback");
  if (options.max_queue == 0) return Error(errc::bad_request, "max_queue must be at least 1");
  if (impl_->closed.load(std::memory_order_relaxed)) return Error(errc::shutting_down, "bus is closed");

  auto sub = std::make_shared<impl::subscription>();
  sub->bus = impl_;
  sub->pattern = std::string(pattern);
  sub->callback = std::move(callback);
  sub->executor = options.executor ? options.executor : impl_->delivery_pool;
  sub->max_queue = options.max_queue;
  sub->overflow = options.overflow;

  if (pattern == "*" || pattern.ends_with("/*")) {
    if (options.since_seq)
      return Error(errc::bad_request,
                   "since_seq cannot be used with a wildcard pattern; "
                   "wildcard subscriptions are live only");
    impl_->live_subs.fetch_add(1, std::memory_order_relaxed);
    sub->wildcard = true;
    sub->prefix = std::string(pattern.substr(0, pattern.size() - 1));  // "booking/" or ""
    std::unique_lock lock(impl_->wildcard_mutex);
    impl_->wildcard_subs.push_back(sub);
    impl_->wildcard_count.fetch_add(1, std::memory_order_relaxed);
    return Subscription(sub);
  }

  impl_->live_subs.fetch_add(1, std::memory_order_relaxed);
  auto& s = impl_->shard_for(pattern);
  const auto steady_now = steady::now();
  bool post = false;
  {
    std::lock_guard lock(s.mutex);
    auto& t = impl_->find_or_create(s, pattern, steady_now);
    impl_->trim_history(t, std::chrono::system_clock::now());
    // The current state where a snapshot is due: the last event, or for a topic this bus has
    // nothing of, what the subscriber's snapshot_source says (a restart lost nothing of it).
    auto snapshot = [&] {
      if (t.last) return sub->enqueue_initial(Delivery::Kind::snapshot, t.last);
      if (!options.snapshot_source) return;
      if (auto data = options.snapshot_source())
        sub->enqueue_initial(Delivery::Kind::snapshot,
                             std::make_shared<const Event>(t.name, t.seq, std::chrono::system_clock::now(),
                                                           std::move(data), t.epoch));
    };
    if (options.since_epoch && *options.since_epoch != t.epoch) options.since_seq.reset();  // renumbered
    if (!t.last) {
      // Nothing published in this incarnation: whatever the subscriber saw was elsewhere.
      if (options.since_seq || options.snapshot) snapshot();
    } else if (!options.since_seq) {
      if (options.snapshot) snapshot();
    } else if (*options.since_seq < t.seq) {
      const auto since = *options.since_seq;
      const std::uint64_t first_kept = t.history.empty() ? t.seq + 1 : t.history.front()->seq();
      if (since + 1 >= first_kept) {
        for (const auto& ev : t.history)
          if (ev->seq() > since) sub->enqueue_initial(Delivery::Kind::event, ev);
      } else {
        snapshot();  // history does not reach back
      }
    } else if (*options.since_seq > t.seq) {
      // The subscriber has seen more than this topic ever had (the topic was forgotten after
      // idling, or the bus restarted): its view cannot be trusted, so give the current state.
      snapshot();
    }
    t.subs.push_back(sub);
    impl_->touch(s, t, steady_now);
    std::lock_guard sl(sub->mutex);
    post = sub->scheduled = !sub->queue.empty();
  }
  if (post) sub->post_drain();
  return Subscription(sub);
}

EventPtr LocalBus::last(std::string_view topic_name) const {
  auto& s = impl_->shard_for(topic_name);
  std::lock_guard lock(s.mutex);
  auto it = s.topics.find(topic_name);
  return it == s.topics.end() ? nullptr : it->second->last;
}

std::vector<EventPtr> LocalBus::history(std::string_view topic_name, std::uint64_t since_seq) const {
  auto& s = impl_->shard_for(topic_name);
  std::lock_guard lock(s.mutex);
  std::vector<EventPtr> out;
  auto it = s.topics.find(topic_name);
  if (it == s.topics.end()) return out;
  impl_->trim_history(*it->second, std::chrono::system_clock::now());
  for (const auto& ev : it->second->history)
    if (ev->seq() > since_seq) out.push_back(ev);
  return out;
}

std::optional<std::vector<EventPtr>> LocalBus::history_if_local(std::string_view topic_name,
                                                                std::uint64_t since_seq) const {
  return history(topic_name, since_seq);
}

LocalBusStats LocalBus::stats() const {
  LocalBusStats st;
  st.published = impl_->published.load();
  st.delivered = impl_->delivered.load();
  st.dropped = impl_->dropped.load();
  st.slow_consumer_ends = impl_->slow_ends.load();
  st.topics = impl_->topic_count.load();
  st.subscriptions = impl_->live_subs.load();
  return st;
}

}  // namespace pushbook
