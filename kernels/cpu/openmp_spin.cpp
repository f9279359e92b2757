// tutel/kernels/openmp_spin.hpp says why; docs/decisions.md, "OpenMP's idle threads spin briefly",
// what was measured and what else was tried.
#include "tutel/kernels/openmp_spin.hpp"

#include <elf.h>
#include <link.h>
#include <sys/auxv.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>

namespace tutel {
namespace {

// Whether the main program names a dynamic loader (PT_INTERP): a dynamically linked one.
bool program_has_interpreter() {
  bool has = false;
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) -> int {
        for (ElfW(Half) i = 0; i < info->dlpi_phnum; ++i)
          if (info->dlpi_phdr[i].p_type == PT_INTERP) *static_cast<bool*>(out) = true;
        return 1;  // the first object is the main program
      },
      &has);
  return has;
}

bool same_file(const char* a, const char* b) {
  struct stat sa {}, sb {};
  return ::stat(a, &sa) == 0 && ::stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// Why executing /proc/self/exe would not run this program again with these arguments, or null.
const char* why_not_again() {
  // Started as `LOADER PROGRAM ARGS` (the system's loader, a copy, a bundled one): the kernel
  // ran the loader itself, so it has no interpreter's base (AT_BASE 0), and /proc/self/exe is
  // the loader, which would take the program's first argument for the program.
  if (program_has_interpreter() && ::getauxval(AT_BASE) == 0) return "it was started through a dynamic loader";
  // valgrind refuses a program executed by path from under it.
  if (const char* preload = std::getenv("LD_PRELOAD"); preload != nullptr && std::strstr(preload, "vgpreload") != nullptr)
    return "it runs under valgrind";
  return nullptr;
}

}  // namespace

Status bound_openmp_spin(char** argv) {
  // An operator's own choice stands, either of them (OMP_WAIT_POLICY=active or passive picks
  // libgomp's spin for its policy).
  if (std::getenv("GOMP_SPINCOUNT") != nullptr || std::getenv("OMP_WAIT_POLICY") != nullptr) return Status::OK();
  const std::string advice = std::string("idle OpenMP threads spin for libgomp's default, which slows every step on a "
                                         "busy machine: set GOMP_SPINCOUNT=") +
                             kOpenmpSpinCount + " in the environment to avoid this";
  if (const char* why = why_not_again(); why != nullptr)
    return Status::Unavailable(std::string("cannot execute itself again to bound OpenMP's spin: ") + why + "; " +
                               advice);
  // Set before the exec, so that the new image (and any process it starts) finds it and never
  // executes again. (A setter in the executable's .preinit_array would run before libgomp's
  // initialiser, but also before libc's, which then replaces the environment it changed.)
  if (::setenv("GOMP_SPINCOUNT", kOpenmpSpinCount, /*overwrite=*/0) != 0)
    return Status::Internal(std::string("cannot set GOMP_SPINCOUNT: ") + std::strerror(errno));
  // By the path it was started by, since the kernel names the process after the file executed
  // (through /proc/self/exe, `ps` and `pgrep tuteld` saw "exe"; through the file a symbolic link
  // names, the link's name was lost): AT_EXECFN, the path given to execve (a relative one holds
  // still: nothing has changed the working directory yet). Else the program's own path; else
  // /proc/self/exe (a binary replaced or deleted since it started).
  if (const auto* started_as = reinterpret_cast<const char*>(::getauxval(AT_EXECFN));
      started_as != nullptr && same_file(started_as, "/proc/self/exe"))
    ::execv(started_as, argv);
  char path[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", path, sizeof(path) - 1);
  if (n > 0) {
    path[n] = '\0';
    if (same_file(path, "/proc/self/exe")) ::execv(path, argv);
  }
  ::execv("/proc/self/exe", argv);
  const int err = errno;
  ::unsetenv("GOMP_SPINCOUNT");  // this process keeps libgomp's default: say so, not the other
  return Status::Unavailable(std::string("cannot execute /proc/self/exe to bound OpenMP's spin (") +
                             std::strerror(err) + "); " + advice);
}

}  // namespace tutel
