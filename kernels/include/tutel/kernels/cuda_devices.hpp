// How many CUDA devices this process can use: tests skip and tools pick a default backend on it.
// Thread-safety: safe from any thread.
#pragma once

namespace tutel {

// 0 in a build without CUDA, and where the driver is missing or reports no device; never fails.
int cuda_device_count();

}  // namespace tutel
