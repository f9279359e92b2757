#include "tutel/kernels/cuda_devices.hpp"

#if defined(TUTEL_HAVE_CUDA)
#include "cuda/cuda_backend.hpp"
#endif

namespace tutel {

int cuda_device_count() {
#if defined(TUTEL_HAVE_CUDA)
  return cuda::device_count();
#else
  return 0;
#endif
}

}  // namespace tutel
