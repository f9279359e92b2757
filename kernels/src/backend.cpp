#include "tutel/kernels/backend.hpp"

#include "cpu/cpu_backend.hpp"
#if defined(TUTEL_HAVE_CUDA)
#include "cuda/cuda_backend.hpp"
#endif

namespace tutel {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    owner_ = std::exchange(o.owner_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::reset() {
  if (owner_ && data_) owner_->release(data_, bytes_);
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

std::string_view activation_name(Activation a) {
  switch (a) {
    case Activation::kRelu: return "relu";
    case Activation::kGelu: return "gelu";
    case Activation::kSilu: return "silu";
  }
  return "?";
}

std::optional<Activation> parse_activation(std::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu" || name == "swish") return Activation::kSilu;
  return std::nullopt;
}

// The registry: the one place that knows which backends exist.
Result<std::unique_ptr<Backend>> make_backend(std::string_view name, const BackendOptions& options) {
  if (name == "cpu") return cpu::make_cpu_backend(options);
#if defined(TUTEL_HAVE_CUDA)
  if (name == "cuda") return cuda::make_cuda_backend(options);
#endif
  std::string known;
  for (const auto& b : available_backends()) known += (known.empty() ? "" : ", ") + b;
  return Status::InvalidArgument("unknown backend '" + std::string(name) + "'; this build has: " + known);
}

std::vector<std::string> available_backends() {
  std::vector<std::string> names{"cpu"};
#if defined(TUTEL_HAVE_CUDA)
  names.push_back("cuda");
#endif
  return names;
}

}  // namespace tutel
