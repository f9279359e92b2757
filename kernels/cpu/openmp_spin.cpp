// tutel/kernels/openmp_spin.hpp says why; docs/decisions.md, "OpenMP's idle threads spin briefly",
// what was measured and what else was tried.
#include "tutel/kernels/openmp_spin.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

namespace tutel {

Status bound_openmp_spin(char** argv) {
  // An operator's own choice stands, either of them (OMP_WAIT_POLICY=active or passive picks
  // libgomp's spin for its policy).
  if (std::getenv("GOMP_SPINCOUNT") != nullptr || std::getenv("OMP_WAIT_POLICY") != nullptr) return Status::OK();
  // Set before the exec, so that the new image (and any process it starts) finds it and never
  // executes again. (A setter in the executable's .preinit_array would run before libgomp's
  // initialiser, but also before libc's, which then replaces the environment it changed.)
  if (::setenv("GOMP_SPINCOUNT", kOpenmpSpinCount, /*overwrite=*/0) != 0)
    return Status::Internal(std::string("cannot set GOMP_SPINCOUNT: ") + std::strerror(errno));
  ::execv("/proc/self/exe", argv);
  const int err = errno;
  ::unsetenv("GOMP_SPINCOUNT");  // this process keeps libgomp's default: say so, not the other
  return Status::Unavailable(std::string("cannot execute /proc/self/exe to bound OpenMP's spin (") +
                             std::strerror(err) + "); idle OpenMP threads spin for libgomp's default, which " +
                             "slows every step on a busy machine: set GOMP_SPINCOUNT=" + kOpenmpSpinCount +
                             " in the environment to avoid this");
}

}  // namespace tutel
