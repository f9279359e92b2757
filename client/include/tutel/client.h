/* libtutel_client, C ABI: the same sessions and layers as tutel/client.hpp, for any language.
 *
 * Every int-returning function returns 0 on success and a negative code otherwise: minus the
 * StatusCode (TUTEL_E_*), with a message for the calling thread in tutel_last_error(). A
 * function that returns a pointer returns NULL on failure; its code is tutel_last_error_code().
 * Nothing is thrown across this boundary. Pointers of the wrong kind or NULL give
 * TUTEL_E_INVALID_ARGUMENT.
 *
 * Buffers are float32, row-major: x [tokens, model_dim], y [tokens, output_dim], dy [tokens,
 * output_dim], dx [tokens, model_dim]. One request's input plus output must fit in the session's
 * shared-memory data region (tutel_data_bytes; raise server.arena_bytes in tuteld.toml for more).
 * tokens may be 0 (an empty batch; its buffers may be NULL except in the _device calls); on an
 * expert-parallel layer a rank with an empty batch calls all the same, as its peers do.
 *
 * Thread-safety: threads may share a tutel_client and its layers; their calls take turns (a
 * call that waits holds the others until it returns). For requests that overlap, use one client
 * per thread. tutel_last_error() and tutel_last_error_code() are per thread.
 *
 * Lifetime: tutel_close ends the session (layers made from it then fail with
 * TUTEL_E_UNAVAILABLE) and frees the client; each layer handle is freed with
 * tutel_layer_release, in any order. Releasing a handle does not destroy the layer in the
 * daemon (tutel_layer_destroy does): layers belong to the tenant and can be attached again.
 * As with free(), a client or handle must not be used once closed or released, and
 * tutel_close / tutel_layer_release must not overlap another call on the same object (the C++
 * Client::close may: the other thread's calls then fail with Unavailable).
 *
 * fork(): a client cannot be used in a child forked after it connected (every call there fails
 * with TUTEL_E_UNAVAILABLE; tutel_close there frees only the child's copies). tutel_close in
 * the process that connected ends the session at once, even while such a child lives.
 */
#ifndef TUTEL_CLIENT_H_
#define TUTEL_CLIENT_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TUTEL_OK 0
#define TUTEL_E_INVALID_ARGUMENT (-1)
#define TUTEL_E_NOT_FOUND (-2)
#define TUTEL_E_ALREADY_EXISTS (-3)
#define TUTEL_E_OUT_OF_RANGE (-4)
#define TUTEL_E_CORRUPTION (-5)
#define TUTEL_E_IO_ERROR (-6)
#define TUTEL_E_UNAVAILABLE (-7)
#define TUTEL_E_PERMISSION_DENIED (-8)
#define TUTEL_E_RESOURCE_EXHAUSTED (-9)
#define TUTEL_E_UNIMPLEMENTED (-10)
#define TUTEL_E_INTERNAL (-11)
#define TUTEL_E_TIMEOUT (-12)
#define TUTEL_E_ABORTED (-13)

typedef struct tutel_client tutel_client;
typedef struct tutel_layer tutel_layer;
typedef struct tutel_region tutel_region;

/* An asynchronous request in flight (tutel_submit_forward / tutel_submit_backward). It is its
 * client's: tutel_wait on another client refuses it (TUTEL_E_INVALID_ARGUMENT), tutel_abandon
 * on another client does nothing. */
typedef struct tutel_ticket {
  uint64_t request_id;
  uint64_t sequence; /* of a training forward: pass it to tutel_submit_backward */
} tutel_ticket;

/* The routing statistics of one forward. */
typedef struct tutel_forward_info {
  float l_aux;
  int64_t capacity;
  int64_t dropped;
  uint64_t sequence;
} tutel_forward_info;

/* The message of the last failed call on this thread ("" when none failed yet). Valid until
 * the next failing call on this thread. */
const char* tutel_last_error(void);
/* The code (TUTEL_E_*) of the last failed call on this thread, 0 when none failed yet: why
 * tutel_connect returned NULL, for instance. Like tutel_last_error, a successful call leaves it. */
int tutel_last_error_code(void);

/* Connects to tuteld's client socket; NULL on failure (see tutel_last_error_code and
 * tutel_last_error: TUTEL_E_UNAVAILABLE when no daemon answers, TUTEL_E_PERMISSION_DENIED when
 * it maps this process's uid to no tenant, or its tenant requires a secret this process did not
 * give). The tenant's secret, if any, is read from the file TUTEL_SECRET_FILE names. */
tutel_client* tutel_connect(const char* socket_path);
/* tutel_connect for a tenant with a secret (docs/config.md): secret_file names the file holding
 * it, sent in the hello. NULL or "": TUTEL_SECRET_FILE from the environment, if set (as
 * tutel_connect does); neither: no secret. */
tutel_client* tutel_connect_with_secret(const char* socket_path, const char* secret_file);
/* Options of tutel_connect_with_options. Zero-initialise it and set struct_size to
 * sizeof(tutel_connect_options): a later library reads only the fields this header has (those
 * it adds keep their defaults), and this library ignores fields a later header adds. */
typedef struct tutel_connect_options {
  uint32_t struct_size;
  /* As tutel_connect_with_secret's secret_file (NULL or "": TUTEL_SECRET_FILE, if set). */
  const char* secret_file;
  /* Reported to the daemon (its logs name the session by it); NULL or "": the program's name. */
  const char* name;
  /* Bound, in milliseconds, on each wait for a completion: in the synchronous calls
   * (tutel_forward, ...), in tutel_wait, and in a submit that waits for room in the rings or the
   * data region; 0 or negative: none (a daemon that exits is still noticed within about 200 ms).
   * A synchronous call that times out abandons its request. */
  int64_t request_timeout_ms;
  /* Bound on waiting for a control reply (create, step, save, ...); 0 or negative: none. A
   * control call that times out closes the session (the stream may hold half a reply). */
  int64_t control_timeout_ms;
} tutel_connect_options;

/* tutel_connect with options; options may be NULL (the defaults, as tutel_connect). */
tutel_client* tutel_connect_with_options(const char* socket_path, const tutel_connect_options* options);
/* Ends the session and frees the client. NULL is ignored. */
void tutel_close(tutel_client* client);
/* One empty round trip through the shared-memory rings. */
int tutel_ping(tutel_client* client);
/* The tenant name and the size of the data region (either out pointer may be NULL). */
int tutel_client_info(tutel_client* client, const char** tenant, uint64_t* data_bytes);

/* Creates a layer from a TOML layer spec (docs/config.md); *out must be released. */
int tutel_layer_create(tutel_client* client, const char* spec_toml, tutel_layer** out);
/* Attaches to a layer of this client's tenant by name; *out must be released. */
int tutel_layer_attach(tutel_client* client, const char* name, tutel_layer** out);
/* Frees the handle (the layer stays in the daemon). NULL is ignored. */
void tutel_layer_release(tutel_layer* layer);
/* Destroys the layer in the daemon; the handle must still be released. */
int tutel_layer_destroy(tutel_layer* layer);
/* Any out pointer may be NULL. */
int tutel_layer_dims(tutel_layer* layer, int64_t* model_dim, int64_t* output_dim, int64_t* experts);
/* The layer's name in its tenant; the string belongs to the handle (valid until it is
 * released). NULL for an invalid handle. */
const char* tutel_layer_name(tutel_layer* layer);
/* Where a creation moved an earlier layer's checkpoint of this name aside instead of replacing
 * it (a file among the tenant's checkpoints, for tutel_load), or "" where it moved none (and on
 * attached handles). The string belongs to the handle. NULL for an invalid handle. */
const char* tutel_layer_kept_aside(tutel_layer* layer);
/* The layer spec's gate_noise (> 0: its training forwards draw gate noise; 0 also from a
 * daemon that does not report it). */
int tutel_layer_gate_noise(tutel_layer* layer, double* gate_noise);

/* Training forward under a new sequence; l_aux may be NULL. */
int tutel_forward(tutel_layer* layer, const float* x, int64_t tokens, float* y, float* l_aux);
/* tutel_forward that gives the forward's statistics and its sequence (info may be NULL): pass
 * info->sequence to tutel_submit_backward to backward it in any order (autograd's reverse
 * order, threads sharing a handle), where tutel_backward takes the oldest forward. */
int tutel_forward_with_info(tutel_layer* layer, const float* x, int64_t tokens, float* y, tutel_forward_info* info);
/* Backward of the oldest training forward not yet backwarded on this handle; dl_aux is
 * d(total loss)/d(l_aux). Accumulates the gradients in the daemon. Refused (InvalidArgument, the
 * forward dropped) when the parameters changed since its forward (a step, load or import).
 * Threads sharing a handle, or backwards in another order than their forwards, pass each
 * forward's sequence instead (tutel_forward_with_info, tutel_submit_backward). A backward that
 * times out (TUTEL_E_TIMEOUT) has consumed its forward, and the daemon still runs it (its
 * gradients accumulate; dx is not written): do not call it again for that forward, as a retry
 * would take the next one. The same holds for every backward call. */
int tutel_backward(tutel_layer* layer, const float* dy, float dl_aux, float* dx);
/* tutel_backward where dy and dx hold `tokens` rows: refused (TUTEL_E_INVALID_ARGUMENT, nothing
 * sent, the forward still waiting) when the oldest training forward had another count.
 * tutel_backward reads and writes that forward's rows whatever the buffers hold: backwards in
 * another order than their forwards (autograd's reverse order) overran the caller's buffers. */
int tutel_backward_checked(tutel_layer* layer, int64_t tokens, const float* dy, float dl_aux, float* dx);
/* Forward that keeps nothing for backward; l_aux may be NULL. */
int tutel_infer(tutel_layer* layer, const float* x, int64_t tokens, float* y, float* l_aux);
/* Capacity and dropped assignments of the synchronous forward or inference (any of the calls
 * above and their _device forms) that returned last on this handle; not of submitted ones (their
 * tutel_wait gives them). Either pointer may be NULL. */
int tutel_forward_stats(tutel_layer* layer, int64_t* capacity, int64_t* dropped);

/* Asynchronous forms: the buffers must stay valid until tutel_wait returns for the ticket.
 * training: 0 an inference, 1 a training forward, TUTEL_TRAINING_WITHOUT_NOISE a training
 * forward routed as an inference is, without gate noise (a module in eval mode whose input needs
 * a gradient; refused on a layer with gate_noise > 0). */
#define TUTEL_TRAINING_WITHOUT_NOISE 2
int tutel_submit_forward(tutel_layer* layer, const float* x, int64_t tokens, float* y, int training,
                         tutel_ticket* ticket);
/* tutel_submit_forward whose gate noise is drawn from noise_key (with the spec's noise_seed),
 * not from the daemon's (step, sequence) key: a forward run again with its key draws the same
 * noise (a trainer's recomputation, reentrant checkpointing; the key from its generator).
 * training: 1 a training forward; 0 an inference routed as a training forward is, the noise
 * drawn and nothing kept for a backward (train mode under no_grad). TUTEL_TRAINING_WITHOUT_NOISE
 * takes no key (TUTEL_E_INVALID_ARGUMENT). */
int tutel_submit_forward_keyed(tutel_layer* layer, const float* x, int64_t tokens, float* y, int training,
                               uint64_t noise_key, tutel_ticket* ticket);
/* Backward of the training forward `sequence` (its ticket's), in any order: the forward is
 * consumed once this call succeeds, whatever its completion says. Every submit sets *ticket, to
 * zeros when it fails. */
int tutel_submit_backward(tutel_layer* layer, uint64_t sequence, const float* dy, float dl_aux,
                          float* dx, tutel_ticket* ticket);
/* tutel_submit_backward with flags: TUTEL_KEEP_PARAM_GRADS computes dx alone and leaves the
 * parameter gradients as they were (the gradient of the input alone; a frozen module). On an
 * expert-parallel layer every rank must pass it alike, or every rank's backward is refused
 * (TUTEL_E_INVALID_ARGUMENT) and its forward consumed. */
#define TUTEL_KEEP_PARAM_GRADS 1u
int tutel_submit_backward_flags(tutel_layer* layer, uint64_t sequence, const float* dy, float dl_aux,
                                float* dx, uint32_t flags, tutel_ticket* ticket);
/* info may be NULL; it is set to zeros when the request failed. A ticket already waited for or
 * abandoned is refused at once (TUTEL_E_INVALID_ARGUMENT). */
int tutel_wait(tutel_client* client, tutel_ticket ticket, tutel_forward_info* info);
/* tutel_wait for at most timeout_ms milliseconds (0: only a request already complete), instead of
 * the request timeout. TUTEL_E_TIMEOUT leaves the request in flight: wait again, or abandon it.
 * Waiting in slices keeps a program responsive to signals (the Python module does). */
int tutel_wait_for(tutel_client* client, tutel_ticket ticket, int64_t timeout_ms, tutel_forward_info* info);
/* Gives up on a request whose buffers are about to be freed (its caller was interrupted): from
 * now on the library writes nothing into its output, its result is dropped, and a training
 * forward no longer waits for its backward (the library discards it in the daemon). A request in
 * a device region still reads and writes the region until the daemon has run it. An abandoned
 * backward still runs in the daemon (its gradients accumulate) and its forward stays consumed.
 * Unknown or finished tickets are ignored. */
int tutel_abandon(tutel_client* client, tutel_ticket ticket);

/* Drops the training forward `sequence` that will never be backwarded (a skipped backward, an
 * abandoned wait), with the memory the daemon holds for it until then; one that is not pending
 * is no error. On an expert-parallel layer it is this rank's alone (no collective). */
int tutel_discard(tutel_layer* layer, uint64_t sequence);

/* Applies the optimizer to the gradients accumulated since tutel_zero_grad. A layer with none (no
 * backward since its creation or since a zero_grad that set them to none, or only backwards
 * for dx alone) is left as it is, its step count included, as torch's optimizers skip a
 * parameter whose .grad is None. On an expert-parallel layer a collective: every rank steps
 * alike (the same settings, after the same backwards). */
int tutel_step(tutel_layer* layer);
/* tutel_step with this step's learning rate and weight decay in place of the spec's (a
 * schedule): finite and >= 0; a negative value keeps the spec's. *step (may be NULL) gets the
 * step count after it. */
int tutel_step_with(tutel_layer* layer, double lr, double weight_decay, int64_t* step);
/* Zeroes the gradients and sets them to none (torch's default): a step before the next backward
 * changes nothing. */
int tutel_zero_grad(tutel_layer* layer);
/* set_to_none = 0: gradients that are there become zeros that a step applies (weight decay,
 * momentum); absent ones stay absent, as after torch's zero_grad(set_to_none=False). */
int tutel_zero_grad_with(tutel_layer* layer, int set_to_none);
/* The L2 norm of the accumulated gradients into *norm (+inf or NaN where one is not finite). On
 * an expert-parallel layer the whole layer's, the same on every rank: a collective, every rank
 * calls it in the same order as its steps. */
int tutel_grad_norm(tutel_layer* layer, double* norm);
/* Multiplies the accumulated gradients by `factor` (finite, within float): clipping, unscaling.
 * On an expert-parallel layer every rank must pass the same factor. */
int tutel_scale_grads(tutel_layer* layer, double factor);
/* path: a relative name inside the tenant's checkpoint directory on the daemon's side
 * (server.state_dir/<tenant>/checkpoints/); absolute paths and ".." are refused. */
int tutel_save(tutel_layer* layer, const char* path);
int tutel_load(tutel_layer* layer, const char* path);
/* The layer's state as tutel_save writes it (parameters, optimizer state, step, spec), into this
 * process's memory instead of the daemon's checkpoint directory: *fd is a new memfd (close it)
 * whose first *bytes bytes are the safetensors file. On an expert-parallel layer, this rank's. */
int tutel_export_state(tutel_layer* layer, int* fd, uint64_t* bytes);
/* Replaces the layer's state with the safetensors file `fd` holds (a memfd, or another regular
 * file, which the library copies into one first; read from its start; fd stays the caller's), as
 * tutel_load reads one. A refused file changes nothing. */
int tutel_import_state(tutel_layer* layer, int fd);

/* Zero-copy submission (docs/protocol.md section 7). A device region is memory on one of the
 * daemon's ranks that this process maps too: on a GPU daemon, GPU memory (data is a device
 * pointer here, on the GPU whose PCI bus id is `device`); on a CPU daemon, shared host memory.
 * The *_device calls take x and y (dy and dx) inside one region mapped on the layer's rank
 * (tutel_layer_rank) and copy nothing. On a GPU, x must be complete on the device when the call
 * is made (synchronise the stream that wrote it); y is complete when a synchronous call returns
 * (a submitted one's when its tutel_wait does). A region
 * counts against the tenant's max_memory_bytes; at most 16 per client. */
int tutel_layer_rank(tutel_layer* layer, int* rank);
/* bytes: a positive multiple of 4. *out must be unmapped with tutel_region_unmap. */
int tutel_region_map(tutel_client* client, int rank, uint64_t bytes, tutel_region** out);
/* Any out pointer may be NULL; the strings live as long as the region. */
int tutel_region_info(tutel_region* region, void** data, uint64_t* bytes, const char** kind, const char** device);
/* Waits for the client's requests in flight, unmaps the region here and in the daemon, and frees
 * the handle (also when the unmap reports an error), except on TUTEL_E_TIMEOUT: the wait ran out,
 * nothing changed, and the handle stays valid: call it again. NULL is ignored. Call it before
 * tutel_close. */
int tutel_region_unmap(tutel_region* region);
int tutel_forward_device(tutel_layer* layer, const float* x, int64_t tokens, float* y, float* l_aux);
/* tutel_forward_device that gives the statistics and the sequence, as tutel_forward_with_info. */
int tutel_forward_device_with_info(tutel_layer* layer, const float* x, int64_t tokens, float* y,
                                   tutel_forward_info* info);
int tutel_infer_device(tutel_layer* layer, const float* x, int64_t tokens, float* y, float* l_aux);
/* Backward of the oldest training forward not yet backwarded on this handle. */
int tutel_backward_device(tutel_layer* layer, const float* dy, float dl_aux, float* dx);
/* The same with flags (TUTEL_KEEP_PARAM_GRADS: dx alone, see tutel_submit_backward_flags). */
int tutel_backward_device_flags(tutel_layer* layer, const float* dy, float dl_aux, float* dx, uint32_t flags);
/* tutel_backward_device_flags where dy and dx hold `tokens` rows: refused (TUTEL_E_INVALID_ARGUMENT,
 * nothing sent, the forward still waiting) when the oldest training forward had another count,
 * whose rows would be read and written past dy and dx, over whatever else the region holds. */
int tutel_backward_device_checked(tutel_layer* layer, int64_t tokens, const float* dy, float dl_aux, float* dx,
                                  uint32_t flags);
/* Asynchronous zero-copy forms, as tutel_submit_forward, tutel_submit_forward_keyed and
 * tutel_submit_backward_flags with the buffers of the *_device calls; waited for with
 * tutel_wait: the output is complete when tutel_wait returns, not when the submit does (one
 * abandoned or timed out is still written in the region until the daemon has run it). The
 * sequences and the pending forwards are shared with the forms above: a forward made here may be
 * backwarded by sequence in either form. */
int tutel_submit_forward_device(tutel_layer* layer, const float* x, int64_t tokens, float* y, int training,
                                tutel_ticket* ticket);
int tutel_submit_forward_device_keyed(tutel_layer* layer, const float* x, int64_t tokens, float* y, int training,
                                      uint64_t noise_key, tutel_ticket* ticket);
int tutel_submit_backward_device(tutel_layer* layer, uint64_t sequence, const float* dy, float dl_aux, float* dx,
                                 uint32_t flags, tutel_ticket* ticket);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* TUTEL_CLIENT_H_ */
