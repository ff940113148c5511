// TopicHub (see topic_hub.hpp).
//
// Locks: the hub's `mutex` (the topic map) -> a topic's `mutex` (its followers and its view of
// the topic). Followers' callbacks run under their topic's mutex, so that a follower joining
// (served from the topic's recent events) and the fan-out of the next event cannot interleave:
// that is what makes "replay, then live, no gap, no duplicate" hold. No bus subscribe is made
// under either lock (the bus may deliver synchronously from inside it), and no cancel of a
// topic's bus subscription (it waits for a running callback, which takes the topic's mutex).
// A follower's private bus subscription may be cancelled from inside a callback: its callbacks
// take no hub lock.
#include "gateway/topic_hub.hpp"

#include "detail/forced_unwind.hpp"

#include <algorithm>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

namespace pushbook::detail {
namespace {

// Non-zero while this thread runs followers' callbacks under a topic's mutex. A follower
// cancelled from there (its connection ended inside the callback) must not take a topic's mutex
// (it may be this one, or another one in the opposite order of another thread's): it is only
// marked, and removed later.
thread_local int fanning_out = 0;

struct fanout_scope {
  fanout_scope() { ++fanning_out; }
  ~fanout_scope() { --fanning_out; }
  fanout_scope(const fanout_scope&) = delete;
  fanout_scope& operator=(const fanout_scope&) = delete;
};

struct topic_entry;

// A lock of one byte for what a follower guards rarely and briefly (its own bus subscription,
// set once and taken once): a std::mutex would be 40 bytes in every follower of every topic.
class TinyLock {
 public:
  void lock() noexcept {
    while (locked_.exchange(true, std::memory_order_acquire)) std::this_thread::yield();
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> locked_{false};
};

struct follower final : SubscriptionState {
  std::weak_ptr<TopicHub::impl> hub;
  std::weak_ptr<topic_entry> entry;
  DeliveryCallback callback;
  SubscribeOptions options;
  // The last event handed over, guarded by the topic's mutex: an event at or before it (same
  // epoch) is not handed over again.
  bool positioned = false;
  std::uint32_t epoch = 0;
  std::uint64_t seq = 0;
  std::atomic<bool> cancelled{false};
  std::atomic<bool> ended{false};
  // A bus subscription of its own (its `since` reached back further than the topic's recent
  // events): the bus calls `callback` directly.
  TinyLock own_mutex;
  Subscription own;
  bool has_own = false;

  bool active() const noexcept override {
    return !cancelled.load(std::memory_order_acquire) && !ended.load(std::memory_order_acquire);
  }
  void cancel() noexcept override;

  void deliver(const Delivery& d) {
    if (cancelled.load(std::memory_order_acquire)) return;
    if (d.kind == Delivery::Kind::ended) ended.store(true, std::memory_order_release);
    try {
      callback(d);
    }
    PUSHBOOK_RETHROW_FORCED_UNWIND
    catch (...) {
      // A throwing callback must not take the delivering thread down; the other followers still
      // get the event.
    }
  }

  // Under the topic's mutex.
  void forward(const Delivery& d) {
    const auto& ev = *d.event;
    if (positioned && epoch == ev.epoch() && ev.seq() <= seq) return;  // had it
    positioned = true;
    epoch = ev.epoch();
    seq = ev.seq();
    deliver(d);
  }
};

using follower_ptr = std::shared_ptr<follower>;

struct topic_entry {
  explicit topic_entry(std::string t) : topic(std::move(t)) {}
  const std::string topic;

  std::mutex mutex;
  // Everything below is guarded by `mutex`.
  // The bus subscription exists and delivered what it starts with: followers are served.
  bool primed = false;
  // Out of the hub's map (nobody followed it any more, or its bus subscription ended): a
  // follower that still finds it there joins anew.
  bool closed = false;
  std::vector<follower_ptr> followers;  // served
  std::vector<follower_ptr> waiting;    // joined before the entry was primed
  // The hub's view of the topic: the last event (or snapshot) it received, and the recent
  // events, contiguous, the newest being `last` (empty after a snapshot or a gap).
  EventPtr last;
  std::deque<EventPtr> recent;
  // The hub's subscription lost events (a gap) and no event came since: `last` is not the
  // topic's state. Joiners get a bus subscription of their own until the next event.
  bool stale = false;
  Subscription bus_sub;
  // Followers were cancelled and may still be listed (set without the mutex).
  std::atomic<bool> sweep{false};

  bool idle() const { return primed && followers.empty() && waiting.empty(); }
};

using entry_ptr = std::shared_ptr<topic_entry>;

}  // namespace

struct TopicHub::impl : std::enable_shared_from_this<TopicHub::impl> {
  impl(EventBusPtr b, std::size_t replay, std::size_t queue)
      : bus(std::move(b)), replay_events(replay), max_queue(queue) {}

  EventBusPtr bus;
  const std::size_t replay_events;
  const std::size_t max_queue;

  std::mutex mutex;
  std::unordered_map<std::string, entry_ptr> topics;  // guarded by mutex

  // Topics with followers cancelled from inside a callback: tidied by the next subscribe() or
  // cancel() made outside one. A leaf lock.
  std::mutex lazy_mutex;
  std::vector<std::weak_ptr<topic_entry>> lazy;

  std::atomic<std::uint64_t> followers{0};
  std::atomic<std::uint64_t> privates{0};
  std::atomic<std::uint64_t> shared_joins{0};

  // --- under a topic's mutex ---------------------------------------------------------------

  // Removes cancelled followers.
  void compact(topic_entry& e) {
    e.sweep.store(false, std::memory_order_relaxed);
    auto gone = [](const follower_ptr& f) { return f->cancelled.load(std::memory_order_acquire); };
    const auto n = std::erase_if(e.followers, gone) + std::erase_if(e.waiting, gone);
    followers.fetch_sub(n, std::memory_order_relaxed);
  }

  // Hands a joining follower what the bus would give it from the topic's state (SubscribeOptions)
  // from the hub's view. False when that view does not reach back to its `since`: it needs a bus
  // subscription of its own.
  static bool place(topic_entry& e, follower& f) {
    const auto& o = f.options;
    std::optional<std::uint64_t> since = o.since_seq;
    if (e.stale) return false;
    if (!e.last) {
      // Nothing of the topic yet (the bus subscription got no snapshot either): live from here.
      if (since && o.since_epoch) {
        f.positioned = true;
        f.epoch = *o.since_epoch;
        f.seq = *since;
      }
      return true;
    }
    const auto epoch = e.last->epoch();
    const auto seq = e.last->seq();
    if (seq == 0) {
      // State from a snapshot_source, nothing published on the bus: the bus gives it to whoever
      // asks for a snapshot or resumes (since), as it does when it has nothing of a topic.
      if (since || o.snapshot) f.forward(Delivery{Delivery::Kind::snapshot, e.last, 0, {}});
      return true;
    }
    if (since && o.since_epoch && *o.since_epoch != epoch) since.reset();  // renumbered
    auto position = [&](std::uint64_t at) {
      f.positioned = true;
      f.epoch = epoch;
      f.seq = at;
    };
    if (!since) {
      if (o.snapshot)
        f.forward(Delivery{Delivery::Kind::snapshot, e.last, 0, {}});
      else
        position(seq);
      return true;
    }
    if (*since == seq) {
      position(seq);
      return true;
    }
    if (*since > seq) {
      if (o.since_epoch) {
        // Seen in this very numbering, further than the hub got: the hub is behind the bus (the
        // client was on another node a moment ago). What it has not seen comes live.
        position(*since);
      } else {
        // As the bus does: a position beyond the topic's means the topic was forgotten since.
        f.forward(Delivery{Delivery::Kind::snapshot, e.last, 0, {}});
      }
      return true;
    }
    const std::uint64_t first = e.recent.empty() ? seq + 1 : e.recent.front()->seq();
    if (*since + 1 < first) return false;
    for (const auto& ev : e.recent)
      if (ev->seq() > *since) f.forward(Delivery{Delivery::Kind::event, ev, 0, {}});
    return true;
  }

  // --- outside every lock ------------------------------------------------------------------

  void on_delivery(const entry_ptr& e, const Delivery& d) {
    bool tidy_after;
    {
      std::lock_guard lock(e->mutex);
      fanout_scope scope;
      switch (d.kind) {
        case Delivery::Kind::event: {
          const auto& ev = d.event;
          if (!e->last || ev->epoch() != e->last->epoch() || ev->seq() != e->last->seq() + 1)
            e->recent.clear();  // not contiguous with what the hub had
          e->recent.push_back(ev);
          e->stale = false;
          // Before it is primed, the entry keeps all its bus subscription replays: its creator
          // (and whoever joined meanwhile) is served from them.
          while (e->primed && e->recent.size() > replay_events) e->recent.pop_front();
          e->last = ev;
          if (e->primed)
            for (const auto& f : e->followers) f->forward(d);
          break;
        }
        case Delivery::Kind::snapshot:
          e->recent.clear();
          e->stale = false;
          e->last = d.event;
          if (e->primed)
            for (const auto& f : e->followers) f->forward(d);
          break;
        case Delivery::Kind::gap:
          // The hub's subscription fell behind: what follows is not contiguous with what came
          // before, and `last` is no longer the topic's state. Followers are told, as the bus
          // would tell them (they resubscribe with since, on a bus subscription of their own
          // while the hub is stale), and get what comes next.
          e->recent.clear();
          e->stale = true;
          if (e->primed)
            for (const auto& f : e->followers) f->deliver(d);
          break;
        case Delivery::Kind::ended:
          // The bus ended the hub's subscription (it is closing): every follower's ends too.
          e->closed = true;
          for (const auto& f : e->followers) f->deliver(d);
          for (const auto& f : e->waiting) f->deliver(d);
          followers.fetch_sub(e->followers.size() + e->waiting.size(), std::memory_order_relaxed);
          e->followers.clear();
          e->waiting.clear();
          break;
      }
      if (e->sweep.load(std::memory_order_acquire)) compact(*e);
      tidy_after = e->closed || e->idle();
    }
    if (tidy_after) tidy(e);
  }

  // Takes the topic out of the map when it is closed or nobody follows it, and ends its bus
  // subscription.
  void tidy(const entry_ptr& e) {
    if (fanning_out > 0) return defer(e);
    Subscription ending;
    {
      std::lock_guard lock(mutex);
      std::lock_guard topic_lock(e->mutex);
      if (e->sweep.load(std::memory_order_acquire)) compact(*e);
      if (!e->closed && !e->idle()) return;
      e->closed = true;
      if (auto it = topics.find(e->topic); it != topics.end() && it->second == e) topics.erase(it);
      ending = std::move(e->bus_sub);
    }
    ending.cancel();
  }

  void defer(const entry_ptr& e) {
    std::lock_guard lock(lazy_mutex);
    lazy.push_back(e);
  }

  void sweep_lazy() {
    if (fanning_out > 0) return;
    std::vector<std::weak_ptr<topic_entry>> list;
    {
      std::lock_guard lock(lazy_mutex);
      list.swap(lazy);
    }
    for (const auto& w : list)
      if (auto e = w.lock()) tidy(e);
  }

  // The follower's bus subscription of its own (subscribe_async: its replay may be delivered
  // before `done`, directly to the follower; a failure ends it).
  void subscribe_own(const follower_ptr& f, const std::string& topic) {
    SubscribeOptions so = f->options;
    so.executor = inline_executor();
    std::weak_ptr<follower> weak = f;
    bus->subscribe_async(
        topic,
        [weak](const Delivery& d) {
          if (auto self = weak.lock()) self->deliver(d);
        },
        std::move(so),
        [weak, weak_hub = weak_from_this()](result<Subscription> sub) {
          auto self = weak.lock();
          if (!self) return;  // gone: the subscription, dropped here, is cancelled
          if (!sub) return self->deliver(Delivery{Delivery::Kind::ended, nullptr, 0, sub.error()});
          std::unique_lock lock(self->own_mutex);
          if (self->cancelled.load(std::memory_order_acquire)) {
            lock.unlock();
            sub->cancel();
            return;
          }
          self->own = std::move(*sub);
          self->has_own = true;
          if (auto hub = weak_hub.lock()) hub->privates.fetch_add(1, std::memory_order_relaxed);
        });
  }

  result<Subscription> subscribe(const std::string& topic, DeliveryCallback callback,
                                 SubscribeOptions options) {
    if (!is_valid_topic(topic))
      return Error(errc::invalid_topic, "invalid topic '" + topic.substr(0, 300) + "'");
    if (!callback) return Error(errc::bad_request, "subscribe needs a callback");
    if (fanning_out > 0)
      return Error(errc::bad_request,
                   "TopicHub::subscribe cannot be called from inside a follower's callback");
    sweep_lazy();
    auto f = std::make_shared<follower>();
    f->hub = weak_from_this();
    f->callback = std::move(callback);
    f->options = std::move(options);

    entry_ptr e;
    for (;;) {
      bool create = false;
      {
        std::lock_guard lock(mutex);
        auto& slot = topics[topic];
        if (!slot) {
          slot = std::make_shared<topic_entry>(topic);
          create = true;
        }
        e = slot;
      }
      f->entry = e;
      bool own = false, was_closed = false;
      {
        std::lock_guard lock(e->mutex);
        if (e->closed) {
          was_closed = true;
          // Ending (its last follower left, or the bus ended it) but still in the map.
        } else if (create || !e->primed) {
          e->waiting.push_back(f);
          followers.fetch_add(1, std::memory_order_relaxed);
          if (!create) return Subscription(f);  // served when the topic's creator has primed it
        } else {
          fanout_scope scope;
          own = !place(*e, *f);
          if (!own) {
            e->followers.push_back(f);
            followers.fetch_add(1, std::memory_order_relaxed);
            shared_joins.fetch_add(1, std::memory_order_relaxed);
          }
        }
      }
      if (!create) {
        if (was_closed) {
          tidy(e);  // out of the map, so the next round creates it anew
          continue;
        }
        if (own) subscribe_own(f, topic);
        return Subscription(f);
      }
      break;
    }

    // This call created the topic's entry: it makes the topic's bus subscription, without
    // waiting for it (subscribe_async; RedisBus needs two round trips). The creator is served,
    // like any follower that joins meanwhile, once it is made. A bus that answers before
    // subscribe_async returns (LocalBus, any bus using the default) has served it already, and
    // its error is returned here; a later failure ends the subscription with `ended` instead.
    if (auto started = start(e, f); !started) return started.error();
    return Subscription(f);
  }

  // Asks the bus for the topic's one bus subscription; ready() serves every follower that waited
  // for it. Returns the bus's error when it came before subscribe_async returned.
  result<void> start(const entry_ptr& e, const follower_ptr& f) {
    const std::string& topic = e->topic;
    // One bus subscription for every follower. It starts where the creator's options say (so
    // that the creator's replay comes from the bus's history), always with a snapshot where one
    // is due, so that later followers have one.
    SubscribeOptions so;
    so.since_seq = f->options.since_seq;
    so.since_epoch = f->options.since_epoch;
    // Start further back than the creator needs, so that the hub holds the topic's recent
    // events for followers that join with an older `since` (clients reconnecting after a node
    // went away): `replay_events` before the creator's `since`, or from the topic's first event
    // for a creator that wants the current state (a short topic such as booking/<id> is replayed
    // whole; where the bus's history does not reach back that far it sends the last event as a
    // snapshot, which is what such a creator wants). One bus call, no extra read. A creator whose
    // own `since` the widened start does not cover (the bus answered with a snapshot) gets a
    // bus subscription of its own below. A `since` within `replay_events` of the start starts
    // from the first event too: never from the creator's own position, which would leave the hub
    // without the topic's last event when the creator has seen it (the gateway follows a booking
    // from the version its ACK reported), and later joiners without their snapshot or replay.
    if (!so.since_seq) {
      so.since_seq = 0;
      so.since_epoch.reset();
    } else {
      *so.since_seq = *so.since_seq > replay_events ? *so.since_seq - replay_events : 0;
    }
    so.snapshot = true;
    so.snapshot_source = f->options.snapshot_source;
    so.executor = inline_executor();
    so.max_queue = max_queue;
    std::weak_ptr<topic_entry> weak_entry = e;
    std::weak_ptr<impl> weak_hub = weak_from_this();
    // Whether `done` runs inside subscribe_async, on this thread: then an error is the creator's.
    struct call_state {
      std::mutex mutex;
      bool returned = false;
      const std::thread::id caller = std::this_thread::get_id();
      std::optional<Error> error;
    };
    auto call = std::make_shared<call_state>();
    bus->subscribe_async(
        topic,
        [weak_entry, weak_hub](const Delivery& d) {
          auto entry = weak_entry.lock();
          auto hub = weak_hub.lock();
          if (entry && hub) hub->on_delivery(entry, d);
        },
        std::move(so),
        [weak_hub, e, f, call](result<Subscription> sub) {
          bool inside;
          {
            std::lock_guard lock(call->mutex);
            inside = !call->returned && std::this_thread::get_id() == call->caller;
          }
          auto hub = weak_hub.lock();
          if (!hub) return;  // the hub is gone: the subscription, dropped here, is cancelled
          auto r = hub->ready(e, f, std::move(sub), inside);
          if (!r && inside) {
            std::lock_guard lock(call->mutex);
            call->error = r.error();
          }
        });
    std::lock_guard lock(call->mutex);
    call->returned = true;
    if (call->error) return *call->error;
    return {};
  }

  // The topic's bus subscription is made (or failed): serves every follower that waited for it.
  // `creator_gets_error`: a failure is the creator's to return (it is told nothing else);
  // otherwise it gets an `ended` like the others.
  result<void> ready(const entry_ptr& e, const follower_ptr& f, result<Subscription> sub,
                     bool creator_gets_error) {
    const std::string& topic = e->topic;
    std::vector<follower_ptr> own;
    Subscription unused;
    {
      std::lock_guard lock(e->mutex);
      fanout_scope scope;
      if (!sub) {
        // The bus could not subscribe: the creator gets the error (or an `ended`), followers
        // that joined meanwhile an `ended`.
        e->closed = true;
        for (const auto& w : e->waiting)
          if (w != f || !creator_gets_error)
            w->deliver(Delivery{Delivery::Kind::ended, nullptr, 0, sub.error()});
        followers.fetch_sub(e->waiting.size(), std::memory_order_relaxed);
        e->waiting.clear();
      } else if (e->closed) {
        unused = std::move(*sub);  // ended while subscribing: the followers were told
      } else {
        e->bus_sub = std::move(*sub);
        e->primed = true;
        for (auto& w : e->waiting) {
          if (w->cancelled.load(std::memory_order_acquire)) {
            followers.fetch_sub(1, std::memory_order_relaxed);
            continue;
          }
          if (place(*e, *w)) {
            if (w != f) shared_joins.fetch_add(1, std::memory_order_relaxed);
            e->followers.push_back(std::move(w));
          } else {
            followers.fetch_sub(1, std::memory_order_relaxed);
            own.push_back(std::move(w));
          }
        }
        e->waiting.clear();
        while (e->recent.size() > replay_events) e->recent.pop_front();
      }
    }
    unused.cancel();
    for (const auto& w : own) subscribe_own(w, topic);
    tidy(e);  // nothing left to follow (everyone cancelled meanwhile), or it failed: out of the map
    if (!sub) return sub.error();
    return {};
  }

  void close() {
    std::vector<Subscription> ending;
    {
      std::lock_guard lock(mutex);
      for (auto& [name, e] : topics) {
        std::lock_guard topic_lock(e->mutex);
        e->closed = true;
        for (const auto& f : e->followers) f->ended.store(true, std::memory_order_release);
        for (const auto& f : e->waiting) f->ended.store(true, std::memory_order_release);
        ending.push_back(std::move(e->bus_sub));
      }
      topics.clear();
    }
    ending.clear();  // each cancels itself
  }
};

namespace {
void follower::cancel() noexcept {
  if (cancelled.exchange(true, std::memory_order_acq_rel)) return;
  auto h = hub.lock();
  Subscription mine;
  bool had_own;
  {
    std::lock_guard lock(own_mutex);
    had_own = has_own;
    has_own = false;
    mine = std::move(own);
  }
  if (had_own) {
    mine.cancel();
    if (h) h->privates.fetch_sub(1, std::memory_order_relaxed);
  }
  auto e = entry.lock();
  if (!e || !h) return;
  if (fanning_out > 0) {
    // Inside a callback, maybe under this very topic's mutex: not served from now on (the flag),
    // removed by whoever holds the mutex next.
    e->sweep.store(true, std::memory_order_release);
    h->defer(e);
    return;
  }
  bool idle;
  {
    std::lock_guard lock(e->mutex);
    h->compact(*e);
    idle = e->idle();
  }
  if (idle) h->tidy(e);
  h->sweep_lazy();
}
}  // namespace

TopicHub::TopicHub(EventBusPtr bus, std::size_t replay_events, std::size_t max_queue)
    : impl_(std::make_shared<impl>(std::move(bus), std::max<std::size_t>(replay_events, 1),
                                   std::max<std::size_t>(max_queue, 1))) {}

TopicHub::~TopicHub() {
  // Bus subscriptions still being made hold the hub weakly: when they are done, the hub is gone
  // and they are dropped (cancelled).
  impl_->close();
}

result<Subscription> TopicHub::subscribe(const std::string& topic, DeliveryCallback callback,
                                         SubscribeOptions options) {
  return impl_->subscribe(topic, std::move(callback), std::move(options));
}

TopicHubStats TopicHub::stats() const {
  TopicHubStats s;
  {
    std::lock_guard lock(impl_->mutex);
    s.topics = impl_->topics.size();
  }
  s.followers = impl_->followers.load(std::memory_order_relaxed);
  s.private_subscriptions = impl_->privates.load(std::memory_order_relaxed);
  s.shared_joins = impl_->shared_joins.load(std::memory_order_relaxed);
  return s;
}

}  // namespace pushbook::detail
