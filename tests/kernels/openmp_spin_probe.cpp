// A program that bounds OpenMP's idle spin as tuteld does, then prints what it runs with:
// its pid, its arguments, one variable of the caller's, and libgomp's own account of its
// settings (omp_display_env). openmp_spin_test runs it under chosen environments.
#include <omp.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "tutel/kernels/openmp_spin.hpp"

int main(int argc, char** argv) {
  // As tuteld does: a process that cannot bound the spin says so and goes on.
  if (tutel::Status st = tutel::bound_openmp_spin(argv); !st.ok())
    std::printf("warning: %s\n", std::string(st.message()).c_str());
  std::printf("pid %d\n", static_cast<int>(::getpid()));
  char comm[32] = {};
  if (FILE* f = std::fopen("/proc/self/comm", "r")) {
    if (std::fgets(comm, sizeof comm, f) == nullptr) comm[0] = '\0';
    std::fclose(f);
  }
  std::printf("comm %s", comm);  // ends with its newline
  for (int i = 1; i < argc; ++i) std::printf("arg [%s]\n", argv[i]);
  const char* mark = std::getenv("TUTEL_PROBE_MARK");
  const char* spin = std::getenv("GOMP_SPINCOUNT");
  std::printf("mark [%s]\nenv GOMP_SPINCOUNT [%s]\n", mark ? mark : "(unset)", spin ? spin : "(unset)");
  std::fflush(stdout);
  omp_display_env(/*verbose=*/1);  // to stderr, which the test reads with stdout
  return 0;
}
