"""MoE layers served by tuteld, driven from Python with numpy arrays.

A binding of libtutel_client's C ABI (client/include/tutel/client.h) through ctypes, so it
needs no compiler and loads wherever the library does. The layers live in the daemon: their
parameters, gradients and optimizer state stay there; Python sends tokens and receives results
through the session's shared memory.

    import numpy as np, tuteld
    with tuteld.Client("/run/tuteld/client.sock") as client:
        layer = client.create_layer('name = "moe0"\\nexperts = 8\\nmodel_dim = 512\\n'
                                    'hidden = 1024\\nk = 2\\ninit_seed = 1\\n')
        y, info = layer.forward(x)            # x: [..., model_dim] float32; info.l_aux
        dx = layer.backward(dy, dl_aux=0.01)  # of the oldest forward not yet backwarded
        layer.step(); layer.zero_grad()

The library is found through TUTEL_CLIENT_LIBRARY (a path, e.g. build/lib/libtutel_client.so.0),
else by the dynamic loader's search (LD_LIBRARY_PATH, the system's library directories).

A Client and its layers may be used from several threads: calls on one client take turns (a
lock per client; the C library takes its own too). For PyTorch, see tuteld.nn.
"""

import collections
import ctypes
import dataclasses
import fcntl
import json
import math
import mmap
import numbers
import os
import sys
import threading
import time
import warnings
import weakref

import numpy as np

__all__ = ["Client", "Layer", "ForwardInfo", "TutelError"]

# The C ABI's codes (TUTEL_E_*), by name.
_CODE_NAMES = {
    -1: "InvalidArgument",
    -2: "NotFound",
    -3: "AlreadyExists",
    -4: "OutOfRange",
    -5: "Corruption",
    -6: "IOError",
    -7: "Unavailable",
    -8: "PermissionDenied",
    -9: "ResourceExhausted",
    -10: "Unimplemented",
    -11: "Internal",
    -12: "Timeout",
    -13: "Aborted",
}


class TutelError(RuntimeError):
    """A call the library or the daemon refused. `code` is the C ABI's negative code, `name`
    its name ("NotFound", ...); the message is the library's, which says what to do."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.name = _CODE_NAMES.get(code, "Unknown")

    def __reduce__(self):
        # args holds the message alone: without this, unpickling (a multiprocessing worker's
        # error coming back) called __init__ without the code and failed.
        return (type(self), (self.code, str(self)))


class _SessionLock:
    """A client's lock, which a process forked from the one that connected refuses at once: a
    thread that held it at the fork does not exist in the child, which would wait for ever."""

    def __init__(self):
        self._lock = threading.RLock()
        self._pid = os.getpid()

    def forked(self):
        return os.getpid() != self._pid

    def __enter__(self):
        if self.forked():
            raise TutelError(-7, f"this tuteld client was connected by process {self._pid}; process "
                                 f"{os.getpid()} (forked from it) cannot use it: connect a new client in the child")
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


@dataclasses.dataclass(frozen=True)
class ForwardInfo:
    """The routing statistics of one forward."""

    l_aux: float  # the load-balancing loss (GShard)
    capacity: int  # slots per expert this forward used
    dropped: int  # (token, choice) assignments past the capacity
    sequence: int  # a training forward's number, for Layer.backward(sequence=...)


class _Ticket(ctypes.Structure):
    _fields_ = [("request_id", ctypes.c_uint64), ("sequence", ctypes.c_uint64)]


class _ConnectOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("secret_file", ctypes.c_char_p),
        ("name", ctypes.c_char_p),
        ("request_timeout_ms", ctypes.c_int64),
        ("control_timeout_ms", ctypes.c_int64),
    ]


_TIMEOUT = -12
_KEEP_PARAM_GRADS = 1  # TUTEL_KEEP_PARAM_GRADS
# A wait for a completion returns to Python this often, so a signal (Ctrl-C) is handled promptly:
# the C library retries its waits on EINTR, and Python runs handlers only between its own steps.
_WAIT_SLICE_MS = 100


class _ForwardInfo(ctypes.Structure):
    _fields_ = [
        ("l_aux", ctypes.c_float),
        ("capacity", ctypes.c_int64),
        ("dropped", ctypes.c_int64),
        ("sequence", ctypes.c_uint64),
    ]


def _load_library():
    path = os.environ.get("TUTEL_CLIENT_LIBRARY")
    names = [path] if path else ["libtutel_client.so.0", "libtutel_client.so"]
    failures = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            failures.append(str(e))
    raise ImportError(
        "tuteld: cannot load libtutel_client (" + "; ".join(failures) + "). Set "
        "TUTEL_CLIENT_LIBRARY to its path (build/lib/libtutel_client.so.0 after tools/build.sh) "
        "or add its directory to LD_LIBRARY_PATH."
    )


def _declare(lib):
    p, i64, u64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_int
    fp = ctypes.POINTER(ctypes.c_float)
    signatures = {
        "tutel_last_error": (ctypes.c_char_p, []),
        "tutel_last_error_code": (i32, []),
        "tutel_connect": (p, [ctypes.c_char_p]),
        "tutel_connect_with_secret": (p, [ctypes.c_char_p, ctypes.c_char_p]),
        "tutel_connect_with_options": (p, [ctypes.c_char_p, ctypes.POINTER(_ConnectOptions)]),
        "tutel_close": (None, [p]),
        "tutel_ping": (i32, [p]),
        "tutel_client_info": (i32, [p, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(u64)]),
        "tutel_layer_create": (i32, [p, ctypes.c_char_p, ctypes.POINTER(p)]),
        "tutel_layer_attach": (i32, [p, ctypes.c_char_p, ctypes.POINTER(p)]),
        "tutel_layer_release": (None, [p]),
        "tutel_layer_destroy": (i32, [p]),
        "tutel_layer_dims": (i32, [p, ctypes.POINTER(i64), ctypes.POINTER(i64), ctypes.POINTER(i64)]),
        "tutel_layer_name": (ctypes.c_char_p, [p]),
        "tutel_layer_kept_aside": (ctypes.c_char_p, [p]),
        "tutel_submit_forward": (i32, [p, fp, i64, fp, i32, ctypes.POINTER(_Ticket)]),
        "tutel_submit_forward_keyed": (i32, [p, fp, i64, fp, i32, u64, ctypes.POINTER(_Ticket)]),
        "tutel_layer_gate_noise": (i32, [p, ctypes.POINTER(ctypes.c_double)]),
        "tutel_submit_backward": (i32, [p, u64, fp, f32, fp, ctypes.POINTER(_Ticket)]),
        "tutel_submit_backward_flags": (i32, [p, u64, fp, f32, fp, ctypes.c_uint32, ctypes.POINTER(_Ticket)]),
        "tutel_wait": (i32, [p, _Ticket, ctypes.POINTER(_ForwardInfo)]),
        "tutel_wait_for": (i32, [p, _Ticket, i64, ctypes.POINTER(_ForwardInfo)]),
        "tutel_abandon": (i32, [p, _Ticket]),
        "tutel_discard": (i32, [p, u64]),
        "tutel_step": (i32, [p]),
        "tutel_step_with": (i32, [p, ctypes.c_double, ctypes.c_double, ctypes.POINTER(i64)]),
        "tutel_zero_grad": (i32, [p]),
        "tutel_zero_grad_with": (i32, [p, i32]),
        "tutel_grad_norm": (i32, [p, ctypes.POINTER(ctypes.c_double)]),
        "tutel_scale_grads": (i32, [p, ctypes.c_double]),
        "tutel_save": (i32, [p, ctypes.c_char_p]),
        "tutel_load": (i32, [p, ctypes.c_char_p]),
        "tutel_export_state": (i32, [p, ctypes.POINTER(i32), ctypes.POINTER(u64)]),
        "tutel_import_state": (i32, [p, i32]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


_lib = _declare(_load_library())


def _error(code):
    return TutelError(code, _lib.tutel_last_error().decode("utf-8", "replace"))


def _check(code):
    if code != 0:
        raise _error(code)


def _milliseconds(seconds, what):
    """A timeout in seconds as the C ABI's milliseconds (0: none)."""
    if seconds is None:
        return 0
    if not isinstance(seconds, (int, float)) or not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"{what} must be a positive number of seconds or None, not {seconds!r}")
    return max(1, math.ceil(seconds * 1000))


def _c_text(text, what):
    """`text` as a C string: a NUL inside it would cut it short there, silently (a save to "a"
    for "a\0b"), so it is refused."""
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL character")
    return text.encode()


def _c_path(path, what):
    """A filesystem path as a C string (str or bytes, as os functions take), NUL refused."""
    encoded = os.fsencode(path)
    if b"\0" in encoded:
        raise ValueError(f"{what} contains a NUL character")
    return encoded


# A float* argument (POINTER(c_float) takes an array of c_float) over an array's own memory.
_FloatView = ctypes.c_float * 0
_FloatPointer = ctypes.POINTER(ctypes.c_float)


def _floats(array):
    """A float* argument to the data of `array` (C-contiguous float32), which must outlive the call.
    A writable array is viewed through the buffer protocol: several times cheaper than
    array.ctypes, which builds helper objects on every access (~3 us of a one-token forward's
    overhead, twice). ctypes views only writable buffers, so a read-only input goes through
    array.ctypes."""
    if array.flags.writeable:
        return _FloatView.from_buffer(array)
    return array.ctypes.data_as(_FloatPointer)


def _sealable_memfd(name):
    """A new memfd that may be sealed, with an exec policy where the kernel has one (Linux 6.3
    warns about memfds without; older kernels refuse the flag)."""
    try:
        return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | 0x0008)  # MFD_NOEXEC_SEAL
    except OSError:
        return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def _read_safetensors(buffer):
    """(tensors, metadata) of the safetensors file in `buffer`: each tensor a float32 array over
    `buffer` (no copy: the arrays keep it alive), the metadata a dict of strings. The daemon
    writes only F32 tensors."""
    if len(buffer) < 8:
        raise TutelError(-5, f"a layer state of {len(buffer)} bytes is too short for a safetensors file")
    header_bytes = int.from_bytes(buffer[:8], "little")
    if header_bytes > len(buffer) - 8:
        raise TutelError(-5, f"a layer state's header of {header_bytes} bytes runs past its {len(buffer)} bytes")
    header = json.loads(bytes(buffer[8:8 + header_bytes]))
    metadata = header.pop("__metadata__", {})
    data = 8 + header_bytes
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        if (entry["dtype"] != "F32" or not 0 <= begin <= end <= len(buffer) - data
                or 4 * math.prod(shape) != end - begin):
            raise TutelError(-5, f"a layer state's tensor {name!r} is not F32 of its shape within the file: {entry}")
        tensors[name] = np.frombuffer(buffer, dtype="<f4", count=(end - begin) // 4,
                                      offset=data + begin).reshape(shape)
    return tensors, metadata


def _private_copy(fd, size):
    """The `size` bytes of the file `fd`, as a writable buffer that holds no descriptor: a
    private (copy-on-write) mapping where mmap can leave the descriptor (Python 3.13), else a
    copy. mmap otherwise keeps a duplicate of `fd` for as long as the mapping lives, and every
    array over it keeps it alive: each state_dict a trainer kept (the best model, the last few)
    held one descriptor per layer, on the way to EMFILE."""
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, size, access=mmap.ACCESS_COPY, trackfd=False)
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
            raise TutelError(-5, f"a layer state of {size} bytes ended after {done}")
        done += n
    return buffer


def _write_safetensors(file, tensors, metadata):
    """Writes `tensors` (name -> array-like, stored as float32) and `metadata` (str -> str) as a
    safetensors file to the binary file object `file`."""
    arrays = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, array in arrays.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section 8-byte aligned, as the daemon writes it
    file.write(len(text).to_bytes(8, "little"))
    file.write(text)
    for array in arrays.values():
        file.write(memoryview(array).cast("B"))


class Client:
    """One session with tuteld (its client socket). Close it when done (or use `with`): that
    ends the session; the layers stay in the daemon for the tenant to attach again.

    secret_file: for a tenant configured with a secret, the file holding it (default: the
    TUTEL_SECRET_FILE environment variable, if set).
    request_timeout: seconds a forward or backward may wait for its result (None: no bound; a
    daemon that exits is noticed within about 200 ms either way); past it the call raises
    TutelError "Timeout" and the request is abandoned.
    control_timeout: seconds a control call (create, step, save, ...) may wait for its reply
    (None: no bound); past it the session is closed (connect again and attach the layers).
    name: how the daemon's logs name this session (default: the program's name).

    A forward or backward interrupted by a signal (KeyboardInterrupt) while it waits for its
    result abandons its request: the library never writes into its arrays afterwards, and a
    training forward is not pending. (A submit that waits for room behind requests the daemon has
    not completed, and a control call, wait in the library: bound them with the timeouts.)"""

    def __init__(self, socket_path, secret_file=None, request_timeout=None, control_timeout=None, name=None):
        options = _ConnectOptions()
        options.struct_size = ctypes.sizeof(_ConnectOptions)
        options.secret_file = None if secret_file is None else _c_path(secret_file, "secret_file")
        options.name = None if name is None else _c_text(name, "name")
        options.control_timeout_ms = _milliseconds(control_timeout, "control_timeout")
        # The library's own bound covers a submit that waits for room (behind abandoned requests
        # the daemon has not completed); this module's waits use their own deadline.
        options.request_timeout_ms = _milliseconds(request_timeout, "request_timeout")
        self._request_timeout = None if request_timeout is None else float(request_timeout)
        handle = _lib.tutel_connect_with_options(_c_path(socket_path, "socket_path"), ctypes.byref(options))
        if not handle:
            # The real cause (a refused uid, a version mismatch), not a guess: callers branch on it.
            raise _error(_lib.tutel_last_error_code() or -11)
        self._handle = handle
        # Which daemon: its socket file (the same daemon under another path is the same file), so
        # that layers of the same name on two daemons are told apart (tuteld.nn.step).
        try:
            st = os.stat(socket_path)
            self._daemon = (st.st_dev, st.st_ino)
        except OSError:
            self._daemon = os.path.realpath(socket_path)
        self._lock = _SessionLock()
        # The layers made from this client, weakly: a Layer holds its client, so strong references
        # both ways would keep a dropped client's session open until the cycle collector ran.
        self._layers = weakref.WeakSet()
        # C handles of Layers that were garbage-collected, released at this client's next call:
        # a finalizer may run on any thread, between any two steps of a call on this client, so
        # it only queues (deque appends are atomic).
        self._dropped_handles = collections.deque()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        raise TypeError("a tuteld.Client cannot be pickled or copied: it is a session with the daemon; "
                        "connect a new one in the other process")

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the module's globals may already be gone
            pass

    def close(self):
        """Releases every layer handle made from this client and ends the session."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return  # the constructor failed
        if lock.forked():
            # A forked child's copy: the library closes only this process's descriptors and
            # sends nothing. Not under the lock, which a parent's thread may hold for good here.
            if self._handle is not None:
                _lib.tutel_close(self._handle)
                self._handle = None
            return
        with lock:
            if self._handle is None:
                return
            for layer in list(self._layers):
                layer._release()
            self._layers.clear()
            self._release_dropped()
            _lib.tutel_close(self._handle)
            self._handle = None
            # Queued by a finalizer meanwhile: a layer handle may be released after its client.
            self._release_dropped(discard=False)

    def _release_dropped(self, discard=True):
        """Sends the discards of garbage-collected Layers, then releases their handles. Under
        self._lock."""
        while self._dropped_handles:
            handle, discards = self._dropped_handles[0]
            if discard:
                while discards:
                    _lib.tutel_discard(handle, discards[0])  # best effort, as in Layer._layer
                    discards.popleft()
            self._dropped_handles.popleft()
            _lib.tutel_layer_release(handle)

    def _session(self):
        """The C client, for a call made under self._lock."""
        if self._handle is None:
            raise TutelError(-7, "this tuteld.Client is closed")
        self._release_dropped()
        return self._handle

    @property
    def tenant(self):
        """The tenant the daemon mapped this process to."""
        name = ctypes.c_char_p()
        with self._lock:
            _check(_lib.tutel_client_info(self._session(), ctypes.byref(name), None))
            # The string belongs to the client: a close() on another thread frees it.
            return name.value.decode()

    @property
    def data_bytes(self):
        """The session's shared-memory data region: one request's input plus output must fit."""
        n = ctypes.c_uint64()
        with self._lock:
            _check(_lib.tutel_client_info(self._session(), None, ctypes.byref(n)))
        return n.value

    def ping(self):
        with self._lock:
            _check(_lib.tutel_ping(self._session()))

    def create_layer(self, spec_toml):
        """Creates a layer from a TOML layer spec (docs/config.md, "Layers"). Where the daemon
        moved an earlier layer's checkpoint of the name aside instead of replacing it, a warning
        says where (layer.kept_aside): a file among the tenant's checkpoints, which loads into a
        layer of the spec it was written for (a group rank's file into that rank's layer)."""
        layer = self._open(_lib.tutel_layer_create, spec_toml)
        if layer.kept_aside:
            warnings.warn(f"tuteld created layer {layer.name!r} afresh and kept an earlier checkpoint of that "
                          f"name aside as {layer.kept_aside!r} among the tenant's checkpoints (the daemon's log "
                          f"says why); it loads into a layer of the spec it was written for", stacklevel=2)
        return layer

    def attach_layer(self, name):
        """Attaches to an existing layer of this tenant."""
        return self._open(_lib.tutel_layer_attach, name)

    def _open(self, fn, text):
        out = ctypes.c_void_p()
        with self._lock:
            _check(fn(self._session(), _c_text(text, "the layer spec or name"), ctypes.byref(out)))
            try:
                layer = Layer(self, out.value)
            except BaseException:
                _lib.tutel_layer_release(out.value)
                raise
            self._layers.add(layer)
        return layer

    def _submit_and_wait(self, ticket, submit, *args):
        """Submits a data request (submit(*args, ticket); ticket.request_id stays 0 unless it was
        submitted) and waits for it, in slices so that a signal is handled; on any exception
        (KeyboardInterrupt, the request timeout) the request is abandoned before the caller's
        arrays can go. Under self._lock."""
        try:
            _check(submit(*args, ctypes.byref(ticket)))
            return self._wait(ticket)
        except BaseException:
            if ticket.request_id != 0 and self._handle is not None:
                _lib.tutel_abandon(self._handle, ticket)
            raise

    def _wait(self, ticket):
        info = _ForwardInfo()
        timeout = self._request_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_ms = _WAIT_SLICE_MS
            if deadline is not None:
                slice_ms = max(0, min(slice_ms, math.ceil((deadline - time.monotonic()) * 1000)))
            code = _lib.tutel_wait_for(self._session(), ticket, slice_ms, ctypes.byref(info))
            if code != _TIMEOUT:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TutelError(_TIMEOUT, f"no completion from tuteld within {timeout:g} s (the request "
                                           "was abandoned; raise request_timeout in tuteld.Client)")
        _check(code)
        # ctypes reads the fields as Python floats and ints already.
        return ForwardInfo(info.l_aux, info.capacity, info.dropped, info.sequence)


class Layer:
    """A handle to one MoE layer in the daemon. Inputs are arrays of shape [..., model_dim]
    (converted to contiguous float32 when they are not); outputs keep the leading shape."""

    def __init__(self, client, handle):
        self._client = client
        self._handle = handle
        # Training forwards not yet backwarded, oldest first: sequence -> rows. The C side sizes
        # a backward by its forward's rows, so dy must have exactly that many.
        self._pending = collections.OrderedDict()
        # Training forwards to discard at this layer's next call (a dropped autograd graph):
        # queued, since they arise where a call cannot be made (a finalizer on any thread). An
        # abandoned wait's forward is the library's to discard (tutel_abandon).
        self._discards = collections.deque()
        self._state_layout = None  # state_layout(), once known
        dims = [ctypes.c_int64() for _ in range(3)]
        gate_noise = ctypes.c_double()
        with client._lock:
            _check(_lib.tutel_layer_dims(handle, *(ctypes.byref(d) for d in dims)))
            _check(_lib.tutel_layer_gate_noise(handle, ctypes.byref(gate_noise)))
            self.name = _lib.tutel_layer_name(handle).decode()
            # Set by a creation that moved an earlier layer's checkpoint of this name aside (a
            # file among the tenant's checkpoints, for load()); None otherwise.
            self.kept_aside = _lib.tutel_layer_kept_aside(handle).decode() or None
        self.model_dim, self.output_dim, self.experts = (d.value for d in dims)
        # The spec's gate_noise: > 0 when its training forwards draw gate noise (a forward's
        # noise_key matters then only).
        self.gate_noise = gate_noise.value
        # Last, once nothing can fail (a failed constructor's handle is its caller's to release):
        # dropped without release(), the handle and its queued discards go at the client's next
        # call (or at once, once the client itself is gone).
        self._finalizer = weakref.finalize(self, Layer._queue_release, weakref.ref(client), handle,
                                           self._discards)

    def __reduce__(self):
        raise TypeError("a tuteld.Layer cannot be pickled or copied: it is a handle on a session; attach "
                        "the layer by name (client.attach_layer) in the other process")

    def _layer(self):
        """The C handle, for a call made under the client's lock; first discards the forwards
        queued for it."""
        self._client._session()  # a closed client released its layers: say it was closed
        if self._handle is None:
            raise TutelError(-7, "this tuteld.Layer handle was released")
        while self._discards:
            sequence = self._discards[0]
            self._pending.pop(sequence, None)
            # Best effort: a failure here belongs to no call of the caller's (a closed session
            # frees the forward anyway). Taken off the queue only once sent: a discard sent twice
            # (an interrupt in between) is no error.
            _lib.tutel_discard(self._handle, sequence)
            self._discards.popleft()
        return self._handle

    @staticmethod
    def _queue_release(client_ref, handle, discards):
        client = client_ref()
        if client is not None:
            client._dropped_handles.append((handle, discards))  # any thread: no call from here
        else:
            _lib.tutel_layer_release(handle)  # its client is gone: nothing else uses the library

    def _release(self):
        """Sends the queued discards and releases the handle. Under the client's lock."""
        if self._handle is not None:
            self._finalizer.detach()
            if self._client._handle is not None:
                self._layer()  # the queued discards
            _lib.tutel_layer_release(self._handle)
            self._handle = None

    def release(self):
        """Frees this handle; the layer stays in the daemon (see destroy)."""
        if self._client._lock.forked():
            # A forked child's copy (reattach() after a fork drops the parent's): freed here with
            # nothing sent, not under the lock, as Client.close does in a child.
            if self._handle is not None:
                self._finalizer.detach()
                self._client._layers.discard(self)
                _lib.tutel_layer_release(self._handle)
                self._handle = None
            return
        with self._client._lock:
            self._client._layers.discard(self)
            self._release()

    def _rows(self, array, width, what):
        a = np.asarray(array)
        if a.dtype.kind not in "fiub":  # complex would lose its imaginary part; objects, strings are no numbers
            raise TypeError(f"{what} must hold real numbers, not {a.dtype}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 0 or a.shape[-1] != width:
            raise ValueError(f"{what} must have shape [..., {width}], not {list(np.shape(array))}")
        # No rows is an empty batch, which the daemon takes (an expert-parallel rank's peers need
        # its part of the step).
        return a.shape[:-1], a if a.ndim == 2 else a.reshape(-1, width)

    def forward(self, x, training=True, noise=True, noise_key=None):
        """y [..., output_dim] and the ForwardInfo. A training forward keeps what its backward
        needs in the daemon until backward() consumes it. noise=False: a training forward routed
        as an inference is, without gate noise (refused on a layer with gate_noise > 0).
        noise_key (an integer in [0, 2**64)): the gate noise is drawn from it (with the spec's
        noise_seed), not from the daemon's (step, sequence) key, so a forward run again with its
        key draws the same noise (a recomputation); with training=False, an inference routed as a
        training forward is, the noise drawn and nothing kept (train mode under no_grad)."""
        if noise_key is not None:
            if not noise:
                raise ValueError("a forward without gate noise (noise=False) takes no noise_key")
            if isinstance(noise_key, bool) or not isinstance(noise_key, numbers.Integral) \
                    or not 0 <= noise_key < 2 ** 64:
                raise ValueError(f"noise_key must be an integer in [0, 2**64), not {noise_key!r}")
        lead, rows = self._rows(x, self.model_dim, "x")
        # In its final shape: the library writes rows.shape[0] contiguous rows either way.
        y = np.empty(lead + (self.output_dim,), dtype=np.float32)
        ticket = _Ticket()
        with self._client._lock:
            # An abandoned training forward (an interrupt, the request timeout) is discarded by the
            # library's tutel_abandon, without waiting: queueing one here too made the next call
            # wait a whole request timeout more for it when the daemon was stuck.
            if noise_key is None:
                info = self._client._submit_and_wait(ticket, _lib.tutel_submit_forward, self._layer(),
                                                     _floats(rows), rows.shape[0], _floats(y),
                                                     (1 if noise else 2) if training else 0)
            else:
                info = self._client._submit_and_wait(ticket, _lib.tutel_submit_forward_keyed, self._layer(),
                                                     _floats(rows), rows.shape[0], _floats(y),
                                                     1 if training else 0, int(noise_key))
            if training:
                self._pending[info.sequence] = rows.shape[0]
        return y, info

    def infer(self, x, noise_key=None):
        """A forward that keeps nothing for backward; with noise_key, one that draws the gate
        noise a training forward with that key draws (see forward)."""
        if noise_key is None:
            return self.forward(x, training=False)
        return self.forward(x, training=False, noise_key=noise_key)

    def backward(self, dy, dl_aux=0.0, sequence=None, param_grads=True):
        """dx [..., model_dim] for dy (the gradient of the loss in y) and dl_aux (in l_aux),
        of the training forward `sequence` (its ForwardInfo.sequence), by default the oldest
        not yet backwarded. The parameter gradients accumulate in the daemon; with
        param_grads=False they are left as they were (dx alone: a frozen module, the gradient
        of the input alone); on an expert-parallel layer every rank must ask alike, or every
        rank's backward raises (InvalidArgument) and its forward is consumed."""
        lead, rows = self._rows(dy, self.output_dim, "dy")
        with self._client._lock:
            handle = self._layer()  # first the queued discards: the default may not pick one
            if sequence is None:
                if not self._pending:
                    raise TutelError(-1, "backward without a training forward to match it")
                sequence = next(iter(self._pending))
            elif sequence not in self._pending:
                raise TutelError(-1, f"backward: no training forward with sequence {sequence} waits "
                                     "for its backward on this handle (already backwarded, failed, "
                                     "or made through another handle)")
            tokens = self._pending[sequence]
            if rows.shape[0] != tokens:
                raise ValueError(f"dy has {rows.shape[0]} rows but the forward with sequence "
                                 f"{sequence} had {tokens} tokens; pass the gradient of that "
                                 "forward's y")
            dx = np.empty(lead + (self.model_dim,), dtype=np.float32)  # tokens rows, in dy's leading shape
            # The library forgets the forward once the backward is submitted: whatever happens
            # next, it cannot be backwarded again. A refused submit leaves it pending.
            ticket = _Ticket()
            try:
                self._client._submit_and_wait(ticket, _lib.tutel_submit_backward_flags, handle, sequence,
                                              _floats(rows), float(dl_aux), _floats(dx),
                                              0 if param_grads else _KEEP_PARAM_GRADS)
            finally:
                if ticket.request_id != 0:
                    del self._pending[sequence]
        return dx

    def discard(self, sequence):
        """Drops the training forward `sequence` that will not be backwarded, with the memory
        the daemon holds for it (otherwise kept until the session ends). A forward that is not
        pending is no error. On an expert-parallel layer it is this rank's alone (no collective).
        (Abandoned forwards and tuteld.nn.MoE's dropped graphs are discarded by themselves.)"""
        with self._client._lock:
            self._pending.pop(sequence, None)
            _check(_lib.tutel_discard(self._layer(), sequence))

    def _call(self, fn, *args):
        with self._client._lock:
            _check(fn(self._layer(), *args))

    def step(self, lr=None, weight_decay=None):
        """Applies the layer's optimizer to the gradients accumulated since zero_grad; returns the
        step count after it. A layer with none (no backward since its creation or since
        zero_grad(), or only backwards for dx alone: a frozen or unused module) is left as it
        is, as torch's optimizers skip a parameter whose .grad is None.
        lr, weight_decay: this step's, in place of the spec's (a learning-rate schedule's value,
        e.g. scheduler.get_last_lr()[0]); finite and >= 0. On an expert-parallel layer every
        rank steps alike (the same values, after the same backwards)."""
        values = []
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if value is None:
                values.append(-1.0)
                continue
            value = float(value)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, not {value}")
            values.append(value)
        count = ctypes.c_int64()
        self._call(_lib.tutel_step_with, values[0], values[1], ctypes.byref(count))
        return count.value

    def zero_grad(self, set_to_none=True):
        """Zeroes the accumulated gradients. set_to_none (torch's default): they are absent until
        the next backward, so a step before it changes nothing; False: gradients that are there
        become zeros that a step applies (weight decay, momentum), absent ones stay absent, as
        after torch's zero_grad(set_to_none=False)."""
        self._call(_lib.tutel_zero_grad_with, 1 if set_to_none else 0)

    def grad_norm(self):
        """The L2 norm of the accumulated gradients (inf or nan where one is not finite). On an
        expert-parallel layer the whole layer's, the same on every rank: a collective, which
        every rank calls in the same order as its steps."""
        norm = ctypes.c_double()
        self._call(_lib.tutel_grad_norm, ctypes.byref(norm))
        return norm.value

    def scale_grads(self, factor):
        """Multiplies the accumulated gradients by `factor` (finite): clipping, unscaling a loss
        scale. On an expert-parallel layer every rank must pass the same factor."""
        self._call(_lib.tutel_scale_grads, float(factor))

    def save(self, name):
        """Writes parameters and optimizer state to `name` (safetensors) in the tenant's
        checkpoint directory on the daemon's side."""
        self._call(_lib.tutel_save, _c_text(name, "the path"))

    def load(self, name):
        self._call(_lib.tutel_load, _c_text(name, "the path"))

    def export_state(self):
        """The layer's state as save() writes it, but into this process: (tensors, metadata).
        tensors maps each name (Tutel's parameter names; "optimizer.state0.<name>" and
        "optimizer.state1.<name>" for the optimizer's) to a float32 array; metadata holds the
        step ("tuteld.step"), the spec and the tenant. On an expert-parallel layer, this rank's
        experts and the gate.
        The arrays are writable views of one private buffer holding the file the daemon wrote
        (a copy-on-write mapping of it on Python 3.13 and later, a copy before), which goes with
        the last of them; writing to one changes neither the layer nor another export. No file
        descriptor stays open."""
        fd, size = ctypes.c_int(-1), ctypes.c_uint64(0)
        self._call(_lib.tutel_export_state, ctypes.byref(fd), ctypes.byref(size))
        try:
            tensors, metadata = _read_safetensors(_private_copy(fd.value, size.value))
        finally:
            os.close(fd.value)
        if self._state_layout is None:
            self._state_layout = ({name: values.shape for name, values in tensors.items()},
                                  metadata.get("tuteld.optimizer"))
        return tensors, metadata

    def state_layout(self):
        """(shapes, optimizer): every tensor of export_state's by name and shape, in its order,
        and the optimizer's name ("sgd", "adamw"; None from a daemon that does not say). They
        never change for a layer: known from this handle's first export (made here if none
        was)."""
        if self._state_layout is None:
            self.export_state()
        return self._state_layout

    def import_state(self, tensors, metadata=None):
        """Replaces the layer's state with `tensors` (name -> array-like, as export_state gives
        them; stored as float32) and `metadata` (the step as "tuteld.step"), as load() reads a
        file: every parameter must be there; where any optimizer state is not, all of it starts
        afresh, as does the step. The step is metadata["tuteld.step"], 0 where it is missing
        (optimizer state without it restarts AdamW's bias correction: pass export_state's
        metadata with its tensors). On an expert-parallel layer, this rank's tensors, or the whole layer's (every
        expert: the daemon takes this rank's). A state the daemon refuses changes nothing."""
        fd = _sealable_memfd("tuteld layer state")
        try:
            with open(fd, "wb", closefd=False) as file:
                _write_safetensors(file, tensors, metadata or {})
            # Sealed, the daemon maps it rather than copying it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
            self._call(_lib.tutel_import_state, fd)
        finally:
            os.close(fd)

    def destroy(self):
        """Destroys the layer in the daemon and releases this handle."""
        self._call(_lib.tutel_layer_destroy)
        self.release()
