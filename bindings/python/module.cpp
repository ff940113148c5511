// pushbook._core: the Python bindings. A thin layer: it converts between JSON and Python values,
// maps pushbook's error codes to the exception classes of pushbook._types, and manages the GIL.
// The C++ core does the work.
//
// Threads and the GIL: every call that may block or take engine/bus locks releases the GIL;
// every call from a C++ thread into Python (subscription callbacks, the handler) takes it. A
// Python callback that raises is logged (logger "pushbook") and counted, and the C++ thread goes
// on. At interpreter exit every live engine, gateway and subscription is stopped first
// (atexit), so no C++ thread reaches for the GIL of a finalizing interpreter.
#include <pushbook/auth.hpp>
#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/postgres_store.hpp>
#include <pushbook/protocol_session.hpp>
#include <pushbook/push_gateway.hpp>
#include <pushbook/redis_bus.hpp>
#include <pushbook/sqlite_store.hpp>
#include <pushbook/version.hpp>

#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <boost/json.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <set>
#include <utility>

namespace py = pybind11;
using namespace pybind11::literals;
namespace json = boost::json;
using namespace pushbook;

namespace {

std::atomic<bool> finalizing{false};

// Every call into Python from a C++ thread (a bus callback, a handler, a future's result, a log
// line, dropping a reference) passes this gate. At interpreter exit _shutdown_all closes it and
// waits, without the GIL, for the calls already through: after that no C++ thread takes the GIL,
// and none is left waiting for it when the interpreter finalizes (a callback that had checked
// `finalizing` and then waited for the GIL used to run inside a finalizing interpreter).
struct PythonGate {
  std::mutex mutex;
  std::condition_variable idle;
  std::size_t inside = 0;
  bool closed = false;
};
PythonGate& python_gate() {
  static auto* gate = new PythonGate;  // never destroyed: used during interpreter exit
  return *gate;
}

// A pass through the gate for one call into Python: `if (!call) return;` then take the GIL.
class PythonCall {
 public:
  PythonCall() {
    auto& g = python_gate();
    std::lock_guard lock(g.mutex);
    if (g.closed) return;
    ++g.inside;
    entered_ = true;
  }
  ~PythonCall() {
    if (!entered_) return;
    auto& g = python_gate();
    std::lock_guard lock(g.mutex);
    if (--g.inside == 0) g.idle.notify_all();
  }
  PythonCall(const PythonCall&) = delete;
  PythonCall& operator=(const PythonCall&) = delete;
  explicit operator bool() const { return entered_; }

 private:
  bool entered_ = false;
};

// Closes the gate and waits for the calls inside, at most 5 s: a callback blocked on something
// only the exiting main thread would release must not hang the exit (it then meets the
// interpreter's own rule for threads still running at exit). Call without the GIL.
void close_python_gate() {
  auto& g = python_gate();
  std::unique_lock lock(g.mutex);
  g.closed = true;
  if (!g.idle.wait_for(lock, std::chrono::seconds(5), [&] { return g.inside == 0; }))
    std::fprintf(stderr,
                 "pushbook: %zu callback(s) still running in Python 5 s after exit began; exiting without "
                 "them\n",
                 g.inside);
}

// --- JSON <-> Python -------------------------------------------------------------------------

py::object to_py(const json::value& v) {
  switch (v.kind()) {
    case json::kind::null: return py::none();
    case json::kind::bool_: return py::bool_(v.get_bool());
    case json::kind::int64: return py::int_(v.get_int64());
    case json::kind::uint64: return py::int_(v.get_uint64());
    case json::kind::double_: return py::float_(v.get_double());
    case json::kind::string: return py::str(v.get_string().data(), v.get_string().size());
    case json::kind::array: {
      py::list l;
      for (const auto& x : v.get_array()) l.append(to_py(x));
      return l;
    }
    case json::kind::object: {
      py::dict d;
      for (const auto& kv : v.get_object()) d[py::str(kv.key().data(), kv.key().size())] = to_py(kv.value());
      return d;
    }
  }
  return py::none();
}

json::value from_py(py::handle h, int depth = 0) {
  if (depth > 64) throw py::value_error("value nested too deeply for JSON");
  if (h.is_none()) return nullptr;
  if (py::isinstance<py::bool_>(h)) return h.cast<bool>();
  if (py::isinstance<py::int_>(h)) {
    try {
      return h.cast<std::int64_t>();
    } catch (const py::cast_error&) {
      return h.cast<std::uint64_t>();
    }
  }
  if (py::isinstance<py::float_>(h)) return h.cast<double>();
  if (py::isinstance<py::str>(h)) return json::string(h.cast<std::string>());
  if (py::isinstance<py::dict>(h)) {
    json::object o;
    for (auto kv : h.cast<py::dict>()) {
      if (!py::isinstance<py::str>(kv.first)) throw py::type_error("JSON object keys must be str");
      o[kv.first.cast<std::string>()] = from_py(kv.second, depth + 1);
    }
    return o;
  }
  if (py::isinstance<py::list>(h) || py::isinstance<py::tuple>(h)) {
    json::array a;
    for (auto x : h) a.push_back(from_py(x, depth + 1));
    return a;
  }
  throw py::type_error("cannot convert " + std::string(py::str(py::type::of(h))) + " to JSON");
}

// --- errors ----------------------------------------------------------------------------------

// pushbook._types, imported once. Deliberately never released: a static py::object would be
// destroyed after the interpreter is gone.
py::object types() {
  static auto* module = new py::object(py::module_::import("pushbook._types"));
  return *module;
}

// The Python exception (an instance of a pushbook.Error subclass) for `e`.
py::object error_object(const Error& e) {
  const char* cls = "Error";
  if (e.code.category() == error_category()) {
    switch (static_cast<errc>(e.code.value())) {
      case errc::bad_request:
      case errc::exceeds_capacity:
      case errc::invalid_topic: cls = "ValidationError"; break;
      case errc::not_found: cls = "NotFound"; break;
      case errc::already_exists: cls = "AlreadyExists"; break;
      case errc::idempotency_conflict: cls = "IdempotencyConflict"; break;
      case errc::invalid_transition:
      case errc::capacity_in_use: cls = "InvalidTransition"; break;
      case errc::overloaded:
      case errc::slow_consumer:
      case errc::shutting_down:
      case errc::bus_unavailable: cls = "Overloaded"; break;
      case errc::quota_exceeded: cls = "QuotaExceeded"; break;
      case errc::unauthorized:
      case errc::forbidden: cls = "Unauthorized"; break;
      default: break;
    }
  }
  return types().attr(cls)(e.message, to_string(static_cast<errc>(e.code.value())));
}

[[noreturn]] void raise(const Error& e) {
  py::object exc = error_object(e);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw py::error_already_set();
}

template <class T>
T take(result<T> r) {
  if (!r) raise(r.error());
  return std::move(*r);
}
void take(result<void> r) {
  if (!r) raise(r.error());
}

// Runs `f` (C++ only: it must not touch Python objects) with the GIL released. Errors are
// raised by the caller afterwards, with the GIL held again.
template <class F>
auto nogil(F&& f) {
  py::gil_scoped_release release;
  return f();
}

// --- GIL-safe holder of a Python object used from C++ threads --------------------------------

struct PyRef {
  py::object obj;
  explicit PyRef(py::object o) : obj(std::move(o)) {}
  ~PyRef() {
    if (!obj) return;
    PythonCall call;
    if (!call || finalizing.load() || !Py_IsInitialized()) {
      obj.release();  // the interpreter is going: leak rather than touch it
      return;
    }
    py::gil_scoped_acquire gil;
    obj = py::object();
  }
};

void log_callback_error(py::error_already_set& e, const char* where) {
  try {
    py::module_::import("logging")
        .attr("getLogger")("pushbook")
        .attr("error")("%s raised: %s", where, e.what());
  } catch (...) {
  }
  e.restore();
  PyErr_Clear();
}

// --- live objects, stopped at exit -----------------------------------------------------------

struct Live {
  std::mutex mutex;
  std::set<std::weak_ptr<BookingEngine>, std::owner_less<>> engines;
  std::set<std::weak_ptr<PushGateway>, std::owner_less<>> gateways;
};
Live& live() {
  static Live* l = new Live;  // never destroyed: used during interpreter exit
  return *l;
}

void shutdown_all() {
  finalizing = true;
  std::vector<std::shared_ptr<PushGateway>> gateways;
  std::vector<std::shared_ptr<BookingEngine>> engines;
  {
    std::lock_guard lock(live().mutex);
    for (auto& w : live().gateways)
      if (auto g = w.lock()) gateways.push_back(g);
    for (auto& w : live().engines)
      if (auto e = w.lock()) engines.push_back(e);
  }
  py::gil_scoped_release release;
  for (auto& g : gateways) g->stop();
  for (auto& e : engines) e->shutdown();
  // Last: the handlers of the bookings in flight ran above; from here no C++ thread enters Python.
  close_python_gate();
}

// --- Python-facing types ---------------------------------------------------------------------

struct PyEvent {
  std::string kind;
  std::string topic;
  std::uint64_t seq = 0;
  py::object data;
  bool snapshot = false;
  double time = 0;
  std::uint64_t dropped = 0;
  std::string reason;
};

PyEvent make_event(const Delivery& d) {
  PyEvent e;
  switch (d.kind) {
    case Delivery::Kind::event: e.kind = "event"; break;
    case Delivery::Kind::snapshot: e.kind = "snapshot"; break;
    case Delivery::Kind::gap: e.kind = "gap"; break;
    case Delivery::Kind::ended: e.kind = "ended"; break;
  }
  if (d.event) {
    e.topic = d.event->topic();
    e.seq = d.event->seq();
    e.data = to_py(d.event->data());
    e.snapshot = d.kind == Delivery::Kind::snapshot;
    e.time = std::chrono::duration<double>(d.event->time().time_since_epoch()).count();
  } else {
    e.data = py::none();
  }
  e.dropped = d.dropped;
  e.reason = d.reason.message;
  return e;
}

// Wakes an asyncio loop from any thread without the GIL: an eventfd the loop watches, and the ids
// of the sessions that have output.
class Waker {
 public:
  Waker() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
    if (fd_ < 0) raise(Error(errc::internal, "eventfd failed"));
  }
  ~Waker() { close(); }
  Waker(const Waker&) = delete;
  Waker& operator=(const Waker&) = delete;
  int fileno() const { return fd_; }
  void wake(std::uint64_t id) {
    std::lock_guard lock(mutex_);
    ready_.push_back(id);
    if (signalled_ || fd_ < 0) return;
    signalled_ = true;
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(fd_, &one, sizeof one);  // cannot fail but by overflow (2^64)
  }
  std::vector<std::uint64_t> take() {
    std::lock_guard lock(mutex_);
    std::uint64_t count = 0;
    if (fd_ >= 0) [[maybe_unused]]
      auto n = ::read(fd_, &count, sizeof count);  // EAGAIN: nothing
    signalled_ = false;
    return std::exchange(ready_, {});
  }
  void close() {
    std::lock_guard lock(mutex_);
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  std::mutex mutex_;
  int fd_;
  bool signalled_ = false;
  std::vector<std::uint64_t> ready_;
};

// Objects whose destruction waits for C++ threads (which may be waiting for the GIL to run a
// Python callback) are destroyed with the GIL released.
template <class T>
void delete_without_gil(T* p) {
  if (PyGILState_Check() && !finalizing.load()) {
    py::gil_scoped_release release;
    delete p;
  } else {
    delete p;
  }
}

template <class T, class... Args>
std::shared_ptr<T> make_gil_safe(Args&&... args) {
  return std::shared_ptr<T>(new T(std::forward<Args>(args)...), &delete_without_gil<T>);
}

struct PySubscription {
  Subscription sub;
  std::shared_ptr<std::atomic<std::uint64_t>> errors = std::make_shared<std::atomic<std::uint64_t>>(0);
  ~PySubscription() {
    if (PyGILState_Check() && !finalizing.load()) {
      py::gil_scoped_release release;
      sub.cancel();
    }
  }
};

py::object status(BookingStatus s) { return types().attr("Status")(to_string(s)); }

py::dict booking_dict(const Booking& b) { return to_py(to_json(b)).cast<py::dict>(); }

struct PyBooking {  // what a handler and engine.get() see
  Booking b;
};

struct PyAck {
  Ack ack;
};

Decision to_decision(py::handle r) {
  if (py::isinstance<py::bool_>(r))
    return r.cast<bool>() ? Decision::approved() : Decision::declined("declined by handler");
  if (py::isinstance<Decision>(r)) return r.cast<Decision>();
  return Decision::error("handler returned " + std::string(py::str(py::type::of(r).attr("__name__"))) +
                         ", not bool or pushbook.Decision");
}

std::string exception_text(py::error_already_set& e) {
  std::string text = py::str(e.value());
  if (text.empty()) text = py::str(e.type().attr("__name__"));
  return text;
}

// Delivers a handler's decision without the GIL: deciding takes engine locks that a thread
// waiting for the store may hold while the store's completion thread waits for the GIL.
void decide_nogil(const Completion& done, Decision d) {
  py::gil_scoped_release release;
  done(std::move(d));
}

BookingHandler make_handler(py::object fn, py::object loop) {
  auto fn_ref = std::make_shared<PyRef>(std::move(fn));
  auto loop_ref = std::make_shared<PyRef>(std::move(loop));
  return [fn_ref, loop_ref](const Booking& b, Completion done) {
    PythonCall call;
    if (!call || finalizing.load()) return (void)done(Decision::error("interpreter shutting down"));
    py::gil_scoped_acquire gil;
    std::optional<Decision> decision;  // delivered after the GIL-holding part
    try {
      py::object r = fn_ref->obj(PyBooking{b});
      if (py::module_::import("inspect").attr("iscoroutine")(r).cast<bool>()) {
        if (loop_ref->obj.is_none()) {
          r.attr("close")();
          return decide_nogil(
              done, Decision::error("an async handler needs BookingEngine(..., loop=<asyncio loop>)"));
        }
        py::object future = py::module_::import("asyncio").attr("run_coroutine_threadsafe")(r, loop_ref->obj);
        future.attr("add_done_callback")(py::cpp_function([done](py::object f) {
          Decision d;
          try {
            d = to_decision(f.attr("result")());
          } catch (py::error_already_set& e) {
            d = Decision::error(exception_text(e));
          }
          decide_nogil(done, std::move(d));
        }));
        return;
      }
      decision = to_decision(r);
    } catch (py::error_already_set& e) {
      decision = Decision::error(exception_text(e));
    }
    decide_nogil(done, std::move(*decision));
  };
}

std::optional<std::chrono::milliseconds> ms(std::optional<double> seconds) {
  if (!seconds) return std::nullopt;
  return std::chrono::milliseconds(static_cast<std::int64_t>(*seconds * 1000.0));
}

// Where submit_async() futures are resolved. Deliberately never destroyed: its thread must not be
// joined while the interpreter finalizes.
ThreadPool& futures_pool() {
  static auto* pool = new ThreadPool(1);
  return *pool;
}

// The gateway's log lines go to Python's logging, logger "pushbook". Which levels are sent is
// decided by the logger's effective level when the gateway is made (debug lines, one per request,
// then cost nothing unless asked for), so no gateway thread takes the GIL for a dropped line.
LogFunction python_log() {
  auto logger = std::make_shared<PyRef>(py::module_::import("logging").attr("getLogger")("pushbook"));
  const int threshold = logger->obj.attr("getEffectiveLevel")().cast<int>();
  return [logger, threshold](LogLevel level, std::string_view line) {
    static constexpr int levels[] = {10, 20, 30, 40};  // logging.DEBUG, INFO, WARNING, ERROR
    const int python_level = levels[static_cast<int>(level)];
    if (python_level < threshold || finalizing.load()) return;
    PythonCall call;
    if (!call) return;
    py::gil_scoped_acquire gil;
    try {
      logger->obj.attr("log")(python_level, "%s", std::string(line));
    } catch (py::error_already_set&) {
      PyErr_Clear();  // a broken handler must not take a gateway thread down
    }
  };
}

// A count from Python (a capacity, a quantity): an int from 0 to 4294967295, not a bool.
// Anything else raises pushbook.ValidationError naming `what`, not a TypeError with C++ types.
std::uint32_t count_arg(py::handle v, const std::string& what) {
  const std::string expected = what + " must be a whole number from 0 to 4294967295";
  if (!PyLong_Check(v.ptr()) || PyBool_Check(v.ptr()))
    raise(Error(errc::bad_request,
                expected + ", not " + std::string(py::str(py::type::of(v).attr("__name__")))));
  int overflow = 0;
  const long long n = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0 || n < 0 || n > 4294967295LL)
    raise(Error(errc::bad_request, expected + ", not " + std::string(py::str(v))));
  return static_cast<std::uint32_t>(n);
}

// The request submit() and submit_async() take, from their keyword arguments.
BookingRequest make_request(const std::string& user, std::optional<std::string> resource, py::handle quantity,
                            py::handle lines, std::optional<std::string> idempotency_key, py::object metadata,
                            std::optional<double> hold) {
  BookingRequest r;
  r.user = user;
  if (resource && !lines.is_none()) raise(Error(errc::bad_request, "give resource= or lines=, not both"));
  if (resource) r.lines.push_back({*resource, count_arg(quantity, "quantity")});
  if (!lines.is_none()) {
    if (!py::isinstance<py::iterable>(lines) || py::isinstance<py::str>(lines))
      raise(Error(errc::bad_request, "lines must be a list of (resource, quantity) pairs"));
    std::size_t i = 0;
    for (auto item : lines) {
      const auto where = "lines[" + std::to_string(i++) + "]";
      if (!py::isinstance<py::sequence>(item) || py::isinstance<py::str>(item) || py::len(item) != 2 ||
          !py::isinstance<py::str>(item[py::int_(0)]))
        raise(Error(errc::bad_request, where + " must be a (resource, quantity) pair"));
      r.lines.push_back(
          {item[py::int_(0)].cast<std::string>(), count_arg(item[py::int_(1)], where + " quantity")});
    }
  }
  if (idempotency_key) r.idempotency_key = *idempotency_key;
  if (!metadata.is_none()) {
    auto v = from_py(metadata);
    if (!v.is_object()) throw py::type_error("metadata must be a dict");
    r.metadata = std::move(v.as_object());
  }
  r.hold_for = ms(hold);
  return r;
}

// A store for Python: its last reference may go while the GIL is held, and a SqliteStore's
// destructor joins its writer thread, which may be waiting for the GIL (a submit_async result).
template <class T>
std::shared_ptr<BookingStore> gil_safe_store(std::shared_ptr<T> store) {
  auto* raw = store.get();
  return std::shared_ptr<BookingStore>(raw, [keep = std::move(store)](BookingStore*) mutable {
    if (PyGILState_Check() && !finalizing.load()) {
      py::gil_scoped_release release;
      keep.reset();
    } else {
      keep.reset();
    }
  });
}

// Binds an engine call that takes a booking id and returns the booking: the call runs without
// the GIL, its error is raised with it.
template <class Call>
auto booking_call(Call call) {
  return [call](BookingEngine& e, const std::string& id) {
    result<Booking> b = nogil([&] { return call(e, id); });
    return PyBooking{take(std::move(b))};
  };
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pushbook core (C++): the event bus, the booking engine and the push gateway";
  m.attr("__version__") = PUSHBOOK_VERSION_STRING;

  py::class_<PyEvent>(m, "Event", "One delivery from the bus: an event, a snapshot, a gap marker or an end.")
      .def_readonly("kind", &PyEvent::kind, "'event', 'snapshot', 'gap' or 'ended'")
      .def_readonly("topic", &PyEvent::topic)
      .def_readonly("seq", &PyEvent::seq, "position in its topic: 1, 2, 3, ...")
      .def_readonly("data", &PyEvent::data, "the payload as Python values (dict for bookings)")
      .def_readonly("snapshot", &PyEvent::snapshot, "True when it carries current state, not the next change")
      .def_readonly("time", &PyEvent::time, "publication time, Unix seconds")
      .def_readonly("dropped", &PyEvent::dropped, "for gap markers: how many events were dropped")
      .def_readonly("reason", &PyEvent::reason, "for 'ended': why")
      .def("__repr__", [](const PyEvent& e) {
        return "<pushbook.Event " + e.kind + " " + e.topic + " seq=" + std::to_string(e.seq) + ">";
      });

  py::class_<PySubscription>(m, "Subscription",
                             "A live subscription; cancel() or leave the with-block to end it.")
      .def(
          "cancel", [](PySubscription& s) { s.sub.cancel(); }, py::call_guard<py::gil_scoped_release>(),
          "Stop deliveries; after it returns no callback runs (unless called from the callback itself).")
      .def_property_readonly("active", [](const PySubscription& s) { return s.sub.active(); })
      .def_property_readonly(
          "errors", [](const PySubscription& s) { return s.errors->load(); },
          "how many times the callback raised")
      .def(
          "__enter__", [](PySubscription& s) -> PySubscription& { return s; },
          py::return_value_policy::reference)
      .def("__exit__",
           [](PySubscription& s, py::args) {
             py::gil_scoped_release r;
             s.sub.cancel();
           })
      .def("__repr__", [](const PySubscription& s) {
        return std::string("<pushbook.Subscription ") + (s.sub.active() ? "active" : "cancelled") + ">";
      });

  py::class_<BookingStore, std::shared_ptr<BookingStore>>(
      m, "BookingStore", "Where an engine keeps bookings (MemoryStore, SqliteStore, or open_store(url)).");
  m.def(
      "MemoryStore",
      [](double finished_retention, std::size_t max_finished) {
        if (!(finished_retention >= 0) || finished_retention > 1e9)
          raise(Error(errc::bad_request, "finished_retention must be a number of seconds, 0 or more"));
        MemoryStoreOptions o;
        o.finished_retention =
            std::chrono::milliseconds(static_cast<std::int64_t>(finished_retention * 1000));
        o.max_finished = max_finished;
        return gil_safe_store(std::make_shared<MemoryStore>(o));
      },
      "finished_retention"_a = 3600.0, "max_finished"_a = 10000,
      "Bookings in this process only: the fastest store, gone with the process. Finished bookings "
      "(rejected, cancelled, released, expired) are forgotten finished_retention seconds after they "
      "finish, or sooner beyond max_finished of them.");
  m.def(
      "SqliteStore",
      [](const std::string& path, const std::string& sync) {
        SqliteOptions o;
        if (sync == "normal")
          o.sync = SqliteSync::normal;
        else if (sync == "full")
          o.sync = SqliteSync::full;
        else
          raise(Error(errc::bad_request, "sync is 'normal' or 'full', not '" + sync + "'"));
        auto store = nogil([&] { return SqliteStore::open(path, o); });
        return gil_safe_store(take(std::move(store)));
      },
      "path"_a, "sync"_a = "normal",
      "Bookings in an SQLite file: an ACK means stored, and an engine started over the same file "
      "recovers everything. sync='normal' survives a crash of the process, 'full' a power loss too. "
      "Raises pushbook.Error (code 'store_failed') when the file cannot be used.");
  m.def(
      "PostgresStore",
      [](const std::string& conninfo, std::size_t pool_size, double statement_timeout, double connect_timeout,
         double lease, const std::string& node_id, double poll_interval) {
        auto seconds = [](double s, const char* name) {
          if (!(s > 0) || s > 86400)
            raise(Error(errc::bad_request, std::string(name) + " must be a number of seconds, above 0"));
          // At least 1 ms: a positive value never rounds down to 0 (which would mean the default).
          return std::chrono::milliseconds(std::max<std::int64_t>(1, static_cast<std::int64_t>(s * 1000)));
        };
        PostgresOptions o;
        o.pool_size = pool_size;
        o.statement_timeout = seconds(statement_timeout, "statement_timeout");
        o.connect_timeout = seconds(connect_timeout, "connect_timeout");
        o.lease = seconds(lease, "lease");
        o.node_id = node_id;
        if (poll_interval != 0) o.poll_interval = seconds(poll_interval, "poll_interval");
        auto store = nogil([&] { return PostgresStore::open(conninfo, o); });
        return gil_safe_store(take(std::move(store)));
      },
      "conninfo"_a, "pool_size"_a = 4, "statement_timeout"_a = 5.0, "connect_timeout"_a = 2.0,
      "lease"_a = 10.0, "node_id"_a = "", "poll_interval"_a = 0.0,
      "Bookings in PostgreSQL (a libpq conninfo or postgresql:// URI), shareable by several "
      "processes: the database enforces capacity, so together they never overbook. No call waits "
      "longer than statement_timeout seconds for it. A process's undecided bookings are claimed "
      "for `lease` seconds, renewed while it lives; once it dies another process's engine takes "
      "them over (the handler sees booking.attempt > 1), looking every poll_interval seconds (0: "
      "lease/5, at most 0.5); a store that closes hands its work over at once (NOTIFY). Raises "
      "pushbook.Error (code 'store_failed') "
      "when the database cannot be reached or its schema is newer than this build.");
  m.def(
      "open_store",
      [](const std::string& url) {
        auto store = nogil([&] { return open_store(url); });
        return gil_safe_store(take(std::move(store)));
      },
      "url"_a, "A store from a URL: 'memory:', 'sqlite:PATH[?sync=normal|full]' or 'postgresql://...'.");

  // The bus methods once, on the interface; LocalBus and RedisBus add their constructors and stats.
  py::class_<EventBus, std::shared_ptr<EventBus>>(m, "EventBus", "An event bus (LocalBus or RedisBus).")
      .def_property_readonly(
          "available", [](const EventBus& bus) { return bus.available(); },
          "Whether the bus can publish and subscribe now (RedisBus: connected to Redis); for health checks.")
      .def(
          "publish",
          [](EventBus& bus, const std::string& topic, py::handle data, std::optional<std::uint64_t> seq) {
            auto value = std::make_shared<const json::value>(from_py(data));
            return take(nogil([&] { return bus.publish(topic, value, PublishOptions{seq}); }))->seq();
          },
          "topic"_a, "data"_a, "seq"_a = py::none(),
          "Publishes data (JSON-like Python values); returns the event's seq. With seq, the publisher "
          "numbers the event: one whose seq the topic already has (or passed) is dropped and raises "
          "with code already_exists.")
      .def(
          "publish_json",
          [](EventBus& bus, const std::string& topic, std::string json, std::optional<std::uint64_t> seq) {
            auto text = std::make_shared<const std::string>(std::move(json));
            return take(nogil([&] { return bus.publish_json(topic, text, PublishOptions{seq}); }))->seq();
          },
          "topic"_a, "json"_a, "seq"_a = py::none(),
          "publish() of a payload given as JSON text (str), kept and sent as it is: for a service that "
          "has the JSON already (no conversion to Python objects and back). Raises with code "
          "bad_request when the text is not exactly one JSON value; returns the event's seq.")
      .def(
          "subscribe",
          [](EventBus& bus, const std::string& topic, py::function callback,
             std::optional<std::uint64_t> since, std::size_t max_queue, const std::string& overflow,
             bool snapshot) {
            SubscribeOptions o;
            o.since_seq = since;
            o.max_queue = max_queue;
            o.snapshot = snapshot;
            if (overflow == "drop_oldest")
              o.overflow = OverflowPolicy::drop_oldest;
            else if (overflow == "end")
              o.overflow = OverflowPolicy::end_subscription;
            else
              throw py::value_error("overflow must be 'drop_oldest' or 'end'");
            auto out = std::make_unique<PySubscription>();
            auto fn = std::make_shared<PyRef>(std::move(callback));
            auto errors = out->errors;
            auto cb = [fn, errors](const Delivery& d) {
              PythonCall call;
              if (!call || finalizing.load()) return;
              py::gil_scoped_acquire gil;
              try {
                fn->obj(make_event(d));
              } catch (py::error_already_set& e) {
                errors->fetch_add(1);
                log_callback_error(e, "pushbook subscription callback");
              }
            };
            result<Subscription> r = [&] {
              py::gil_scoped_release release;
              return bus.subscribe(topic, cb, o);
            }();
            out->sub = take(std::move(r));
            return out;
          },
          "topic"_a, "callback"_a, "since"_a = py::none(), "max_queue"_a = 4096, "overflow"_a = "drop_oldest",
          "snapshot"_a = true,
          "Calls callback(event) on a bus thread for each delivery. since=N replays events after seq N.")
      .def("last",
           [](EventBus& bus, const std::string& topic) -> py::object {
             auto e = bus.last(topic);
             if (!e) return py::none();
             return py::cast(make_event(Delivery{Delivery::Kind::snapshot, e, 0, {}}));
           })
      .def(
          "history",
          [](EventBus& bus, const std::string& topic, std::uint64_t since) {
            py::list out;
            for (auto& e : bus.history(topic, since))
              out.append(make_event(Delivery{Delivery::Kind::event, e, 0, {}}));
            return out;
          },
          "topic"_a, "since"_a = 0);

  py::class_<LocalBus, EventBus, std::shared_ptr<LocalBus>>(m, "LocalBus", "The in-process event bus.")
      .def(py::init([](std::size_t history_limit, double history_max_age, std::size_t delivery_threads) {
             LocalBusOptions o;
             o.history_limit = history_limit;
             o.history_max_age = std::chrono::milliseconds(static_cast<std::int64_t>(history_max_age * 1000));
             o.delivery_threads = delivery_threads;
             return make_gil_safe<LocalBus>(o);
           }),
           "history_limit"_a = 256, "history_max_age"_a = 600.0, "delivery_threads"_a = 1)
      .def("__repr__",
           [](LocalBus& bus) {
             auto s = bus.stats();
             return "<pushbook.LocalBus topics=" + std::to_string(s.topics) +
                    " subscriptions=" + std::to_string(s.subscriptions) + ">";
           })
      .def_property_readonly("stats", [](LocalBus& bus) {
        auto s = bus.stats();
        return py::dict("published"_a = s.published, "delivered"_a = s.delivered, "dropped"_a = s.dropped,
                        "topics"_a = s.topics, "subscriptions"_a = s.subscriptions);
      });

  py::class_<RedisBus, EventBus, std::shared_ptr<RedisBus>>(
      m, "RedisBus", "The event bus on Redis, shared by every process on it (pushbook/redis_bus.hpp).")
      .def(py::init([](const std::string& address, std::size_t history_limit, double history_max_age,
                       std::size_t delivery_threads, const std::string& key_prefix, double command_timeout,
                       double connect_wait) {
             RedisBusOptions o;
             o.address = address;
             o.history_limit = history_limit;
             o.history_max_age = std::chrono::milliseconds(static_cast<std::int64_t>(history_max_age * 1000));
             o.delivery_threads = delivery_threads;
             o.key_prefix = key_prefix;
             o.command_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(command_timeout * 1000));
             std::optional<Error> bad;
             auto bus = nogil([&]() -> std::shared_ptr<RedisBus> {
               try {
                 return make_gil_safe<RedisBus>(o);
               } catch (const Exception& e) {
                 bad = Error(e.code(), e.what());  // raised below, with the GIL
                 return nullptr;
               }
             });
             if (bad) raise(*bad);
             nogil([&] {
               return bus->wait_connected(
                   std::chrono::milliseconds(static_cast<std::int64_t>(connect_wait * 1000)));
             });
             return bus;
           }),
           "address"_a = "redis://127.0.0.1:6379", "history_limit"_a = 256, "history_max_age"_a = 600.0,
           "delivery_threads"_a = 1, "key_prefix"_a = "pushbook:", "command_timeout"_a = 2.0,
           "connect_wait"_a = 2.0)
      .def(
          "wait_connected",
          [](RedisBus& bus, double timeout) {
            return nogil([&] {
              return bus.wait_connected(std::chrono::milliseconds(static_cast<std::int64_t>(timeout * 1000)));
            });
          },
          "timeout"_a)
      .def("__repr__",
           [](RedisBus& bus) {
             auto s = bus.stats();
             return "<pushbook.RedisBus channels=" + std::to_string(s.channels) +
                    " subscriptions=" + std::to_string(s.subscriptions) + ">";
           })
      .def_property_readonly("stats", [](RedisBus& bus) {
        auto s = bus.stats();
        return py::dict("published"_a = s.published, "delivered"_a = s.delivered, "dropped"_a = s.dropped,
                        "subscriptions"_a = s.subscriptions, "received"_a = s.received,
                        "channels"_a = s.channels, "reconnects"_a = s.reconnects,
                        "publish_failures"_a = s.publish_failures, "resyncs"_a = s.resyncs);
      });

  py::class_<Decision>(m, "Decision",
                       "A handler's answer: Decision(True) confirms, Decision(False, 'why') rejects.")
      .def(py::init([](bool approve, std::string reason) {
             return Decision{approve, std::move(reason), false};
           }),
           "approve"_a, "reason"_a = "")
      .def_readonly("approve", &Decision::approve)
      .def_readonly("reason", &Decision::message)
      .def("__repr__", [](const Decision& d) {
        return std::string("pushbook.Decision(") + (d.approve ? "True" : "False") + ", '" + d.message + "')";
      });

  py::class_<PyBooking>(m, "Booking", "A booking as the engine holds it (also what a handler receives).")
      .def_property_readonly("booking_id", [](const PyBooking& p) { return p.b.id; })
      .def_property_readonly("user", [](const PyBooking& p) { return p.b.user; })
      .def_property_readonly("lines",
                             [](const PyBooking& p) {
                               py::list l;
                               for (auto& x : p.b.lines) l.append(py::make_tuple(x.resource, x.quantity));
                               return l;
                             })
      .def_property_readonly("metadata", [](const PyBooking& p) { return to_py(p.b.metadata); })
      .def_property_readonly("status", [](const PyBooking& p) { return status(p.b.status); })
      .def_property_readonly("reason",
                             [](const PyBooking& p) -> py::object {
                               if (p.b.reason == RejectReason::none) return py::none();
                               return types().attr("Reason")(to_string(p.b.reason));
                             })
      .def_property_readonly("reason_message", [](const PyBooking& p) { return p.b.reason_message; })
      .def_property_readonly("version", [](const PyBooking& p) { return p.b.version; })
      .def_property_readonly(
          "attempt", [](const PyBooking& p) { return p.b.attempt; },
          "In a handler: 1 the first time it runs for this booking, more when it may have run before "
          "(a restart recovered it, another process took it over). 0 outside a handler.")
      .def("to_dict", [](const PyBooking& p) { return booking_dict(p.b); })
      .def("__repr__", [](const PyBooking& p) {
        return "<pushbook.Booking " + p.b.id + " " + to_string(p.b.status) + " user=" + p.b.user + ">";
      });

  py::class_<PyAck>(m, "Ack", "The immediate answer to submit().")
      .def_property_readonly("booking_id", [](const PyAck& a) { return a.ack.booking_id; })
      .def_property_readonly("status", [](const PyAck& a) { return status(a.ack.status); })
      .def_property_readonly("replayed", [](const PyAck& a) { return a.ack.replayed; })
      .def_property_readonly(
          "version", [](const PyAck& a) { return a.ack.version; },
          "The booking's version this ACK reports (1 for a new booking); also its "
          "event's seq on booking/<id>.")
      .def("__repr__", [](const PyAck& a) {
        return "<pushbook.Ack " + a.ack.booking_id + " " + to_string(a.ack.status) +
               (a.ack.replayed ? " replayed" : "") + ">";
      });

  py::class_<BookingEngine, std::shared_ptr<BookingEngine>>(m, "BookingEngine",
                                                            "Validates, ACKs, decides, publishes.")
      .def(
          py::init([](std::shared_ptr<EventBus> bus, std::size_t workers, py::object handler, py::object loop,
                      double handler_timeout, std::size_t max_queue, double idempotency_window,
                      std::shared_ptr<BookingStore> store, const std::string& recovery, double max_hold,
                      std::size_t max_metadata_bytes, std::size_t max_in_flight_per_user,
                      std::uint64_t max_held_units_per_user, bool decide_on_caller) {
            if (!bus) throw py::type_error("BookingEngine needs a bus (LocalBus or RedisBus)");
            EngineOptions o;
            o.decide_on_caller = decide_on_caller;
            if (!(max_hold > 0) || max_hold > 365.0 * 86400)
              raise(Error(errc::bad_request, "max_hold must be a number of seconds above 0, at most a year"));
            o.max_hold = std::chrono::milliseconds(static_cast<std::int64_t>(max_hold * 1000));
            o.max_metadata_bytes = max_metadata_bytes;
            o.max_in_flight_per_user = max_in_flight_per_user;
            o.max_held_units_per_user = max_held_units_per_user;
            o.store = std::move(store);
            if (recovery == "requeue")
              o.recovery = RecoveryPolicy::requeue;
            else if (recovery == "reject")
              o.recovery = RecoveryPolicy::reject;
            else
              raise(Error(errc::bad_request, "recovery is 'requeue' or 'reject', not '" + recovery + "'"));
            o.workers = workers;
            o.max_queue = max_queue;
            o.handler_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(handler_timeout * 1000));
            o.idempotency_window =
                std::chrono::milliseconds(static_cast<std::int64_t>(idempotency_window * 1000));
            if (!handler.is_none()) o.handler = make_handler(std::move(handler), std::move(loop));
            // Over a store that holds bookings the engine recovers first: without the GIL.
            std::optional<Error> failed;
            auto engine = nogil([&]() -> std::shared_ptr<BookingEngine> {
              try {
                return make_gil_safe<BookingEngine>(bus, std::move(o));
              } catch (const Exception& e) {
                failed = Error(errc::store_failed, e.what());
                return nullptr;
              }
            });
            if (failed) raise(*failed);
            std::lock_guard lock(live().mutex);
            live().engines.insert(engine);
            return engine;
          }),
          "bus"_a, "workers"_a = 2, "handler"_a = py::none(), "loop"_a = py::none(),
          "handler_timeout"_a = 10.0, "max_queue"_a = 65536, "idempotency_window"_a = 86400.0,
          "store"_a = nullptr, "recovery"_a = "requeue", "max_hold"_a = 900.0, "max_metadata_bytes"_a = 4096,
          "max_in_flight_per_user"_a = 1000, "max_held_units_per_user"_a = 0, "decide_on_caller"_a = true,
          py::keep_alive<1, 2>())
      .def(
          "add_resource",
          [](BookingEngine& e, const std::string& id, py::object capacity) {
            const auto n = count_arg(capacity, "capacity");
            take(nogil([&] { return e.add_resource(id, n); }));
          },
          "resource_id"_a, "capacity"_a)
      .def(
          "set_capacity",
          [](BookingEngine& e, const std::string& id, py::object capacity) {
            const auto n = count_arg(capacity, "capacity");
            take(nogil([&] { return e.set_capacity(id, n); }));
          },
          "resource_id"_a, "capacity"_a)
      .def(
          "availability",
          [](BookingEngine& e, const std::string& id) {
            return take(nogil([&] { return e.availability(id); }));
          },
          "resource_id"_a)
      .def(
          "submit",
          [](BookingEngine& e, const std::string& user, std::optional<std::string> resource,
             py::object quantity, py::object lines, std::optional<std::string> idempotency_key,
             py::object metadata, std::optional<double> hold) {
            auto r = make_request(user, std::move(resource), quantity, std::move(lines),
                                  std::move(idempotency_key), std::move(metadata), hold);
            result<Ack> a = [&] {
              py::gil_scoped_release release;
              return e.submit(std::move(r));
            }();
            return PyAck{take(std::move(a))};
          },
          "user"_a, "resource"_a = py::none(), "quantity"_a = 1, "lines"_a = py::none(),
          "idempotency_key"_a = py::none(), "metadata"_a = py::none(), "hold"_a = py::none(),
          "Validates and ACKs once the booking is stored (status 'processing'); the decision follows "
          "on booking/<id>. hold= seconds asks for a hold (two-phase booking).")
      .def(
          "submit_async",
          [](BookingEngine& e, const std::string& user, std::optional<std::string> resource,
             py::object quantity, py::object lines, std::optional<std::string> idempotency_key,
             py::object metadata, std::optional<double> hold) {
            auto r = make_request(user, std::move(resource), quantity, std::move(lines),
                                  std::move(idempotency_key), std::move(metadata), hold);
            auto future = std::make_shared<PyRef>(py::module_::import("concurrent.futures").attr("Future")());
            py::object returned = future->obj;
            nogil([&] {
              e.submit_async(std::move(r), [future](result<Ack> a) {
                // Resolved on a thread of the module's own, not the store's: the future's
                // done-callbacks run there and may call the engine, which waits for the store.
                futures_pool().post([future, a = std::move(a)]() mutable {
                  PythonCall call;
                  if (!call || finalizing.load()) return;
                  py::gil_scoped_acquire gil;
                  try {
                    if (a)
                      future->obj.attr("set_result")(PyAck{std::move(*a)});
                    else
                      future->obj.attr("set_exception")(error_object(a.error()));
                  } catch (py::error_already_set& err) {
                    log_callback_error(err, "submit_async");
                  }
                });
              });
            });
            return returned;
          },
          "user"_a, "resource"_a = py::none(), "quantity"_a = 1, "lines"_a = py::none(),
          "idempotency_key"_a = py::none(), "metadata"_a = py::none(), "hold"_a = py::none(),
          "submit() without waiting for the store: a concurrent.futures.Future of the Ack (or of the "
          "error). In asyncio: await asyncio.wrap_future(engine.submit_async(...)).")
      .def("get", booking_call([](BookingEngine& e, const std::string& id) { return e.get(id); }),
           "booking_id"_a, "The booking as stored now.")
      .def("cancel", booking_call([](BookingEngine& e, const std::string& id) { return e.cancel(id); }),
           "booking_id"_a, "confirmed -> cancelled, freeing its units.")
      .def("confirm", booking_call([](BookingEngine& e, const std::string& id) { return e.confirm(id); }),
           "booking_id"_a, "held -> confirmed.")
      .def("release", booking_call([](BookingEngine& e, const std::string& id) { return e.release(id); }),
           "booking_id"_a, "held -> released, freeing its units.")
      .def("shutdown", &BookingEngine::shutdown, py::call_guard<py::gil_scoped_release>(),
           "Stops taking bookings, rejects queued ones, waits for handlers in flight, joins the workers.")
      .def("__repr__",
           [](BookingEngine& e) {
             auto s = e.stats();
             return "<pushbook.BookingEngine resources=" + std::to_string(e.resources().size()) +
                    " accepted=" + std::to_string(s.accepted) + " in_flight=" + std::to_string(s.in_flight) +
                    ">";
           })
      .def_property_readonly("stats", [](BookingEngine& e) {
        auto s = e.stats();
        auto lat = [](const LatencySummary& l) {
          return py::dict("count"_a = l.count, "p50_us"_a = static_cast<double>(l.p50_ns) / 1e3,
                          "p99_us"_a = static_cast<double>(l.p99_ns) / 1e3,
                          "max_us"_a = static_cast<double>(l.max_ns) / 1e3);
        };
        return py::dict("accepted"_a = s.accepted, "confirmed"_a = s.confirmed, "rejected"_a = s.rejected,
                        "held"_a = s.held, "cancelled"_a = s.cancelled, "released"_a = s.released,
                        "expired"_a = s.expired, "idempotent_replays"_a = s.idempotent_replays,
                        "overloaded"_a = s.overloaded, "in_flight"_a = s.in_flight,
                        "queue_depth"_a = s.queue_depth, "quota_exceeded"_a = s.quota_exceeded,
                        "store_errors"_a = s.store_errors, "recovered"_a = s.recovered,
                        "publish_failures"_a = s.publish_failures, "publish_retries"_a = s.publish_retries,
                        "publish_backlog"_a = s.publish_backlog, "publish_dropped"_a = s.publish_dropped,
                        "relayed"_a = s.relayed, "ack_latency"_a = lat(s.ack_latency),
                        "decision_latency"_a = lat(s.decision_latency));
      });

  // A Python KeySet is mutable; the gateway gets a copy of it as it is (PushGateway(keys=),
  // set_keys()), so changing it afterwards never races a verification.
  py::class_<KeySet, std::shared_ptr<KeySet>>(
      m, "KeySet",
      "Token keys by kid: HS256 secrets, RS256 and ES256 public keys (PEM or JWKS). A token's kid "
      "picks its key and its alg must be the key's.")
      .def(py::init<>())
      .def_static(
          "from_jwks",
          [](const std::string& json) { return std::make_shared<KeySet>(take(KeySet::from_jwks(json))); },
          "json"_a, "The keys of a JWKS document (JSON text).")
      .def_static(
          "load_file",
          [](const std::string& path) { return std::make_shared<KeySet>(take(KeySet::load_file(path))); },
          "path"_a, "The keys of a JWKS file.")
      .def(
          "add_hs256",
          [](KeySet& k, const std::string& kid, const std::string& secret, bool sign) {
            take(k.add_hs256(kid, secret, sign));
          },
          "kid"_a, "secret"_a, "sign"_a = true,
          "Adds an HS256 secret (str or bytes); the one added last signs.")
      .def(
          "add_public_key_pem",
          [](KeySet& k, const std::string& kid, const std::string& pem) {
            take(k.add_public_key_pem(kid, pem));
          },
          "kid"_a, "pem"_a, "Adds an RSA (RS256) or EC P-256 (ES256) public key in PEM.")
      .def(
          "add_jwks", [](KeySet& k, const std::string& json) { take(k.add_jwks(json)); }, "json"_a,
          "Adds every key of a JWKS document, or none.")
      .def(
          "retire", [](KeySet& k, const std::string& kid) { take(k.retire(kid)); }, "kid"_a,
          "The key stops signing; it still verifies.")
      .def("remove", &KeySet::remove, "kid"_a, "Removes a key; False when it was not there.")
      .def("__len__", &KeySet::size)
      .def("__contains__", &KeySet::contains, "kid"_a)
      .def_property_readonly(
          "kids",
          [](const KeySet& k) {
            std::vector<std::string> kids;
            for (const auto& info : k.keys()) kids.push_back(info.kid);
            return kids;
          },
          "The key ids, in the order added ('' is the key for tokens without kid).")
      .def_property_readonly("signing_kid", &KeySet::signing_kid,
                             "The kid of the HS256 key sign_token signs with, or None.")
      .def(
          "sign_token",
          [](const KeySet& k, const std::string& subject, double ttl) {
            return take(sign_token(subject,
                                   std::chrono::system_clock::now() +
                                       std::chrono::milliseconds(static_cast<std::int64_t>(ttl * 1000)),
                                   k));
          },
          "subject"_a, "ttl"_a,
          "An HS256 token for `subject` signed with the signing key, valid for ttl seconds.")
      .def(
          "verify",
          [](const KeySet& k, const std::string& token) { return take(verify_token(token, k)).subject; },
          "token"_a, "The user (sub) of a token these keys verify; raises Unauthorized otherwise.")
      .def(
          "verify_claims",
          [](const KeySet& k, const std::string& token) {
            auto claims = take(verify_token(token, k));
            return py::make_tuple(
                claims.subject, std::chrono::duration<double>(claims.expires_at.time_since_epoch()).count());
          },
          "token"_a,
          "(user, expires_at as Unix seconds) of a token these keys verify; raises Unauthorized otherwise.")
      .def("__repr__",
           [](const KeySet& k) { return "<pushbook.KeySet of " + std::to_string(k.size()) + " keys>"; });

  py::class_<PushGateway, std::shared_ptr<PushGateway>>(m, "PushGateway",
                                                        "HTTP + WebSocket + SSE push server.")
      .def(py::init([](std::shared_ptr<EventBus> bus, std::shared_ptr<BookingEngine> engine, std::string host,
                       std::uint16_t port, std::optional<std::string> secret, bool dev_insecure,
                       std::size_t threads, std::vector<std::string> allowed_origins, std::string static_dir,
                       std::shared_ptr<KeySet> keys, double user_rate_limit, std::size_t user_rate_burst,
                       bool access_log, std::string node_name, std::string tls_cert, std::string tls_key,
                       bool tls_only, std::string tls_client_ca) {
             GatewayOptions o;
             o.node_name = std::move(node_name);
             o.tls.cert_file = std::move(tls_cert);
             o.tls.key_file = std::move(tls_key);
             o.tls.tls_only = tls_only;
             o.tls.client_ca_file = std::move(tls_client_ca);
             o.user_rate_limit_per_second = user_rate_limit;
             o.user_rate_limit_burst = user_rate_burst;
             o.access_log = access_log;
             o.host = std::move(host);
             o.port = port;
             if (secret) o.secret = *secret;
             if (keys) o.keys = std::make_shared<const KeySet>(*keys);
             o.dev_insecure = dev_insecure;
             o.threads = threads;
             o.allowed_origins = std::move(allowed_origins);
             o.static_dir = std::move(static_dir);
             o.log = python_log();
             std::shared_ptr<PushGateway> gw;
             try {
               gw = make_gil_safe<PushGateway>(bus, engine, std::move(o));
             } catch (const Exception& e) {
               raise(Error(e.code(), e.what()));
             }
             std::lock_guard lock(live().mutex);
             live().gateways.insert(gw);
             return gw;
           }),
           "bus"_a, "engine"_a, "host"_a = "127.0.0.1", "port"_a = 0, "secret"_a = py::none(),
           "dev_insecure"_a = false, "threads"_a = 1, "allowed_origins"_a = std::vector<std::string>{},
           "static_dir"_a = "", "keys"_a = nullptr, "user_rate_limit"_a = 20.0, "user_rate_burst"_a = 100,
           "access_log"_a = false, "node_name"_a = "", "tls_cert"_a = "", "tls_key"_a = "",
           "tls_only"_a = false, "tls_client_ca"_a = "", py::keep_alive<1, 2>(), py::keep_alive<1, 3>(),
           "tls_cert/tls_key (PEM files) turn TLS on: https, wss and SSE over TLS, on the same port as\n"
           "plain HTTP unless tls_only; tls_client_ca asks clients for a certificate it signed. A bad\n"
           "certificate, key or pair raises ValidationError.")
      .def(
          "start",
          [](PushGateway& g) {
            result<std::uint16_t> r = [&] {
              py::gil_scoped_release release;
              return g.listen();
            }();
            return take(std::move(r));
          },
          "Binds and starts serving; returns the port.")
      .def_property_readonly("port", &PushGateway::port)
      .def(
          "set_keys",
          [](PushGateway& g, const KeySet& keys) {
            auto copy = std::make_shared<const KeySet>(keys);
            result<void> r = [&] {
              py::gil_scoped_release release;
              return g.set_keys(std::move(copy));
            }();
            take(std::move(r));
          },
          "keys"_a,
          "Replaces the token keys (a copy of `keys`) while running: new connections and refreshes use them.")
      .def(
          "reload_tls",
          [](PushGateway& g) {
            result<void> r = [&] {
              py::gil_scoped_release release;
              return g.reload_tls();
            }();
            take(std::move(r));
          },
          "Reads tls_cert and tls_key again (a renewed certificate): new handshakes use them, open\n"
          "connections go on. Raises ValidationError (TLS off, or a bad file or pair; the certificate in "
          "use\n"
          "then stays).")
      .def_property_readonly("tls_enabled", &PushGateway::tls_enabled)
      .def("stop", &PushGateway::stop, py::call_guard<py::gil_scoped_release>(),
           "Graceful: WebSockets get 1001, then the threads are joined.")
      .def("metrics", &PushGateway::metrics_text, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("stats", [](PushGateway& g) {
        auto s = g.stats();
        return py::dict("websocket_connections"_a = s.websocket_connections,
                        "sse_connections"_a = s.sse_connections, "subscriptions"_a = s.subscriptions,
                        "messages_pushed"_a = s.messages_pushed, "bytes_pushed"_a = s.bytes_pushed,
                        "slow_consumer_disconnects"_a = s.slow_consumer_disconnects);
      });

  // --- ProtocolHost / ProtocolSession: the protocol in a Python web app (pushbook.protocol) ---
  py::class_<Waker, std::shared_ptr<Waker>>(
      m, "_Waker",
      "An eventfd the sessions of one host signal from any thread (no GIL needed) when they have\n"
      "output; the event loop reads it (loop.add_reader) and takes the ids of the sessions to poll.")
      .def(py::init<>())
      .def("fileno", &Waker::fileno)
      .def("take", &Waker::take, py::call_guard<py::gil_scoped_release>(),
           "Clears the eventfd and returns the ids of the sessions woken since the last take.")
      .def("close", &Waker::close);

  py::class_<ProtocolHost, std::shared_ptr<ProtocolHost>>(
      m, "_ProtocolHost", "What the protocol sessions of one web app share (pushbook.ProtocolHost wraps it).")
      .def(py::init([](std::shared_ptr<BookingEngine> engine, std::shared_ptr<EventBus> bus,
                       std::optional<std::string> secret, std::shared_ptr<KeySet> keys,
                       std::size_t max_message_bytes, std::size_t max_subscriptions, double rate_limit,
                       std::size_t rate_burst, std::size_t max_queued_bytes, const std::string& slow_consumer,
                       double token_refresh_grace, py::object authorize) {
             GatewayOptions o;
             if (secret) o.secret = *secret;
             if (keys) o.keys = std::make_shared<const KeySet>(*keys);
             o.max_message_bytes = max_message_bytes;
             o.max_subscriptions = max_subscriptions;
             o.rate_limit_per_second = rate_limit;
             o.rate_limit_burst = rate_burst;
             o.max_queued_bytes = max_queued_bytes;
             if (slow_consumer == "disconnect")
               o.slow_consumer = SlowConsumerPolicy::disconnect;
             else if (slow_consumer == "drop_with_gap")
               o.slow_consumer = SlowConsumerPolicy::drop_with_gap;
             else
               raise(Error(errc::bad_request, "slow_consumer is 'disconnect' or 'drop_with_gap', not '" +
                                                  slow_consumer.substr(0, 40) + "'"));
             if (!(token_refresh_grace >= 0) || token_refresh_grace > 86400.0 * 365)
               raise(Error(errc::bad_request, "token_refresh_grace is seconds, 0 or more"));
             o.token_refresh_grace =
                 std::chrono::milliseconds(static_cast<std::int64_t>(token_refresh_grace * 1000));
             if (!authorize.is_none()) {
               if (!PyCallable_Check(authorize.ptr()))
                 raise(Error(errc::bad_request, "authorize must be a callable (user, topic) -> bool"));
               // Called inside feed() (the GIL released): takes the GIL; an exception refuses.
               auto fn = std::shared_ptr<py::object>(new py::object(std::move(authorize)), [](py::object* p) {
                 if (finalizing.load()) return;  // the interpreter is gone: leak it
                 py::gil_scoped_acquire gil;
                 delete p;
               });
               o.authorize = [fn](std::string_view user, std::string_view topic) {
                 py::gil_scoped_acquire gil;
                 try {
                   return py::cast<bool>(
                       (*fn)(py::str(user.data(), user.size()), py::str(topic.data(), topic.size())));
                 } catch (py::error_already_set& e) {
                   e.discard_as_unraisable("pushbook ProtocolHost authorize");
                   return false;
                 } catch (const py::cast_error&) {
                   return false;
                 }
               };
             }
             return take(ProtocolHost::create(std::move(engine), std::move(bus), std::move(o)));
           }),
           "engine"_a, "bus"_a, "secret"_a = py::none(), "keys"_a = nullptr,
           "max_message_bytes"_a = 64 * 1024, "max_subscriptions"_a = 256, "rate_limit"_a = 100.0,
           "rate_burst"_a = 200, "max_queued_bytes"_a = 1024 * 1024, "slow_consumer"_a = "disconnect",
           "token_refresh_grace"_a = 30.0, "authorize"_a = py::none(), py::keep_alive<1, 2>(),
           py::keep_alive<1, 3>())
      .def("drain", &ProtocolHost::drain)
      .def("metrics", &ProtocolHost::metrics_text, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("sessions", &ProtocolHost::sessions);

  py::class_<ProtocolSession, std::shared_ptr<ProtocolSession>>(
      m, "_ProtocolSession", "One client's protocol state (pushbook.ProtocolSession wraps it).")
      .def(py::init([](std::shared_ptr<ProtocolHost> host, std::string user,
                       std::optional<double> token_expires, std::shared_ptr<Waker> waker, std::uint64_t id) {
             std::optional<std::chrono::system_clock::time_point> expires;
             if (token_expires) {
               if (!std::isfinite(*token_expires) || *token_expires < 0 || *token_expires > 1e11)
                 raise(Error(errc::bad_request, "token_expires is a Unix time in seconds"));
               expires = std::chrono::system_clock::time_point(
                   std::chrono::duration_cast<std::chrono::system_clock::duration>(
                       std::chrono::duration<double>(*token_expires)));
             }
             std::function<void()> wake;
             if (waker) wake = [waker, id] { waker->wake(id); };
             try {
               return make_gil_safe<ProtocolSession>(std::move(host), std::move(user), expires,
                                                     std::move(wake));
             } catch (const Exception& e) {
               raise(Error(e.code(), e.what()));
             }
           }),
           "host"_a, "user"_a, "token_expires"_a = py::none(), "waker"_a = nullptr, "id"_a = 0)
      .def_static(
          "events",
          [](std::shared_ptr<ProtocolHost> host, std::string user, const std::string& topic,
             std::optional<std::string> last_event_id, const std::string& since, const std::string& epoch,
             std::shared_ptr<Waker> waker, std::uint64_t id) {
            std::function<void()> wake;
            if (waker) wake = [waker, id] { waker->wake(id); };
            result<std::unique_ptr<ProtocolSession>> r = [&] {
              py::gil_scoped_release release;  // may read the store (who owns a booking topic)
              std::optional<std::string_view> last;
              if (last_event_id) last = *last_event_id;
              return ProtocolSession::events(std::move(host), std::move(user), topic, last, since, epoch,
                                             std::move(wake));
            }();
            auto session = take(std::move(r));
            return std::shared_ptr<ProtocolSession>(session.release(), &delete_without_gil<ProtocolSession>);
          },
          "host"_a, "user"_a, "topic"_a, "last_event_id"_a = py::none(), "since"_a = "", "epoch"_a = "",
          "waker"_a = nullptr, "id"_a = 0,
          "An SSE stream of one topic (GET /v1/events); raises ValidationError (bad topic or resume point)\n"
          "or Unauthorized (code 'forbidden': the user may not see the topic).")
      .def(
          "feed", [](ProtocolSession& s, const std::string& text) { s.feed(text); }, "text"_a,
          py::call_guard<py::gil_scoped_release>())
      .def(
          "feed_binary", [](ProtocolSession& s) { s.feed_binary(); },
          py::call_guard<py::gil_scoped_release>())
      .def(
          "poll",
          [](ProtocolSession& s, std::size_t max_frame) {
            ProtocolSession::Output out;
            {
              py::gil_scoped_release release;
              out = s.poll(ProtocolSession::clock::now(), max_frame);
            }
            py::object text = py::none(), close = py::none();
            if (!out.text.empty()) text = py::str(out.text);
            if (out.close) close = py::make_tuple(out.close->code, out.close->reason);
            return py::make_tuple(text, close);
          },
          "max_frame"_a = 256 * 1024,
          "(text or None, (code, reason) or None): the next frame to send and whether to close after it.")
      .def(
          "next_deadline",
          [](ProtocolSession& s) -> std::optional<double> {
            auto when = s.next_deadline();
            if (!when) return std::nullopt;
            return std::max(0.0,
                            std::chrono::duration<double>(*when - ProtocolSession::clock::now()).count());
          },
          "Seconds until poll() must run even without a wake (the token deadline), or None.")
      .def("close", &ProtocolSession::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", &ProtocolSession::closed)
      .def_property_readonly("user", &ProtocolSession::user)
      .def_property_readonly("subscriptions", &ProtocolSession::subscriptions);

  m.def(
      "sign_token",
      [](const std::string& subject, double ttl, const std::string& secret) {
        return sign_token(subject,
                          std::chrono::system_clock::now() +
                              std::chrono::milliseconds(static_cast<std::int64_t>(ttl * 1000)),
                          secret);
      },
      "subject"_a, "ttl"_a, "secret"_a,
      "An HS256 token for `subject`, valid for ttl seconds (tests, demos).");

  m.def("_shutdown_all", &shutdown_all, "Stops every live gateway and engine (called at interpreter exit).");
  py::module_::import("atexit").attr("register")(m.attr("_shutdown_all"));
}
