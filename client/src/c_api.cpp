// The C ABI over tutel::client. Every entry point catches everything: no exception crosses it.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "tutel/client.h"
#include "tutel/client.hpp"

namespace {

using tutel::Status;
using tutel::client::Client;
using tutel::client::ClientOptions;
using tutel::client::DeviceRegion;
using tutel::client::ForwardInfo;
using tutel::client::Layer;
using tutel::client::Ticket;

// Magic words catch a released or foreign pointer in the common cases (not all: it is C).
constexpr uint32_t kClientMagic = 0x494C4354;  // "TCLI"
constexpr uint32_t kLayerMagic = 0x594C4354;   // "TCLY"
constexpr uint32_t kRegionMagic = 0x524C4354;  // "TCLR"

thread_local std::string g_last_error;
thread_local int g_last_error_code = TUTEL_OK;

int fail(const Status& st) {
  g_last_error = st.to_string();
  g_last_error_code = -static_cast<int>(st.code());
  return g_last_error_code;
}

int fail_invalid(const std::string& message) { return fail(Status::InvalidArgument(message)); }

int to_code(const Status& st) { return st.ok() ? TUTEL_OK : fail(st); }

template <typename F>
int guarded(const char* fn, F&& body) noexcept {
  try {
    return body();
  } catch (const std::exception& e) {
    return fail(Status::Internal(std::string(fn) + ": " + e.what()));
  } catch (...) {
    return fail(Status::Internal(std::string(fn) + ": unknown exception"));
  }
}

}  // namespace

struct tutel_client {
  uint32_t magic = kClientMagic;
  std::optional<Client> client;
};

struct tutel_layer {
  uint32_t magic = kLayerMagic;
  std::optional<Layer> layer;
  std::mutex last_mutex;  // threads may share a handle
  ForwardInfo last;       // of the last forward / infer; guarded by last_mutex
};

struct tutel_region {
  uint32_t magic = kRegionMagic;
  std::optional<DeviceRegion> region;
};

namespace {

bool valid(const tutel_client* c) { return c != nullptr && c->magic == kClientMagic && c->client; }
bool valid(const tutel_layer* l) { return l != nullptr && l->magic == kLayerMagic && l->layer; }
bool valid(const tutel_region* r) { return r != nullptr && r->magic == kRegionMagic && r->region; }

int invalid_client(const char* fn) {
  return fail_invalid(std::string(fn) + ": the client is NULL or was closed");
}
int invalid_layer(const char* fn) {
  return fail_invalid(std::string(fn) + ": the layer is NULL or was released");
}

// A forward-shaped call (forward, infer, and their _device forms): the statistics are kept for
// tutel_forward_stats.
using ForwardCall = Status (Layer::*)(const float*, int64_t, float*, ForwardInfo*);
// `info`, when given, gets the statistics with the forward's sequence.
int call_forward(const char* fn, tutel_layer* layer, ForwardCall call, const float* x, int64_t tokens, float* y,
                 float* l_aux, tutel_forward_info* info_out = nullptr) {
  return guarded(fn, [&] {
    if (!valid(layer)) return invalid_layer(fn);
    if (info_out != nullptr) *info_out = tutel_forward_info{0.f, 0, 0, 0};  // on failure too
    ForwardInfo info;
    if (Status st = ((*layer->layer).*call)(x, tokens, y, &info); !st.ok()) return fail(st);
    {
      std::lock_guard lock(layer->last_mutex);
      layer->last = info;
    }
    if (l_aux != nullptr) *l_aux = info.l_aux;
    if (info_out != nullptr) *info_out = tutel_forward_info{info.l_aux, info.capacity, info.dropped, info.sequence};
    return TUTEL_OK;
  });
}

// The end of tutel_wait / tutel_wait_for: the statistics to `info` when given.
int waited(tutel::Result<ForwardInfo> got, tutel_forward_info* info) {
  if (info != nullptr) *info = tutel_forward_info{0.f, 0, 0, 0};  // on failure too
  if (!got.ok()) return fail(got.status());
  if (info != nullptr) *info = tutel_forward_info{got->l_aux, got->capacity, got->dropped, got->sequence};
  return TUTEL_OK;
}

int make_layer(tutel::Result<Layer> made, tutel_layer** out) {
  if (!made.ok()) return fail(made.status());
  auto* handle = new tutel_layer();
  handle->layer.emplace(std::move(made).value());
  *out = handle;
  return TUTEL_OK;
}

}  // namespace

extern "C" {

const char* tutel_last_error(void) { return g_last_error.c_str(); }

int tutel_last_error_code(void) { return g_last_error_code; }

tutel_client* tutel_connect(const char* socket_path) { return tutel_connect_with_options(socket_path, nullptr); }

tutel_client* tutel_connect_with_secret(const char* socket_path, const char* secret_file) {
  tutel_connect_options options{};
  options.struct_size = sizeof options;
  options.secret_file = secret_file;
  return tutel_connect_with_options(socket_path, &options);
}

tutel_client* tutel_connect_with_options(const char* socket_path, const tutel_connect_options* given) {
  tutel_client* out = nullptr;
  guarded("tutel_connect", [&] {
    if (socket_path == nullptr) return fail_invalid("tutel_connect: socket_path is NULL");
    // The fields this library knows of; a newer caller's struct is longer, and its fields past
    // ours are not read. Every caller has at least the first version's fields (the whole struct
    // today): a later version adds fields whose zero is their default, and accepts the sizes at
    // which an earlier version ended.
    constexpr size_t kFirstVersionSize = offsetof(tutel_connect_options, control_timeout_ms) + sizeof(int64_t);
    tutel_connect_options o{};
    if (given != nullptr) {
      if (given->struct_size < kFirstVersionSize)
        return fail_invalid("tutel_connect_with_options: options->struct_size is " +
                            std::to_string(given->struct_size) + "; set it to sizeof(tutel_connect_options)");
      std::memcpy(&o, given, std::min<size_t>(given->struct_size, sizeof o));
    }
    ClientOptions options;
    if (o.secret_file != nullptr) options.secret_file = o.secret_file;
    if (o.name != nullptr) options.name = o.name;
    options.request_timeout = std::chrono::milliseconds(o.request_timeout_ms);
    options.control_timeout = std::chrono::milliseconds(o.control_timeout_ms);
    auto client = Client::connect(socket_path, options);
    if (!client.ok()) return fail(client.status());
    out = new tutel_client();
    out->client.emplace(std::move(client).value());
    return TUTEL_OK;
  });
  return out;
}

void tutel_close(tutel_client* client) {
  if (client == nullptr || client->magic != kClientMagic) return;
  guarded("tutel_close", [&] {
    client->magic = 0;
    delete client;  // ~Client ends the session
    return TUTEL_OK;
  });
}

int tutel_ping(tutel_client* client) {
  return guarded("tutel_ping", [&] {
    if (!valid(client)) return invalid_client("tutel_ping");
    return to_code(client->client->ping());
  });
}

int tutel_client_info(tutel_client* client, const char** tenant, uint64_t* data_bytes) {
  return guarded("tutel_client_info", [&] {
    if (!valid(client)) return invalid_client("tutel_client_info");
    if (tenant != nullptr) *tenant = client->client->tenant().c_str();
    if (data_bytes != nullptr) *data_bytes = client->client->data_bytes();
    return TUTEL_OK;
  });
}

int tutel_layer_create(tutel_client* client, const char* spec_toml, tutel_layer** out) {
  return guarded("tutel_layer_create", [&] {
    if (out == nullptr) return fail_invalid("tutel_layer_create: out is NULL");
    *out = nullptr;
    if (!valid(client)) return invalid_client("tutel_layer_create");
    if (spec_toml == nullptr) return fail_invalid("tutel_layer_create: spec_toml is NULL");
    return make_layer(client->client->create_layer(spec_toml), out);
  });
}

int tutel_layer_attach(tutel_client* client, const char* name, tutel_layer** out) {
  return guarded("tutel_layer_attach", [&] {
    if (out == nullptr) return fail_invalid("tutel_layer_attach: out is NULL");
    *out = nullptr;
    if (!valid(client)) return invalid_client("tutel_layer_attach");
    if (name == nullptr) return fail_invalid("tutel_layer_attach: name is NULL");
    return make_layer(client->client->attach_layer(name), out);
  });
}

void tutel_layer_release(tutel_layer* layer) {
  if (layer == nullptr || layer->magic != kLayerMagic) return;
  guarded("tutel_layer_release", [&] {
    layer->magic = 0;
    delete layer;
    return TUTEL_OK;
  });
}

int tutel_layer_destroy(tutel_layer* layer) {
  return guarded("tutel_layer_destroy", [&] {
    if (!valid(layer)) return invalid_layer("tutel_layer_destroy");
    return to_code(layer->layer->destroy());
  });
}

int tutel_layer_dims(tutel_layer* layer, int64_t* model_dim, int64_t* output_dim,
                     int64_t* experts) {
  return guarded("tutel_layer_dims", [&] {
    if (!valid(layer)) return invalid_layer("tutel_layer_dims");
    const auto& info = layer->layer->info();
    if (model_dim != nullptr) *model_dim = info.model_dim;
    if (output_dim != nullptr) *output_dim = info.output_dim;
    if (experts != nullptr) *experts = info.experts;
    return TUTEL_OK;
  });
}

int tutel_layer_gate_noise(tutel_layer* layer, double* gate_noise) {
  return guarded("tutel_layer_gate_noise", [&] {
    if (!valid(layer)) return invalid_layer("tutel_layer_gate_noise");
    if (gate_noise == nullptr) return fail_invalid("tutel_layer_gate_noise: gate_noise is NULL");
    *gate_noise = layer->layer->info().gate_noise;
    return TUTEL_OK;
  });
}

const char* tutel_layer_name(tutel_layer* layer) {
  if (!valid(layer)) {
    (void)invalid_layer("tutel_layer_name");
    return nullptr;
  }
  return layer->layer->info().name.c_str();
}

const char* tutel_layer_kept_aside(tutel_layer* layer) {
  if (!valid(layer)) {
    (void)invalid_layer("tutel_layer_kept_aside");
    return nullptr;
  }
  return layer->layer->info().kept_aside.c_str();
}

int tutel_layer_rank(tutel_layer* layer, int* rank) {
  return guarded("tutel_layer_rank", [&] {
    if (!valid(layer)) return invalid_layer("tutel_layer_rank");
    if (rank == nullptr) return fail_invalid("tutel_layer_rank: rank is NULL");
    *rank = layer->layer->info().rank;
    return TUTEL_OK;
  });
}

int tutel_region_map(tutel_client* client, int rank, uint64_t bytes, tutel_region** out) {
  return guarded("tutel_region_map", [&] {
    if (out == nullptr) return fail_invalid("tutel_region_map: out is NULL");
    *out = nullptr;
    if (!valid(client)) return invalid_client("tutel_region_map");
    auto mapped = client->client->map_device_region(rank, bytes);
    if (!mapped.ok()) return fail(mapped.status());
    auto* handle = new tutel_region();
    handle->region.emplace(std::move(mapped).value());
    *out = handle;
    return TUTEL_OK;
  });
}

int tutel_region_info(tutel_region* region, void** data, uint64_t* bytes, const char** kind, const char** device) {
  return guarded("tutel_region_info", [&] {
    if (!valid(region)) return fail_invalid("tutel_region_info: the region is NULL or was unmapped");
    if (data != nullptr) *data = region->region->data();
    if (bytes != nullptr) *bytes = region->region->bytes();
    if (kind != nullptr) *kind = region->region->kind().c_str();
    if (device != nullptr) *device = region->region->device().c_str();
    return TUTEL_OK;
  });
}

int tutel_region_unmap(tutel_region* region) {
  if (region == nullptr || region->magic != kRegionMagic) return TUTEL_OK;
  return guarded("tutel_region_unmap", [&] {
    const Status st = region->region ? region->region->unmap() : Status::OK();
    // A wait that timed out changed nothing: the region is still mapped on both sides, and the
    // handle stays the caller's to unmap again (freed, it left the region mapped and charged
    // until the session ended, with no way to retry).
    if (st.code() == tutel::StatusCode::kTimeout && region->region->data() != nullptr) return to_code(st);
    region->magic = 0;
    delete region;
    return to_code(st);
  });
}

int tutel_forward_device(tutel_layer* layer, const float* x, int64_t tokens, float* y, float* l_aux) {
  return call_forward("tutel_forward_device", layer, &Layer::forward_device, x, tokens, y, l_aux);
}

int tutel_infer_device(tutel_layer* layer, const float* x, int64_t tokens, float* y, float* l_aux) {
  return call_forward("tutel_infer_device", layer, &Layer::infer_device, x, tokens, y, l_aux);
}

int tutel_forward_device_with_info(tutel_layer* layer, const float* x, int64_t tokens, float* y,
                                   tutel_forward_info* info) {
  return call_forward("tutel_forward_device_with_info", layer, &Layer::forward_device, x, tokens, y, nullptr, info);
}

namespace {

// A backward's flags as the C++ API's ParamGrads; nullopt for a bit the ABI does not define.
std::optional<Layer::ParamGrads> param_grads_of(uint32_t flags) {
  if ((flags & ~TUTEL_KEEP_PARAM_GRADS) != 0) return std::nullopt;
  return (flags & TUTEL_KEEP_PARAM_GRADS) != 0 ? Layer::ParamGrads::kKeep : Layer::ParamGrads::kAccumulate;
}

int unknown_flags(const char* name, uint32_t flags) {
  return fail_invalid(std::string(name) + ": unknown flags " + std::to_string(flags) +
                      " (TUTEL_KEEP_PARAM_GRADS is the only one)");
}

// The device backwards of the oldest forward, errors named after `name`; `tokens` for the checked one.
int backward_device_with(const char* name, tutel_layer* layer, std::optional<int64_t> tokens, const float* dy,
                         float dl_aux, float* dx, uint32_t flags) {
  return guarded(name, [&] {
    if (!valid(layer)) return invalid_layer(name);
    const std::optional<Layer::ParamGrads> param_grads = param_grads_of(flags);
    if (!param_grads) return unknown_flags(name, flags);
    return to_code(tokens ? layer->layer->backward_device_checked(*tokens, dy, dl_aux, dx, *param_grads)
                          : layer->layer->backward_device(dy, dl_aux, dx, *param_grads));
  });
}

}  // namespace

int tutel_backward_device(tutel_layer* layer, const float* dy, float dl_aux, float* dx) {
  return backward_device_with("tutel_backward_device", layer, std::nullopt, dy, dl_aux, dx, 0);
}

int tutel_backward_device_flags(tutel_layer* layer, const float* dy, float dl_aux, float* dx, uint32_t flags) {
  return backward_device_with("tutel_backward_device_flags", layer, std::nullopt, dy, dl_aux, dx, flags);
}

int tutel_backward_device_checked(tutel_layer* layer, int64_t tokens, const float* dy, float dl_aux, float* dx,
                                  uint32_t flags) {
  return backward_device_with("tutel_backward_device_checked", layer, tokens, dy, dl_aux, dx, flags);
}

int tutel_forward(tutel_layer* layer, const float* x, int64_t tokens, float* y, float* l_aux) {
  return call_forward("tutel_forward", layer, &Layer::forward, x, tokens, y, l_aux);
}

int tutel_forward_with_info(tutel_layer* layer, const float* x, int64_t tokens, float* y, tutel_forward_info* info) {
  return call_forward("tutel_forward_with_info", layer, &Layer::forward, x, tokens, y, nullptr, info);
}

int tutel_backward(tutel_layer* layer, const float* dy, float dl_aux, float* dx) {
  return guarded("tutel_backward", [&] {
    if (!valid(layer)) return invalid_layer("tutel_backward");
    return to_code(layer->layer->backward(dy, dl_aux, dx));
  });
}

int tutel_backward_checked(tutel_layer* layer, int64_t tokens, const float* dy, float dl_aux, float* dx) {
  return guarded("tutel_backward_checked", [&] {
    if (!valid(layer)) return invalid_layer("tutel_backward_checked");
    return to_code(layer->layer->backward_checked(tokens, dy, dl_aux, dx));
  });
}

int tutel_infer(tutel_layer* layer, const float* x, int64_t tokens, float* y, float* l_aux) {
  return call_forward("tutel_infer", layer, &Layer::infer, x, tokens, y, l_aux);
}

int tutel_forward_stats(tutel_layer* layer, int64_t* capacity, int64_t* dropped) {
  return guarded("tutel_forward_stats", [&] {
    if (!valid(layer)) return invalid_layer("tutel_forward_stats");
    std::lock_guard lock(layer->last_mutex);
    if (capacity != nullptr) *capacity = layer->last.capacity;
    if (dropped != nullptr) *dropped = layer->last.dropped;
    return TUTEL_OK;
  });
}

namespace {

// The submit-forward calls, errors named after `name`: `noise_key` for the keyed ones (which take
// no TUTEL_TRAINING_WITHOUT_NOISE), `device` for the zero-copy ones.
int submit_forward_with(const char* name, tutel_layer* layer, const float* x, int64_t tokens, float* y,
                        int training, std::optional<uint64_t> noise_key, bool device, tutel_ticket* ticket) {
  return guarded(name, [&] {
    if (!valid(layer)) return invalid_layer(name);
    if (ticket == nullptr) return fail_invalid(std::string(name) + ": ticket is NULL");
    *ticket = tutel_ticket{0, 0};  // on failure too: no stale ticket to wait for or abandon
    // As the backward's flags: an unknown value is refused, not read as a training forward.
    if (noise_key && training != 0 && training != 1)
      return fail_invalid(std::string(name) + ": training is " + std::to_string(training) +
                          "; give 0 (an inference drawing the noise) or 1 (training); a forward without "
                          "gate noise takes no key");
    if (training != 0 && training != 1 && training != TUTEL_TRAINING_WITHOUT_NOISE)
      return fail_invalid(std::string(name) + ": training is " + std::to_string(training) +
                          "; give 0 (inference), 1 (training) or TUTEL_TRAINING_WITHOUT_NOISE");
    const Layer::ForwardMode mode = training == TUTEL_TRAINING_WITHOUT_NOISE ? Layer::ForwardMode::kTrainingWithoutNoise
                                    : training != 0                          ? Layer::ForwardMode::kTraining
                                                                             : Layer::ForwardMode::kInference;
    Layer& l = *layer->layer;
    tutel::Result<Ticket> t =
        noise_key ? (device ? l.submit_forward_device(x, tokens, y, mode, Layer::NoiseKey{*noise_key})
                            : l.submit_forward(x, tokens, y, mode, Layer::NoiseKey{*noise_key}))
                  : (device ? l.submit_forward_device(x, tokens, y, mode) : l.submit_forward(x, tokens, y, mode));
    if (!t.ok()) return fail(t.status());
    *ticket = tutel_ticket{t->request_id, t->sequence};
    return TUTEL_OK;
  });
}

}  // namespace

int tutel_submit_forward(tutel_layer* layer, const float* x, int64_t tokens, float* y, int training,
                         tutel_ticket* ticket) {
  return submit_forward_with("tutel_submit_forward", layer, x, tokens, y, training, std::nullopt, false, ticket);
}

int tutel_submit_forward_keyed(tutel_layer* layer, const float* x, int64_t tokens, float* y, int training,
                               uint64_t noise_key, tutel_ticket* ticket) {
  return submit_forward_with("tutel_submit_forward_keyed", layer, x, tokens, y, training, noise_key, false, ticket);
}

int tutel_submit_forward_device(tutel_layer* layer, const float* x, int64_t tokens, float* y, int training,
                                tutel_ticket* ticket) {
  return submit_forward_with("tutel_submit_forward_device", layer, x, tokens, y, training, std::nullopt, true, ticket);
}

int tutel_submit_forward_device_keyed(tutel_layer* layer, const float* x, int64_t tokens, float* y, int training,
                                      uint64_t noise_key, tutel_ticket* ticket) {
  return submit_forward_with("tutel_submit_forward_device_keyed", layer, x, tokens, y, training, noise_key, true,
                             ticket);
}

namespace {

// tutel_submit_backward and tutel_submit_backward_flags, errors named after `name`.
int submit_backward_with(const char* name, tutel_layer* layer, uint64_t sequence, const float* dy, float dl_aux,
                         float* dx, uint32_t flags, bool device, tutel_ticket* ticket) {
  return guarded(name, [&] {
    if (!valid(layer)) return invalid_layer(name);
    if (ticket == nullptr) return fail_invalid(std::string(name) + ": ticket is NULL");
    *ticket = tutel_ticket{0, 0};  // on failure too: no stale ticket to wait for or abandon
    const std::optional<Layer::ParamGrads> param_grads = param_grads_of(flags);
    if (!param_grads) return unknown_flags(name, flags);
    auto t = device ? layer->layer->submit_backward_device(sequence, dy, dl_aux, dx, *param_grads)
                    : layer->layer->submit_backward(sequence, dy, dl_aux, dx, *param_grads);
    if (!t.ok()) return fail(t.status());
    *ticket = tutel_ticket{t->request_id, t->sequence};
    return TUTEL_OK;
  });
}

}  // namespace

int tutel_submit_backward(tutel_layer* layer, uint64_t sequence, const float* dy, float dl_aux,
                          float* dx, tutel_ticket* ticket) {
  return submit_backward_with("tutel_submit_backward", layer, sequence, dy, dl_aux, dx, 0, false, ticket);
}

int tutel_submit_backward_flags(tutel_layer* layer, uint64_t sequence, const float* dy, float dl_aux,
                                float* dx, uint32_t flags, tutel_ticket* ticket) {
  return submit_backward_with("tutel_submit_backward_flags", layer, sequence, dy, dl_aux, dx, flags, false, ticket);
}

int tutel_submit_backward_device(tutel_layer* layer, uint64_t sequence, const float* dy, float dl_aux, float* dx,
                                 uint32_t flags, tutel_ticket* ticket) {
  return submit_backward_with("tutel_submit_backward_device", layer, sequence, dy, dl_aux, dx, flags, true, ticket);
}

int tutel_wait(tutel_client* client, tutel_ticket ticket, tutel_forward_info* info) {
  return guarded("tutel_wait", [&] {
    if (!valid(client)) return invalid_client("tutel_wait");
    return waited(client->client->wait(Ticket{ticket.request_id, ticket.sequence}), info);
  });
}

int tutel_wait_for(tutel_client* client, tutel_ticket ticket, int64_t timeout_ms, tutel_forward_info* info) {
  return guarded("tutel_wait_for", [&] {
    if (!valid(client)) return invalid_client("tutel_wait_for");
    return waited(client->client->wait(Ticket{ticket.request_id, ticket.sequence},
                                       std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0))),
                  info);
  });
}

int tutel_abandon(tutel_client* client, tutel_ticket ticket) {
  return guarded("tutel_abandon", [&] {
    if (!valid(client)) return invalid_client("tutel_abandon");
    client->client->abandon(Ticket{ticket.request_id, ticket.sequence});
    return TUTEL_OK;
  });
}

int tutel_discard(tutel_layer* layer, uint64_t sequence) {
  return guarded("tutel_discard", [&] {
    if (!valid(layer)) return invalid_layer("tutel_discard");
    return to_code(layer->layer->discard(sequence));
  });
}

int tutel_step(tutel_layer* layer) {
  return guarded("tutel_step", [&] {
    if (!valid(layer)) return invalid_layer("tutel_step");
    return to_code(layer->layer->step().status());
  });
}

int tutel_step_with(tutel_layer* layer, double lr, double weight_decay, int64_t* step) {
  return guarded("tutel_step_with", [&] {
    if (!valid(layer)) return invalid_layer("tutel_step_with");
    if (std::isnan(lr) || std::isnan(weight_decay)) return fail_invalid("tutel_step_with: lr and weight_decay must not be NaN");
    tutel::client::Layer::StepOptions options;
    if (lr >= 0) options.lr = lr;
    if (weight_decay >= 0) options.weight_decay = weight_decay;
    tutel::Result<int64_t> got = layer->layer->step(options);
    if (got.ok() && step != nullptr) *step = *got;
    return to_code(got.status());
  });
}

int tutel_zero_grad(tutel_layer* layer) { return tutel_zero_grad_with(layer, 1); }

int tutel_zero_grad_with(tutel_layer* layer, int set_to_none) {
  return guarded("tutel_zero_grad", [&] {
    if (!valid(layer)) return invalid_layer("tutel_zero_grad");
    return to_code(layer->layer->zero_grad(set_to_none != 0));
  });
}

int tutel_grad_norm(tutel_layer* layer, double* norm) {
  return guarded("tutel_grad_norm", [&] {
    if (!valid(layer)) return invalid_layer("tutel_grad_norm");
    if (norm == nullptr) return fail_invalid("tutel_grad_norm: norm is NULL");
    tutel::Result<double> got = layer->layer->grad_norm();
    if (got.ok()) *norm = *got;
    return to_code(got.status());
  });
}

int tutel_scale_grads(tutel_layer* layer, double factor) {
  return guarded("tutel_scale_grads", [&] {
    if (!valid(layer)) return invalid_layer("tutel_scale_grads");
    return to_code(layer->layer->scale_grads(factor));
  });
}

int tutel_save(tutel_layer* layer, const char* path) {
  return guarded("tutel_save", [&] {
    if (!valid(layer)) return invalid_layer("tutel_save");
    if (path == nullptr) return fail_invalid("tutel_save: path is NULL");
    return to_code(layer->layer->save(path).status());
  });
}

int tutel_load(tutel_layer* layer, const char* path) {
  return guarded("tutel_load", [&] {
    if (!valid(layer)) return invalid_layer("tutel_load");
    if (path == nullptr) return fail_invalid("tutel_load: path is NULL");
    return to_code(layer->layer->load(path));
  });
}

int tutel_export_state(tutel_layer* layer, int* fd, uint64_t* bytes) {
  return guarded("tutel_export_state", [&] {
    if (!valid(layer)) return invalid_layer("tutel_export_state");
    if (fd == nullptr || bytes == nullptr) return fail_invalid("tutel_export_state: fd or bytes is NULL");
    // Set before anything can fail: a caller that closes *fd after a failure must not close a
    // descriptor of its own (or the library's socket) that happened to be there.
    *fd = -1;
    *bytes = 0;
    tutel::Result<tutel::client::ExportedState> state = layer->layer->export_state();
    if (!state.ok()) return to_code(state.status());
    const int dup = state->dup_fd();
    if (dup < 0)
      return to_code(tutel::Status::ResourceExhausted(std::string("tutel_export_state: cannot hand over the memfd: ") +
                                                      std::strerror(errno)));
    *fd = dup;
    *bytes = state->size();
    return TUTEL_OK;
  });
}

int tutel_import_state(tutel_layer* layer, int fd) {
  return guarded("tutel_import_state", [&] {
    if (!valid(layer)) return invalid_layer("tutel_import_state");
    if (fd < 0) return fail_invalid("tutel_import_state: fd is negative");
    return to_code(layer->layer->import_state(fd));
  });
}

}  // extern "C"
