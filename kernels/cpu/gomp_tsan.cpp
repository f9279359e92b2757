// Built only into ThreadSanitizer builds (tools/sanitize.sh thread; kernels/CMakeLists.txt).
//
// libgomp starts and joins a parallel region's team with futexes that ThreadSanitizer cannot
// see, so it knows nothing of the order between the thread that opens a region, the team's
// threads, and the same thread after the region ends: a buffer written before a region and read
// inside it, or written inside and read after it, reads as a race. Suppressing reports with a
// libgomp frame hid them only while that frame was still in TSan's history, and cost the suite
// twice its time.
//
// This wraps GCC's entry point for `#pragma omp parallel` (GOMP_parallel, the only one our
// objects call: `nm -u`) and tells TSan what libgomp guarantees: the opening thread's writes
// happen before every member's body (release on one address, acquire on it in each member), and
// every member's writes happen before the region returns (release on another address in each
// member, acquire on it after the join). Two addresses, so that races between the members of
// one region stay visible: with one, a member that starts after another has ended acquired that
// member's release, and a real race between them was reported about half the time (the
// review's probe: 10 of 20 runs; 20 of 20 with two).
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>

namespace {

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct Region {
  void (*body)(void*);
  void* data;
  char opened, joined;  // the two synchronisation addresses
};

void run_member(void* region_ptr) {
  auto* region = static_cast<Region*>(region_ptr);
  __tsan_acquire(&region->opened);
  region->body(region->data);
  __tsan_release(&region->joined);
}

GompParallel libgomp_parallel() {
  // Resolved once; libgomp is loaded before main (the kernels link it), so this cannot fail
  // short of a broken install.
  static const GompParallel real = [] {
    auto* found = reinterpret_cast<GompParallel>(::dlsym(RTLD_NEXT, "GOMP_parallel"));
    if (found == nullptr) {
      std::fprintf(stderr, "gomp_tsan: GOMP_parallel not found after this object: %s\n", ::dlerror());
      std::abort();
    }
    return found;
  }();
  return real;
}

}  // namespace

extern "C" void GOMP_parallel(void (*body)(void*), void* data, unsigned num_threads, unsigned flags) {
  Region region{body, data, 0, 0};
  __tsan_release(&region.opened);
  libgomp_parallel()(run_member, &region, num_threads, flags);
  __tsan_acquire(&region.joined);
}
