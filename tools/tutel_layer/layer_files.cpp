#include "layer_files.hpp"

#include <algorithm>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <system_error>
#include <utility>

#include "tutel/core/safetensors.hpp"
#include "tutel/kernels/layer_file.hpp"

namespace tutel::tools {
namespace {

constexpr std::string_view kInputName = "x";
constexpr std::string_view kOutputGradName = "dy";
constexpr std::string_view kAuxGradName = "dl_aux";
// libgomp aborts the process when it cannot create the threads asked for; no machine this
// tool targets has more cores than this.
constexpr int kMaxThreads = 1024;
// Every name in a warning line is listed up to this count; a whole model's state dict would
// otherwise flood stderr.
constexpr size_t kMaxListedNames = 8;

std::string quoted(std::string_view s) {
  std::string out(1, '\'');  // appended: GCC 12's -Wrestrict misfires on "'" + ...
  out += s;
  out += '\'';
  return out;
}

std::string tensor_in(std::string_view name, std::string_view role, const std::string& path) {
  return "tensor " + quoted(name) + " in " + std::string(role) + " file " + quoted(path);
}

std::string shortest(double v) {
  char buf[32];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

std::string list_names(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < kMaxListedNames; ++i)
    out += (i ? ", " : "") + names[i];
  if (names.size() > kMaxListedNames)
    out += " (and " + std::to_string(names.size() - kMaxListedNames) + " more)";
  return out;
}

void warn_ignored(std::ostream& notes, std::string_view role, const std::string& path,
                  const std::vector<std::string>& ignored, std::string_view why) {
  if (ignored.empty()) return;
  notes << "tutel-layer: warning: ignoring " << ignored.size() << " tensor"
        << (ignored.size() == 1 ? "" : "s") << " in " << role << " file " << quoted(path) << " "
        << why << ": " << list_names(ignored) << "\n";
}

// Copies a tensor into f32 host memory (f64 rounded, bf16 and f16 exactly) and checks that
// every value is finite.
Result<HostTensor> read_f32(const SafetensorsTensor& t, std::string_view role,
                            const std::string& path) {
  const std::string where = tensor_in(t.name, role, path);
  HostTensor out{t.name, t.shape, {}};
  const size_t n = static_cast<size_t>(t.shape.numel());
  out.data.resize(n);
  const Status read = read_as_f32(t, out.data.data());
  if (!read.ok())
    return Status::InvalidArgument(std::string(read.message()) + " in " + std::string(role) + " file " +
                                   quoted(path));
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(out.data[i]))
      return Status::InvalidArgument(where + " holds " + shortest(out.data[i]) + " at element " +
                                     std::to_string(i) + "; every value must be finite");
  return out;
}

Status expect_layout(const SafetensorsTensor& t, int rank, std::string_view layout,
                     std::string_view role, const std::string& path) {
  if (t.shape.rank() != rank)
    return Status::InvalidArgument(tensor_in(t.name, role, path) + " has shape " +
                                   t.shape.to_string() + "; expected " + std::string(layout));
  for (int64_t d : t.shape)
    if (d < 1)
      return Status::InvalidArgument(tensor_in(t.name, role, path) + " has shape " +
                                     t.shape.to_string() + " (" + std::string(layout) +
                                     "); every dimension must be at least 1");
  return Status::OK();
}

// Dimension `ia` of `a` must equal dimension `ib` of `b`, the same quantity in both layouts.
Status same_dim(const SafetensorsTensor& a, int ia, const SafetensorsTensor& b, int ib,
                std::string_view quantity, const std::string& path) {
  if (a.shape[ia] == b.shape[ib]) return Status::OK();
  return Status::InvalidArgument("tensors " + quoted(a.name) + " " + a.shape.to_string() + " and " +
                                 quoted(b.name) + " " + b.shape.to_string() + " in weights file " +
                                 quoted(path) + " disagree on " + std::string(quantity) + " (" +
                                 std::to_string(a.shape[ia]) + " vs " +
                                 std::to_string(b.shape[ib]) + ")");
}

// Device memory for the run, released before the backend that owns it.
class DeviceTensors {
 public:
  explicit DeviceTensors(Backend& b) : backend_(b) {}

  Result<TensorView> zeros(const Shape& shape) {
    TUTEL_ASSIGN_OR_RETURN(DeviceBuffer buf,
                           backend_.allocate(std::max<size_t>(4, shape.numel() * 4)));
    TensorView view(buf.data(), DType::kF32, shape, backend_.device());
    buffers_.push_back(std::move(buf));
    TUTEL_RETURN_IF_ERROR(backend_.fill_zero(view));
    return view;
  }
  Result<TensorView> upload(const HostTensor& t) {
    TUTEL_ASSIGN_OR_RETURN(DeviceBuffer buf,
                           backend_.allocate(std::max<size_t>(4, t.data.size() * 4)));
    TensorView view(buf.data(), DType::kF32, t.shape, backend_.device());
    buffers_.push_back(std::move(buf));
    TUTEL_RETURN_IF_ERROR(
        backend_.copy(view.data(), t.data.data(), t.data.size() * 4, CopyKind::kHostToDevice));
    return view;
  }
  Result<HostTensor> download(std::string name, const TensorView& view) {
    HostTensor t{std::move(name), view.shape(), std::vector<float>(view.numel())};
    TUTEL_RETURN_IF_ERROR(
        backend_.copy(t.data.data(), view.data(), t.data.size() * 4, CopyKind::kDeviceToHost));
    return t;
  }

 private:
  Backend& backend_;
  std::vector<DeviceBuffer> buffers_;
};

Result<LayerWeights> upload_weights(DeviceTensors& dev, const LayerFileWeights& w) {
  LayerWeights out;
  TUTEL_ASSIGN_OR_RETURN(out.gate_weight, dev.upload(w.gate_weight));
  TUTEL_ASSIGN_OR_RETURN(out.experts.fc1_weight, dev.upload(w.fc1_weight));
  TUTEL_ASSIGN_OR_RETURN(out.experts.fc2_weight, dev.upload(w.fc2_weight));
  if (w.fc1_bias) {
    TUTEL_ASSIGN_OR_RETURN(out.experts.fc1_bias, dev.upload(*w.fc1_bias));
  }
  if (w.fc2_bias) {
    TUTEL_ASSIGN_OR_RETURN(out.experts.fc2_bias, dev.upload(*w.fc2_bias));
  }
  return out;
}

Result<LayerWeights> zero_grads(DeviceTensors& dev, const LayerFileWeights& w) {
  LayerWeights out;
  TUTEL_ASSIGN_OR_RETURN(out.gate_weight, dev.zeros(w.gate_weight.shape));
  TUTEL_ASSIGN_OR_RETURN(out.experts.fc1_weight, dev.zeros(w.fc1_weight.shape));
  TUTEL_ASSIGN_OR_RETURN(out.experts.fc2_weight, dev.zeros(w.fc2_weight.shape));
  if (w.fc1_bias) {
    TUTEL_ASSIGN_OR_RETURN(out.experts.fc1_bias, dev.zeros(w.fc1_bias->shape));
  }
  if (w.fc2_bias) {
    TUTEL_ASSIGN_OR_RETURN(out.experts.fc2_bias, dev.zeros(w.fc2_bias->shape));
  }
  return out;
}

}  // namespace

Result<LayerFileWeights> read_layer_weights(const std::string& path, std::ostream& notes) {
  auto opened = SafetensorsFile::open(path);
  if (!opened.ok()) return opened.status().with_context("reading the weights (--weights)");
  const SafetensorsFile& file = *opened;
  TUTEL_ASSIGN_OR_RETURN(std::string prefix, find_layer_prefix(file));
  auto named = [&](const char* name) { return file.find(prefix + name); };
  const SafetensorsTensor* wg = named(kGateWeightName);
  const SafetensorsTensor* fc1 = named(kFc1WeightName);
  const SafetensorsTensor* fc2 = named(kFc2WeightName);
  const SafetensorsTensor* b1 = named(kFc1BiasName);
  const SafetensorsTensor* b2 = named(kFc2BiasName);

  TUTEL_RETURN_IF_ERROR(expect_layout(*wg, 2, "[E, M]", "weights", path));
  TUTEL_RETURN_IF_ERROR(expect_layout(*fc1, 3, "[E, H, M]", "weights", path));
  TUTEL_RETURN_IF_ERROR(expect_layout(*fc2, 3, "[E, H, O]", "weights", path));
  TUTEL_RETURN_IF_ERROR(same_dim(*fc1, 0, *wg, 0, "the number of experts E", path));
  TUTEL_RETURN_IF_ERROR(same_dim(*fc1, 2, *wg, 1, "the model dimension M", path));
  TUTEL_RETURN_IF_ERROR(same_dim(*fc2, 0, *wg, 0, "the number of experts E", path));
  TUTEL_RETURN_IF_ERROR(same_dim(*fc2, 1, *fc1, 1, "the hidden size H", path));
  if (b1) {
    TUTEL_RETURN_IF_ERROR(expect_layout(*b1, 2, "[E, H]", "weights", path));
    TUTEL_RETURN_IF_ERROR(same_dim(*b1, 0, *wg, 0, "the number of experts E", path));
    TUTEL_RETURN_IF_ERROR(same_dim(*b1, 1, *fc1, 1, "the hidden size H", path));
  }
  if (b2) {
    TUTEL_RETURN_IF_ERROR(expect_layout(*b2, 2, "[E, O]", "weights", path));
    TUTEL_RETURN_IF_ERROR(same_dim(*b2, 0, *wg, 0, "the number of experts E", path));
    TUTEL_RETURN_IF_ERROR(same_dim(*b2, 1, *fc2, 2, "the output dimension O", path));
  }

  LayerFileWeights w;
  w.path = path;
  w.prefix = prefix;
  w.experts = wg->shape[0];
  w.model_dim = wg->shape[1];
  w.hidden = fc1->shape[1];
  w.output_dim = fc2->shape[2];
  TUTEL_ASSIGN_OR_RETURN(w.gate_weight, read_f32(*wg, "weights", path));
  TUTEL_ASSIGN_OR_RETURN(w.fc1_weight, read_f32(*fc1, "weights", path));
  TUTEL_ASSIGN_OR_RETURN(w.fc2_weight, read_f32(*fc2, "weights", path));
  if (b1) {
    TUTEL_ASSIGN_OR_RETURN(w.fc1_bias, read_f32(*b1, "weights", path));
  }
  if (b2) {
    TUTEL_ASSIGN_OR_RETURN(w.fc2_bias, read_f32(*b2, "weights", path));
  }

  if (!prefix.empty())
    notes << "tutel-layer: note: using the layer parameters under prefix " << quoted(prefix)
          << " in weights file " << quoted(path) << "\n";
  std::vector<std::string> ignored;
  for (const SafetensorsTensor& t : file.tensors())
    if (&t != wg && &t != fc1 && &t != fc2 && &t != b1 && &t != b2) ignored.push_back(t.name);
  warn_ignored(notes, "weights", path, ignored, "that are not parameters of the layer");
  return w;
}

Result<LayerFileInputs> read_layer_inputs(const std::string& path, const LayerFileWeights& weights,
                                          bool backward, std::ostream& notes) {
  auto opened = SafetensorsFile::open(path);
  if (!opened.ok()) return opened.status().with_context("reading the input (--input)");
  const SafetensorsFile& file = *opened;
  LayerFileInputs in;
  in.path = path;

  const SafetensorsTensor* x = file.find(kInputName);
  if (!x)
    return Status::NotFound("input file " + quoted(path) +
                            " has no tensor 'x' (the layer input, [S, " +
                            std::to_string(weights.model_dim) + "])");
  const std::string from_weights = " (M = " + std::to_string(weights.model_dim) + " from " +
                                   tensor_in(weights.gate_weight.name, "weights", weights.path) +
                                   ")";
  if (x->shape.rank() != 2 || x->shape[1] != weights.model_dim || x->shape[0] < 1)
    return Status::InvalidArgument(tensor_in(x->name, "input", path) + " has shape " +
                                   x->shape.to_string() + "; expected [S >= 1, " +
                                   std::to_string(weights.model_dim) + "]" + from_weights);
  TUTEL_ASSIGN_OR_RETURN(in.x, read_f32(*x, "input", path));
  const int64_t S = x->shape[0];

  std::vector<std::string> unused;
  const SafetensorsTensor* dy = file.find(kOutputGradName);
  const SafetensorsTensor* dl_aux = file.find(kAuxGradName);
  if (backward) {
    if (!dy)
      return Status::NotFound("input file " + quoted(path) +
                              " has no tensor 'dy' (the gradient of y, [" + std::to_string(S) +
                              ", " + std::to_string(weights.output_dim) +
                              "]), which --backward needs");
    if (!(dy->shape == Shape{S, weights.output_dim}))
      return Status::InvalidArgument(
          tensor_in(dy->name, "input", path) + " has shape " + dy->shape.to_string() +
          "; expected [" + std::to_string(S) + ", " + std::to_string(weights.output_dim) +
          "] (S from 'x', O from " + tensor_in(weights.fc2_weight.name, "weights", weights.path) +
          ")");
    TUTEL_ASSIGN_OR_RETURN(in.dy, read_f32(*dy, "input", path));
    if (dl_aux) {
      if (dl_aux->shape.rank() > 1 || dl_aux->shape.numel() != 1)
        return Status::InvalidArgument(tensor_in(dl_aux->name, "input", path) + " has shape " +
                                       dl_aux->shape.to_string() + "; expected [1] (or a scalar)");
      TUTEL_ASSIGN_OR_RETURN(HostTensor value, read_f32(*dl_aux, "input", path));
      in.dl_aux = value.data[0];
    }
  }
  for (const SafetensorsTensor& t : file.tensors())
    if (&t != x && (!backward || (&t != dy && &t != dl_aux))) unused.push_back(t.name);
  warn_ignored(notes, "input", path, unused,
               backward ? "other than x, dy and dl_aux"
                        : "other than x (dy and dl_aux are read with --backward)");
  return in;
}

Status validate_options(const LayerRunOptions& o) {
  if (o.k < 1)
    return Status::InvalidArgument("--k " + std::to_string(o.k) + ": k must be at least 1");
  if (!std::isfinite(o.capacity_factor))
    return Status::InvalidArgument(
        "--capacity-factor " + shortest(o.capacity_factor) +
        ": must be a finite number (> 0 fixed capacity, 0 dropless, < 0 dropless up to "
        "the limit -f)");
  if (!parse_activation(o.activation))
    return Status::InvalidArgument("--activation " + quoted(o.activation) +
                                   ": must be relu, gelu or silu");
  if (o.threads < 0 || o.threads > kMaxThreads)
    return Status::InvalidArgument("--threads " + std::to_string(o.threads) +
                                   ": must be between 0 (all cores) and " +
                                   std::to_string(kMaxThreads));
  return Status::OK();
}

Result<LayerSpec> layer_spec_for(const LayerFileWeights& w, const LayerRunOptions& o) {
  TUTEL_RETURN_IF_ERROR(validate_options(o));
  if (o.k > w.experts)
    return Status::InvalidArgument(
        "--k " + std::to_string(o.k) + " exceeds the number of experts E = " +
        std::to_string(w.experts) + " (" + tensor_in(w.gate_weight.name, "weights", w.path) +
        " has shape " + w.gate_weight.shape.to_string() + ")");
  LayerSpec spec;
  spec.experts = w.experts;
  spec.model_dim = w.model_dim;
  spec.hidden = w.hidden;
  spec.output_dim = w.output_dim;
  spec.k = o.k;
  spec.capacity_factor = o.capacity_factor;
  spec.activation = *parse_activation(o.activation);
  spec.normalize_gate = o.normalize_gate;
  spec.batch_prioritized = o.batch_prioritized;
  spec.has_fc1_bias = w.fc1_bias.has_value();
  spec.has_fc2_bias = w.fc2_bias.has_value();
  spec.gate_noise = 0.0;
  TUTEL_RETURN_IF_ERROR(spec.validate());
  return spec;
}

Result<LayerRunResult> run_layer(const LayerFileWeights& weights, const LayerFileInputs& inputs,
                                 const LayerRunOptions& options) {
  TUTEL_ASSIGN_OR_RETURN(const LayerSpec spec, layer_spec_for(weights, options));
  if (options.backward && !inputs.dy)
    return Status::InvalidArgument("input file " + quoted(inputs.path) +
                                   " has no tensor 'dy', which --backward needs");
  const int64_t S = inputs.x.shape[0];

  TUTEL_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                         make_backend(options.backend, {.threads = options.threads}));
  DeviceTensors dev(*backend);
  TUTEL_ASSIGN_OR_RETURN(const LayerWeights params, upload_weights(dev, weights));
  TUTEL_ASSIGN_OR_RETURN(const TensorView x, dev.upload(inputs.x));
  TUTEL_ASSIGN_OR_RETURN(const TensorView y, dev.zeros({S, spec.out_dim()}));

  LayerWorkspace ws;
  RoutingStats stats;
  TUTEL_RETURN_IF_ERROR(layer_forward(*backend, spec, params, x, /*noise_counter=*/0,
                                      options.backward, ws, y, &stats));
  LayerRunResult result;
  TUTEL_ASSIGN_OR_RETURN(result.y, dev.download("y", y));
  result.l_aux = stats.l_aux;
  result.capacity = stats.capacity;
  result.dropped = stats.dropped;
  if (!options.backward) return result;

  TUTEL_ASSIGN_OR_RETURN(const TensorView dy, dev.upload(*inputs.dy));
  TUTEL_ASSIGN_OR_RETURN(const TensorView dx, dev.zeros({S, spec.model_dim}));
  TUTEL_ASSIGN_OR_RETURN(const LayerWeights grads, zero_grads(dev, weights));
  TUTEL_RETURN_IF_ERROR(
      layer_backward(*backend, spec, params, x, ws, dy, inputs.dl_aux, dx, grads));
  TUTEL_ASSIGN_OR_RETURN(result.dx, dev.download("dx", dx));
  auto add_grad = [&](const HostTensor& param, const TensorView& grad) -> Status {
    TUTEL_ASSIGN_OR_RETURN(HostTensor g, dev.download("grad." + param.name, grad));
    result.grads.push_back(std::move(g));
    return Status::OK();
  };
  TUTEL_RETURN_IF_ERROR(add_grad(weights.gate_weight, grads.gate_weight));
  TUTEL_RETURN_IF_ERROR(add_grad(weights.fc1_weight, grads.experts.fc1_weight));
  if (weights.fc1_bias) TUTEL_RETURN_IF_ERROR(add_grad(*weights.fc1_bias, grads.experts.fc1_bias));
  TUTEL_RETURN_IF_ERROR(add_grad(weights.fc2_weight, grads.experts.fc2_weight));
  if (weights.fc2_bias) TUTEL_RETURN_IF_ERROR(add_grad(*weights.fc2_bias, grads.experts.fc2_bias));
  return result;
}

namespace {

// `path` as metadata, which safetensors holds as UTF-8: a byte that is not part of a well-formed
// UTF-8 sequence is written as \xNN (a file name may be any bytes, and one such name failed the
// whole run only when the output was written).
std::string utf8_text(const std::string& path) {
  std::string out;
  const auto* b = reinterpret_cast<const unsigned char*>(path.data());
  const size_t n = path.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = b[i];
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 && c >= 0xc2 ? 2 : (c >> 4) == 0xe ? 3
                                     : (c >> 3) == 0x1e && c <= 0xf4 ? 4 : 0;
    bool ok = len != 0 && i + len <= n;
    for (size_t k = 1; ok && k < len; ++k) ok = (b[i + k] & 0xc0) == 0x80;
    // No overlong forms, surrogates or code points past U+10FFFF (RFC 3629).
    if (ok && len >= 3) {
      const unsigned char d = b[i + 1];
      ok = !(c == 0xe0 && d < 0xa0) && !(c == 0xed && d >= 0xa0) && !(c == 0xf0 && d < 0x90) &&
           !(c == 0xf4 && d >= 0x90);
    }
    if (ok) {
      out.append(path, i, len);
      i += len;
    } else {
      char hex[5];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
      ++i;
    }
  }
  return out;
}

}  // namespace

std::map<std::string, std::string> output_metadata(const LayerFileWeights& weights,
                                                   const LayerFileInputs& inputs,
                                                   const LayerRunOptions& o) {
  auto flag = [](bool b) { return std::string(b ? "true" : "false"); };
  std::map<std::string, std::string> m{
      {"tool", "tutel-layer"},
      {"weights", utf8_text(weights.path)},
      {"input", utf8_text(inputs.path)},
      {"k", std::to_string(o.k)},
      {"capacity_factor", shortest(o.capacity_factor)},
      {"activation", std::string(activation_name(*parse_activation(o.activation)))},
      {"normalize_gate", flag(o.normalize_gate)},
      {"batch_prioritized", flag(o.batch_prioritized)},
      {"is_postscore", "true"},
      {"gate_noise", "0"},
      {"backward", flag(o.backward)},
      {"threads", std::to_string(o.threads)},
  };
  if (!weights.prefix.empty()) m["prefix"] = weights.prefix;
  if (o.backward) m["dl_aux"] = shortest(inputs.dl_aux);
  return m;
}

Status write_layer_outputs(const std::string& path, const LayerRunResult& r,
                           const std::map<std::string, std::string>& metadata) {
  // write_safetensors packs tensors in the order given: 8-byte ones first keep all aligned.
  std::vector<SafetensorsEntry> entries{
      {"capacity", DType::kI64, {1}, &r.capacity},
      {"dropped", DType::kI64, {1}, &r.dropped},
      {"y", DType::kF32, r.y.shape, r.y.data.data()},
      {"l_aux", DType::kF32, {1}, &r.l_aux},
  };
  if (r.dx) entries.push_back({"dx", DType::kF32, r.dx->shape, r.dx->data.data()});
  for (const HostTensor& g : r.grads)
    entries.push_back({g.name, DType::kF32, g.shape, g.data.data()});
  Status s = write_safetensors(path, entries, metadata);
  return s.ok() ? s : s.with_context("writing the output (--output)");
}

namespace {

// The output replaces the entry --output names (write_safetensors renames onto it): never the
// entry of one of the inputs, which a swapped or repeated path destroyed (the next run found no
// x in it). Compared as resolved paths, so another spelling (./x, d/../x) or a symbolic link to
// an input is caught; a hard link is another entry, whose replacement leaves the input as it was.
Status check_output_is_not_an_input(const LayerFilesRequest& request) {
  const auto resolved = [](const std::string& path) -> std::string {
    char buffer[PATH_MAX];
    return ::realpath(path.c_str(), buffer) != nullptr ? std::string(buffer) : std::string();
  };
  const std::string out = resolved(request.output_path);
  if (out.empty()) return Status::OK();  // nothing there yet: no input's
  for (const auto& [option, path] : {std::pair<const char*, const std::string&>{"--weights", request.weights_path},
                                     std::pair<const char*, const std::string&>{"--input", request.input_path}}) {
    if (resolved(path) == out)
      return Status::InvalidArgument("--output '" + request.output_path + "' names the file " + option + " reads ('" +
                                     path + "'), which writing it would replace; choose another output path");
  }
  return Status::OK();
}

}  // namespace

Status run_layer_files(const LayerFilesRequest& request, std::ostream& notes) {
  const LayerRunOptions& options = request.options;
  TUTEL_RETURN_IF_ERROR(validate_options(options));
  TUTEL_RETURN_IF_ERROR(check_output_is_not_an_input(request));
  TUTEL_ASSIGN_OR_RETURN(const LayerFileWeights weights,
                         read_layer_weights(request.weights_path, notes));
  // Checked before the input is read, so a bad --k is reported as such.
  TUTEL_RETURN_IF_ERROR(layer_spec_for(weights, options).status());
  TUTEL_ASSIGN_OR_RETURN(const LayerFileInputs inputs,
                         read_layer_inputs(request.input_path, weights, options.backward, notes));
  TUTEL_ASSIGN_OR_RETURN(const LayerRunResult result, run_layer(weights, inputs, options));
  // The inputs are finite (checked as read): a non-finite output is f32 overflow, a result no
  // one can use, and is refused rather than written as if it were one.
  auto finite = [](const std::string& name, const std::vector<float>& v) -> Status {
    const auto bad = std::count_if(v.begin(), v.end(), [](float f) { return !std::isfinite(f); });
    if (bad == 0) return Status::OK();
    std::string m = "the output ";  // appended: GCC 12's -Wrestrict misfires on a chain of +
    m += name;
    m += " has ";
    m += std::to_string(bad);
    m += " of ";
    m += std::to_string(v.size());
    m += " values that are not finite: the layer overflows f32 on these inputs and weights (scale them "
         "down); nothing was written";
    return Status::OutOfRange(std::move(m));
  };
  TUTEL_RETURN_IF_ERROR(finite("y", result.y.data));
  TUTEL_RETURN_IF_ERROR(finite("l_aux", {result.l_aux}));
  if (result.dx) TUTEL_RETURN_IF_ERROR(finite("dx", result.dx->data));
  for (const HostTensor& g : result.grads) TUTEL_RETURN_IF_ERROR(finite(g.name, g.data));
  return write_layer_outputs(request.output_path, result,
                             output_metadata(weights, inputs, options));
}

}  // namespace tutel::tools
