// Thread cancellation must unwind through catch-alls. glibc ends a thread with a "forced unwind"
// (pthread_exit, pthread_cancel; CPython does it to a thread that asks for the GIL while the
// interpreter finalizes). A `catch (...)` that swallows it aborts the process ("FATAL: exception
// not rethrown"), so every catch-all on a thread that runs host callbacks lets it through first:
//
//   try { callback(); } PUSHBOOK_RETHROW_FORCED_UNWIND catch (...) { /* the callback's fault */ }
#pragma once

#if defined(__GLIBCXX__)
#include <cxxabi.h>
#define PUSHBOOK_RETHROW_FORCED_UNWIND \
  catch (abi::__forced_unwind&) {      \
    throw;                             \
  }
#else
#define PUSHBOOK_RETHROW_FORCED_UNWIND
#endif
