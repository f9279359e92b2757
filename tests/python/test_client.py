"""The Python module (client/python/tuteld) against a real tuteld and the float64 reference:
forward, backward, the optimizer step, micro-batches out of order, and bad input. Fresh random
inputs every run; the seed is in the failure message."""

import copy
import gc
import os
import pickle
import random
import shutil
import signal
import socket
import tempfile
import threading
import time
import unittest
import weakref

import numpy as np

import moe_reference as ref
import tuteld
from daemon import Daemon

# Every daemon these tests start (they inherit the environment) keeps UCX on loopback.
os.environ["UCX_NET_DEVICES"] = "lo"

# float32 in the daemon against float64 here, on values of order 1: relative 1e-4 and absolute
# 1e-5 leave room for float32 summation over M = 16 and H = 24 terms.
RTOL, ATOL = 1e-4, 1e-5
E, M, H, K, F = 4, 16, 24, 2, 1.0
LR = 0.05


def random_params(rng):
    p = {
        "wg": rng.normal(0, 0.5, (E, M)),
        "w1": rng.normal(0, 0.3, (E, H, M)),
        "b1": rng.normal(0, 0.1, (E, H)),
        "w2": rng.normal(0, 0.3, (E, H, M)),
        "b2": rng.normal(0, 0.1, (E, M)),
    }
    return {n: v.astype(np.float32).astype(np.float64) for n, v in p.items()}  # exact in float32


def random_inputs(rng, p, shape):
    """x of `shape` [..., M] with no near tie in the routing and no pre-activation near relu's
    kink (ref.routing_margin, ref.relu_margin): float32 may decide those differently."""
    while True:
        x = rng.normal(0, 1, shape).astype(np.float32).astype(np.float64)
        rows = x.reshape(-1, M)
        if ref.routing_margin(rows, p["wg"], K) > 1e-4 and ref.relu_margin(p, rows) > 1e-4:
            return x


def random_case(rng, tokens):
    p = random_params(rng)
    return p, random_inputs(rng, p, (tokens, M))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_spec(rank, port, size=2):
    """Group rank `rank`'s layer "moe" of the shape above, from the whole layer's
    init.safetensors (each rank takes its slice), meeting its peers on loopback `port`."""
    return (f'name = "moe"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\nk = {K}\n'
            f'capacity_factor = {F}\nweights = "init.safetensors"\n'
            f'optimizer = {{ kind = "sgd", lr = {LR} }}\n'
            f'[group]\ncoordinator = "127.0.0.1:{port}"\nsize = {size}\nrank = {rank}\n'
            'collective_timeout_ms = 20000\n')


def assert_group_stepped(daemons, p, grads, rtol, atol, what):
    """Each rank r of a two-rank group saved "after.safetensors" on daemons[r]: its slice (the
    gate whole, experts [r·E/2, (r+1)·E/2)) of the whole layer `p` after one SGD step by `grads`."""
    for r, d in enumerate(daemons):
        stored = ref.read_safetensors(os.path.join(d.checkpoints, "after.safetensors"))
        for n, tutel_name in ref.TUTEL_NAMES.items():
            want = p[n] - LR * grads[n]
            if n != "wg":
                want = want[r * E // 2:(r + 1) * E // 2]  # the rank's experts
            np.testing.assert_allclose(stored[tutel_name], want, rtol=rtol, atol=atol,
                                       err_msg=f"rank {r}'s {tutel_name} after the step ({what})")


def run_ranks(body, ranks):
    """body(r) on a thread per rank; the exceptions they raised."""
    errors = []

    def run(r):
        try:
            body(r)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors



def wait_until_stopped(pid, timeout=10.0):
    """Returns once every thread of `pid` is stopped (a SIGSTOP takes effect asynchronously: a
    thread may still serve a request meanwhile)."""
    deadline = time.monotonic() + timeout
    task_dir = f"/proc/{pid}/task"
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(task_dir):
            try:
                with open(f"{task_dir}/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")

class ClientModuleTest(unittest.TestCase):
    def setUp(self):
        self.seed = random.SystemRandom().randrange(2**63)
        self.rng = np.random.default_rng(self.seed)
        self.daemon = Daemon()
        self.addCleanup(self.daemon.stop)
        self.client = tuteld.Client(self.daemon.client_socket)
        self.addCleanup(self.client.close)

    def make_layer(self, p, name="moe"):
        ref.write_safetensors(os.path.join(self.daemon.checkpoints, name + "-init.safetensors"),
                              {ref.TUTEL_NAMES[n]: v for n, v in p.items()})
        spec = (f'name = "{name}"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\nk = {K}\n'
                f'capacity_factor = {F}\nweights = "{name}-init.safetensors"\n'
                f'optimizer = {{ kind = "sgd", lr = {LR} }}\n')
        return self.client.create_layer(spec)

    def assert_close(self, actual, expected, what):
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what} (seed {self.seed})")

    def test_session(self):
        self.assertEqual(self.client.tenant, "default")
        self.assertGreater(self.client.data_bytes, 0)
        self.client.ping()

    def test_forward_backward_and_step_match_the_reference(self):
        p, x = random_case(self.rng, 24)  # 24 tokens, capacity 2*floor(1*6) = 12: some dropped
        layer = self.make_layer(p)
        self.assertEqual((layer.model_dim, layer.output_dim, layer.experts), (M, M, E))

        y, info = layer.forward(x)
        y_ref, stats, saved = ref.forward(p, x, K, F)
        self.assertEqual(y.dtype, np.float32)
        self.assert_close(y, y_ref, "y")
        self.assertAlmostEqual(info.l_aux, stats["l_aux"], delta=1e-5 + 1e-4 * abs(stats["l_aux"]))
        self.assertEqual(info.capacity, stats["capacity"], f"seed {self.seed}")
        self.assertEqual(info.dropped, stats["dropped"], f"seed {self.seed}")

        dy = self.rng.normal(0, 1, y.shape).astype(np.float32).astype(np.float64)
        dl_aux = 0.25
        dx = layer.backward(dy, dl_aux=dl_aux)
        dx_ref, grads = ref.backward(p, saved, dy, dl_aux)
        self.assert_close(dx, dx_ref, "dx")

        # SGD without momentum: w - lr * grad, read back from the daemon's checkpoint.
        layer.step()
        layer.save("after-step.safetensors")
        stored = ref.read_safetensors(os.path.join(self.daemon.checkpoints, "after-step.safetensors"))
        for n, tutel_name in ref.TUTEL_NAMES.items():
            self.assert_close(stored[tutel_name], p[n] - LR * grads[n], f"{tutel_name} after the step")

    def test_the_gradient_norm_and_its_scale_match_the_reference(self):
        p, x = random_case(self.rng, 16)
        layer = self.make_layer(p)
        self.assertEqual(layer.grad_norm(), 0.0)
        y, _ = layer.forward(x)
        _, _, saved = ref.forward(p, x, K, F)
        dy = self.rng.normal(0, 1, y.shape).astype(np.float32).astype(np.float64)
        layer.backward(dy, dl_aux=0.25)
        _, grads = ref.backward(p, saved, dy, 0.25)
        norm_ref = np.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
        norm = layer.grad_norm()
        self.assertAlmostEqual(norm, norm_ref, delta=1e-4 * norm_ref, msg=f"seed {self.seed}")
        for bad in (float("nan"), float("inf"), 1e300):
            with self.assertRaises(tuteld.TutelError) as e:
                layer.scale_grads(bad)
            self.assertEqual(e.exception.name, "InvalidArgument")
        self.assertEqual(layer.grad_norm(), norm)  # the refusals changed nothing
        layer.scale_grads(0.5)
        layer.step()
        layer.save("after-scaled-step.safetensors")
        stored = ref.read_safetensors(os.path.join(self.daemon.checkpoints, "after-scaled-step.safetensors"))
        for n, tutel_name in ref.TUTEL_NAMES.items():
            self.assert_close(stored[tutel_name], p[n] - LR * 0.5 * grads[n], f"{tutel_name} after the step")

    def test_export_state_is_the_saved_file_and_import_state_puts_it_back(self):
        p, x = random_case(self.rng, 12)
        layer = self.make_layer(p)
        tensors, metadata = layer.export_state()
        self.assertEqual(set(tensors), set(ref.TUTEL_NAMES.values()))  # plain SGD keeps no state
        for n, tutel_name in ref.TUTEL_NAMES.items():
            self.assertEqual(tensors[tutel_name].dtype, np.float32)
            np.testing.assert_array_equal(tensors[tutel_name], p[n].astype(np.float32), tutel_name)
        self.assertEqual(metadata["tuteld.step"], "0")
        y, _ = layer.forward(x)
        layer.backward(self.rng.normal(0, 1, y.shape))
        layer.step()
        layer.save("stepped.safetensors")
        stored = ref.read_safetensors(os.path.join(self.daemon.checkpoints, "stepped.safetensors"))
        tensors, metadata = layer.export_state()
        self.assertEqual(metadata["tuteld.step"], "1")
        for name, values in stored.items():
            np.testing.assert_array_equal(tensors[name], values, name)

        # Into a layer initialised otherwise: the same outputs, bit for bit.
        other = self.make_layer(random_params(self.rng), name="other")
        other.import_state({name: values.astype(np.float64) for name, values in tensors.items()}, metadata)
        np.testing.assert_array_equal(other.infer(x)[0], layer.infer(x)[0])
        self.assertEqual(other.export_state()[1]["tuteld.step"], "1")
        # Refused, and nothing changes: a mis-shaped tensor, a missing one, a step that is no count.
        bad = [dict(tensors, **{"gates.0.wg.weight": np.zeros((E, M + 1))}),
               {k: v for k, v in tensors.items() if k != "experts.batched_fc2_w"}]
        for state, meta, name in ((bad[0], metadata, "InvalidArgument"), (bad[1], metadata, "NotFound"),
                                  (tensors, {"tuteld.step": "-2"}, "Corruption")):
            with self.assertRaises(tuteld.TutelError) as e:
                other.import_state(state, meta)
            self.assertEqual(e.exception.name, name, str(e.exception))
        np.testing.assert_array_equal(other.infer(x)[0], layer.infer(x)[0])
        # Views of one private mapping, not copies: writable, and writing to one changes neither
        # the daemon's state nor another export; the mapping outlives the call and its fd.
        views, _ = layer.export_state()
        gate = views["gates.0.wg.weight"]
        self.assertFalse(gate.flags.owndata)
        self.assertTrue(gate.flags.writeable)
        gate[...] = 7.0
        np.testing.assert_array_equal(layer.export_state()[0]["gates.0.wg.weight"], stored["gates.0.wg.weight"])
        np.testing.assert_array_equal(views["experts.batched_fc1_w"], stored["experts.batched_fc1_w"])
        del views
        np.testing.assert_array_equal(gate, np.full_like(gate, 7.0))
        # Exports kept (a trainer's best model, its last few) hold no file descriptor each: the
        # mapping of the daemon's memfd kept a duplicate of it for as long as an array lived.
        kept = [layer.export_state() for _ in range(3)]

        def state_fds():
            names = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    names.append(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass  # the listing's own descriptor, closed by now
            return [n for n in names if "tuteld layer state" in n]

        self.assertEqual(state_fds(), [])
        np.testing.assert_array_equal(kept[2][0]["experts.batched_fc1_w"], stored["experts.batched_fc1_w"])

    def test_an_empty_batch_is_a_step_that_changes_nothing(self):
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        y, info = layer.forward(np.zeros((3, 0, M)))
        self.assertEqual(y.shape, (3, 0, M))
        self.assertEqual((info.l_aux, info.capacity, info.dropped), (0.0, 0, 0))
        self.assertEqual(self.daemon.pending_backwards("moe"), 1)
        self.assertEqual(layer.backward(np.zeros((3, 0, M))).shape, (3, 0, M))
        self.assertEqual(self.daemon.pending_backwards("moe"), 0)
        self.assertEqual(layer.grad_norm(), 0.0)
        self.assertEqual(layer.infer(np.zeros((0, M)))[0].shape, (0, M))
        self.assert_close(layer.infer(x)[0], ref.forward(p, x, K, F)[0], "y after the empty batches")

    def test_a_group_rank_with_an_empty_batch_serves_its_peers_tokens(self):
        """Two daemons, a group layer of two ranks (two experts each). Rank 1's batch is empty:
        it still calls, and rank 0's y, l_aux and dx are the single-process reference's on rank
        0's tokens; after both ranks step, each holds its slice of the whole layer stepped by
        rank 0's gradient alone."""
        peer = Daemon()
        self.addCleanup(peer.stop)
        daemons = [self.daemon, peer]
        p, x = random_case(self.rng, 24)
        for d in daemons:
            ref.write_safetensors(os.path.join(d.checkpoints, "init.safetensors"),
                                  {ref.TUTEL_NAMES[n]: v for n, v in p.items()})
        port = free_port()
        dy = self.rng.normal(0, 1, x.shape).astype(np.float32).astype(np.float64)
        results = [None, None]

        def rank(r):
            with tuteld.Client(daemons[r].client_socket) as client:
                layer = client.create_layer(group_spec(r, port))
                y, info = layer.forward(x if r == 0 else np.zeros((0, M)))
                dx = layer.backward(dy if r == 0 else np.zeros((0, M)), dl_aux=0.25)
                layer.step()
                layer.save("after.safetensors")
                results[r] = (y, info, dx)

        errors = run_ranks(rank, 2)
        self.assertEqual(errors, [], f"{errors}\n{self.daemon.log()}\n{peer.log()}")
        y_ref, stats, saved = ref.forward(p, x, K, F)
        dx_ref, grads = ref.backward(p, saved, dy, 0.25)
        y, info, dx = results[0]
        self.assert_close(y, y_ref, "rank 0's y")
        self.assert_close(dx, dx_ref, "rank 0's dx")
        self.assertAlmostEqual(info.l_aux, stats["l_aux"], delta=1e-5 + 1e-4 * abs(stats["l_aux"]))
        self.assertEqual(info.capacity, stats["capacity"])
        y, info, dx = results[1]
        self.assertEqual((y.shape, dx.shape), ((0, M), (0, M)))
        self.assertEqual((info.l_aux, info.capacity, info.dropped), (0.0, stats["capacity"], 0))
        assert_group_stepped(daemons, p, grads, RTOL, ATOL, f"seed {self.seed}")

    def test_micro_batches_backwarded_out_of_order(self):
        p, x1 = random_case(self.rng, 8)
        x2 = random_inputs(self.rng, p, (3, 5, M))  # leading dims are kept
        layer = self.make_layer(p)
        y1, info1 = layer.forward(x1)
        y2, info2 = layer.forward(x2)
        self.assertEqual(y2.shape, (3, 5, M))
        self.assertNotEqual(info1.sequence, info2.sequence)
        dy2 = self.rng.normal(0, 1, y2.shape)
        dx2 = layer.backward(dy2, sequence=info2.sequence)  # the newer one first
        _, _, saved2 = ref.forward(p, x2.reshape(-1, M), K, F)
        self.assert_close(dx2.reshape(-1, M), ref.backward(p, saved2, dy2.reshape(-1, M), 0.0)[0], "dx2")
        dy1 = self.rng.normal(0, 1, y1.shape)
        dx1 = layer.backward(dy1)  # the oldest not yet backwarded: x1's
        _, _, saved1 = ref.forward(p, x1, K, F)
        self.assert_close(dx1, ref.backward(p, saved1, dy1, 0.0)[0], "dx1")
        with self.assertRaises(tuteld.TutelError) as e:
            layer.backward(dy1)
        self.assertIn("without a training forward", str(e.exception))

    def test_backward_needs_as_many_rows_as_its_forward(self):
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        y, info = layer.forward(x)
        # The library sizes a backward by its forward: other row counts would read past dy (fewer)
        # or return rows it never wrote (more).
        for rows in (12, 5):
            with self.assertRaises(ValueError) as e:
                layer.backward(self.rng.normal(0, 1, (rows, M)))
            self.assertIn(f"dy has {rows} rows", str(e.exception))
            self.assertIn("had 8 tokens", str(e.exception))
            with self.assertRaises(ValueError):
                layer.backward(self.rng.normal(0, 1, (rows, M)), sequence=info.sequence)
        # The forward still waits for its backward.
        dy = self.rng.normal(0, 1, y.shape)
        _, _, saved = ref.forward(p, x, K, F)
        self.assert_close(layer.backward(dy), ref.backward(p, saved, dy, 0.0)[0], "dx after the refusals")

    def test_a_backward_that_fails_in_its_wait_is_not_retried_by_later_backwards(self):
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        y, _ = layer.forward(x)
        real_wait = self.client._wait

        def failing_wait(ticket):  # the backward ran, but its wait reports a failure
            self.client._wait = real_wait
            real_wait(ticket)
            raise tuteld.TutelError(-13, "injected: the wait failed")

        self.client._wait = failing_wait
        with self.assertRaises(tuteld.TutelError):
            layer.backward(np.zeros_like(y))
        # The library forgot that forward at the submit: the next default backward is the new one's.
        x2 = random_inputs(self.rng, p, (8, M))
        y2, _ = layer.forward(x2)
        dy2 = self.rng.normal(0, 1, y2.shape)
        _, _, saved2 = ref.forward(p, x2, K, F)
        self.assert_close(layer.backward(dy2), ref.backward(p, saved2, dy2, 0.0)[0], "dx of the new forward")

    def test_an_interrupted_forward_is_abandoned(self):
        # Ctrl-C while a forward waits: the request is abandoned before its arrays can be freed
        # (the library would otherwise write into them at the next wait), and it is not pending.
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        lib = tuteld._lib
        real_wait_for, real_abandon = lib.tutel_wait_for, lib.tutel_abandon
        abandoned = []

        def interrupted_wait_for(*args):
            lib.tutel_wait_for = real_wait_for
            raise KeyboardInterrupt

        def spying_abandon(client, ticket):
            abandoned.append(ticket.request_id)
            return real_abandon(client, ticket)

        lib.tutel_wait_for, lib.tutel_abandon = interrupted_wait_for, spying_abandon
        self.addCleanup(setattr, lib, "tutel_abandon", real_abandon)
        self.addCleanup(setattr, lib, "tutel_wait_for", real_wait_for)
        with self.assertRaises(KeyboardInterrupt):
            layer.forward(x)
        self.assertEqual(len(abandoned), 1)
        self.assertNotEqual(abandoned[0], 0)
        with self.assertRaises(tuteld.TutelError):  # nothing waits for a backward
            layer.backward(np.zeros((8, M)))
        # The session goes on: the next forward's wait completes the abandoned one, and the
        # default backward pairs with the new forward.
        x2 = random_inputs(self.rng, p, (8, M))
        y2, _ = layer.forward(x2)
        y2_ref, _, saved2 = ref.forward(p, x2, K, F)
        self.assert_close(y2, y2_ref, "y after the interrupted forward")
        dy2 = self.rng.normal(0, 1, y2.shape)
        self.assert_close(layer.backward(dy2), ref.backward(p, saved2, dy2, 0.0)[0], "dx of the new forward")
        self.assertEqual(len(abandoned), 1)

    def test_a_request_timeout_abandons_the_request_and_the_session_goes_on(self):
        # The daemon stopped (SIGSTOP: alive, its socket open, nothing answers): the forward gives
        # up at request_timeout, abandons its request, and once the daemon runs again the session
        # serves as before.
        p, x = random_case(self.rng, 8)
        ref.write_safetensors(os.path.join(self.daemon.checkpoints, "t-init.safetensors"),
                              {ref.TUTEL_NAMES[n]: v for n, v in p.items()})
        with tuteld.Client(self.daemon.client_socket, request_timeout=0.3) as client:
            layer = client.create_layer(f'name = "t"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\n'
                                        f'k = {K}\ncapacity_factor = {F}\nweights = "t-init.safetensors"\n')
            self.daemon.process.send_signal(signal.SIGSTOP)
            try:
                wait_until_stopped(self.daemon.process.pid)
                with self.assertRaises(tuteld.TutelError) as e:
                    layer.forward(x)
            finally:
                self.daemon.process.send_signal(signal.SIGCONT)
            self.assertEqual(e.exception.name, "Timeout", str(e.exception))
            self.assertIn("abandoned", str(e.exception))
            with self.assertRaises(tuteld.TutelError):  # the abandoned forward waits for no backward
                layer.backward(np.zeros((8, M)))
            y_ref, _, saved = ref.forward(p, x, K, F)
            y, _ = layer.forward(x)
            self.assert_close(y, y_ref, "y after the timeout")
            dy = self.rng.normal(0, 1, y.shape)
            self.assert_close(layer.backward(dy), ref.backward(p, saved, dy, 0.0)[0], "dx after the timeout")

    def test_timeouts_are_checked(self):
        for bad in (-1, 0, float("nan"), float("inf"), "1"):
            with self.assertRaises(ValueError):
                tuteld.Client(self.daemon.client_socket, request_timeout=bad)
            with self.assertRaises(ValueError):
                tuteld.Client(self.daemon.client_socket, control_timeout=bad)
        with tuteld.Client(self.daemon.client_socket, request_timeout=30, control_timeout=30,
                           name="bounded") as client:
            p, x = random_case(self.rng, 8)
            ref.write_safetensors(os.path.join(self.daemon.checkpoints, "t-init.safetensors"),
                                  {ref.TUTEL_NAMES[n]: v for n, v in p.items()})
            layer = client.create_layer(f'name = "t"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\n'
                                        f'k = {K}\ncapacity_factor = {F}\nweights = "t-init.safetensors"\n')
            self.assert_close(layer.infer(x)[0], ref.forward(p, x, K, F)[0], "y with timeouts set")

    def test_inference_keeps_nothing_for_backward(self):
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        y, info = layer.infer(x)
        self.assert_close(y, ref.forward(p, x, K, F)[0], "y of infer")
        with self.assertRaises(tuteld.TutelError):
            layer.backward(np.zeros_like(y))

    def test_inputs_of_every_layout_reach_the_daemon_alike(self):
        # The module passes a writable float32 array's memory through the buffer protocol and a
        # read-only one through array.ctypes; a strided or float64 one is copied first.
        p, x = random_case(self.rng, 6)
        layer = self.make_layer(p)
        y_ref = ref.forward(p, x, K, F)[0]
        x32 = x.astype(np.float32)
        read_only = np.frombuffer(x32.tobytes(), np.float32).reshape(6, M)
        self.assertFalse(read_only.flags.writeable)
        strided = np.empty((6, 2 * M), np.float32)[:, ::2]
        strided[...] = x32
        for what, given in (("float32", x32), ("read-only", read_only), ("strided", strided), ("float64", x)):
            y, _ = layer.infer(given)
            self.assertEqual((y.shape, y.dtype), ((6, M), np.float32), what)
            self.assert_close(y, y_ref, f"y of a {what} x")
        # The leading shape is kept, a single token (one dimension) included.
        self.assert_close(layer.infer(x32.reshape(2, 3, M))[0], y_ref.reshape(2, 3, M), "y of x [2, 3, M]")
        self.assert_close(layer.infer(x32[0])[0], ref.forward(p, x[:1], K, F)[0][0], "y of x [M]")
        # A read-only dy too, and dx in dy's leading shape.
        y, _ = layer.forward(x32.reshape(2, 3, M))
        dy = np.frombuffer(np.ones(6 * M, np.float32).tobytes(), np.float32).reshape(2, 3, M)
        dx = layer.backward(dy)
        self.assertEqual((dx.shape, dx.dtype), ((2, 3, M), np.float32))
        _, _, saved = ref.forward(p, x, K, F)
        dx_ref = ref.backward(p, saved, np.ones((6, M)), 0.0)[0].reshape(2, 3, M)
        self.assert_close(dx, dx_ref, "dx of a read-only dy")

    def test_a_layer_attached_again_is_the_same_layer(self):
        p, x = random_case(self.rng, 8)
        self.make_layer(p).release()
        other = tuteld.Client(self.daemon.client_socket)
        self.addCleanup(other.close)
        y, _ = other.attach_layer("moe").infer(x)
        self.assert_close(y, ref.forward(p, x, K, F)[0], "y through the attached layer")

    def test_bad_input_is_a_clear_error_and_changes_nothing(self):
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        for bad in (np.zeros((4, M + 1)), np.zeros(M - 1), np.float32(1.0), np.zeros((0, M + 1))):
            with self.assertRaises(ValueError):
                layer.forward(bad)
        with self.assertRaises(tuteld.TutelError) as e:
            self.client.attach_layer("missing")
        self.assertEqual(e.exception.name, "NotFound")
        self.assertIn("missing", str(e.exception))
        with self.assertRaises(tuteld.TutelError) as e:
            self.client.create_layer('name = "broken"\nexperts = 0\n')
        self.assertEqual(e.exception.name, "InvalidArgument")
        with self.assertRaises(tuteld.TutelError) as e:
            layer.load("../../etc/passwd")
        self.assertIn("..", str(e.exception))
        # Numbers only (complex lost its imaginary part), and no NUL in a path or a name (ctypes
        # cut the string there: "a\0b" saved to "a").
        for bad in (np.zeros((2, M), np.complex64), np.array([["x"] * M]), np.array([[None] * M])):
            with self.assertRaises(TypeError):
                layer.forward(bad)
        with self.assertRaises(ValueError):
            layer.save("a\0b.safetensors")
        self.assertFalse(os.path.exists(os.path.join(self.daemon.checkpoints, "a")))
        with self.assertRaises(ValueError):
            self.client.attach_layer("moe\0")
        with self.assertRaises(ValueError):
            tuteld.Client(self.daemon.client_socket + "\0x")
        with self.assertRaises(tuteld.TutelError) as e:
            layer.forward(np.zeros((1_000_000, M), np.float32))  # past the 16 MiB data region
        self.assertEqual(e.exception.name, "ResourceExhausted")
        self.assertIn("arena_bytes", str(e.exception))
        # The layer still computes what it did.
        self.assert_close(layer.infer(x)[0], ref.forward(p, x, K, F)[0], "y after the refusals")

    def test_closed_handles_refuse_calls(self):
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        layer.release()
        with self.assertRaises(tuteld.TutelError) as e:
            layer.infer(x)
        self.assertIn("released", str(e.exception))
        layer2 = self.client.attach_layer("moe")
        self.client.close()
        with self.assertRaises(tuteld.TutelError) as e:
            layer2.infer(x)
        self.assertIn("closed", str(e.exception))

    def test_discarded_and_abandoned_forwards_leave_the_daemon(self):
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        _, kept = layer.forward(x)
        _, skipped = layer.forward(x)
        self.assertEqual(self.daemon.pending_backwards("moe"), 2)
        layer.discard(skipped.sequence)
        self.assertEqual(self.daemon.pending_backwards("moe"), 1)
        layer.discard(skipped.sequence)  # no longer pending: no error
        with self.assertRaises(tuteld.TutelError):
            layer.backward(np.zeros((8, M)), sequence=skipped.sequence)
        # An abandoned wait (the request timeout of a stopped daemon): discarded at the next call.
        with tuteld.Client(self.daemon.client_socket, request_timeout=0.3) as client:
            other = client.attach_layer("moe")
            self.daemon.process.send_signal(signal.SIGSTOP)
            try:
                wait_until_stopped(self.daemon.process.pid)
                with self.assertRaises(tuteld.TutelError):
                    other.forward(x)
            finally:
                self.daemon.process.send_signal(signal.SIGCONT)
            # The library queued its discard at the abandon (the module queues none of its own,
            # which cost the next call a request timeout more while the daemon was stuck).
            self.assertEqual(len(other._discards), 0)
            other.infer(x)  # the discard goes with the next request
            self.assertEqual(self.daemon.pending_backwards("moe"), 1)
        y_ref, _, saved = ref.forward(p, x, K, F)
        dy = self.rng.normal(0, 1, (8, M))
        self.assert_close(layer.backward(dy, sequence=kept.sequence), ref.backward(p, saved, dy, 0.0)[0], "dx")
        self.assertEqual(self.daemon.pending_backwards("moe"), 0)

    def test_errors_survive_pickling(self):
        # A multiprocessing worker's error comes back pickled: unpickling called __init__ without
        # the code (BrokenProcessPool; a Pool's get() never returned).
        e = tuteld.TutelError(-2, "no layer 'x'")
        back = pickle.loads(pickle.dumps(e))
        self.assertEqual((back.code, back.name, str(back)), (-2, "NotFound", "no layer 'x'"))
        self.assertEqual(copy.copy(e).code, -2)

    def test_a_forked_child_is_refused_even_while_a_parent_thread_holds_the_client(self):
        # A thread of the parent inside a call at the fork held the client's lock, which no thread
        # of the child would ever release: the child's first call waited for ever.
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        client = layer._client
        inside, leave = threading.Event(), threading.Event()

        def hold():
            with client._lock:
                inside.set()
                leave.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        self.assertTrue(inside.wait(10))
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    try:
                        layer.infer(x)
                    except tuteld.TutelError as e:
                        code = 0 if e.name == "Unavailable" and "forked" in str(e) else 2
                    client.close()  # the child's copy, without the lock
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            self.assertTrue(done, "the forked child waited on its parent's lock")
            self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        finally:
            leave.set()
            holder.join()
        y, _ = layer.forward(x)  # the parent's session goes on
        self.assertEqual(y.shape, (8, M))

    def test_a_forked_child_reattaches_through_its_own_client(self):
        # What the refusal tells a child to do: connect a client of its own, attach, and drop the
        # parent's handle (tuteld.nn.reattach's order). Dropping it took the parent's lock, which
        # refused: the remedy failed the way the mistake did.
        p, x = random_case(self.rng, 8)
        layer = self.make_layer(p)
        expected, _ = layer.infer(x)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                try:
                    own = tuteld.Client(self.daemon.client_socket)
                    twin = own.attach_layer("moe")
                    layer.release()
                    y, _ = twin.infer(x)
                    said = b"same" if np.array_equal(y, expected) else b"different outputs"
                    own.close()
                except Exception as e:  # noqa: BLE001 (reported to the parent)
                    said = repr(e).encode()
                os.write(write_end, said)
            finally:
                os._exit(0)
        os.close(write_end)
        said = os.read(read_end, 4096)
        os.close(read_end)
        os.waitpid(pid, 0)
        self.assertEqual(said, b"same")
        np.testing.assert_array_equal(layer.infer(x)[0], expected)  # the parent's handle serves on

    def test_dropped_handles_go_without_the_cycle_collector(self):
        # A dropped Layer's handle goes back at its client's next call; a dropped client and its
        # layers end the session at once, not when the cycle collector happens to run.
        p, x = random_case(self.rng, 8)
        self.make_layer(p).release()  # creates "moe"
        gc.disable()
        self.addCleanup(gc.enable)
        layer = self.client.attach_layer("moe")
        dead_layer = weakref.ref(layer)
        del layer
        self.assertIsNone(dead_layer())
        self.assertEqual(len(self.client._dropped_handles), 1)
        self.client.ping()
        self.assertEqual(len(self.client._dropped_handles), 0)
        client = tuteld.Client(self.daemon.client_socket)
        layer = client.attach_layer("moe")
        self.assertEqual(layer.infer(x)[0].shape, (8, M))
        dead_client, dead_layer = weakref.ref(client), weakref.ref(layer)
        del client, layer
        self.assertIsNone(dead_layer())
        self.assertIsNone(dead_client())

    def test_a_failed_open_releases_its_handle_once(self):
        p, _ = random_case(self.rng, 8)
        self.make_layer(p).release()
        released = []
        real_release, real_dims = tuteld._lib.tutel_layer_release, tuteld._lib.tutel_layer_dims
        def counting_release(handle):
            released.append(handle)
            real_release(handle)
        tuteld._lib.tutel_layer_release = counting_release
        tuteld._lib.tutel_layer_dims = lambda *args: -11  # fails after the handle was made
        try:
            with self.assertRaises(tuteld.TutelError):
                self.client.attach_layer("moe")
            tuteld._lib.tutel_layer_dims = real_dims
            gc.collect()
            self.client.ping()  # a finalizer's queue would be released here
            self.assertEqual(len(released), 1, released)
            layer = self.client.attach_layer("moe")
            self.assertEqual(layer.name, "moe")
        finally:
            tuteld._lib.tutel_layer_release, tuteld._lib.tutel_layer_dims = real_release, real_dims

    def test_a_missing_daemon_is_a_clear_error(self):
        with self.assertRaises(tuteld.TutelError) as e:
            tuteld.Client(os.path.join(self.daemon.dir, "nobody.sock"))
        self.assertIn("nobody.sock", str(e.exception))
        self.assertEqual(e.exception.name, "Unavailable")

    def test_a_refused_uid_raises_the_daemons_code(self):
        other = Daemon(uids=[os.getuid() + 1])  # a tenant that does not admit this process
        self.addCleanup(other.stop)
        with self.assertRaises(tuteld.TutelError) as e:
            tuteld.Client(other.client_socket)
        self.assertEqual(e.exception.name, "PermissionDenied", str(e.exception))
        self.assertIn("belongs to no tenant", str(e.exception))

    def test_a_tenant_with_a_secret_needs_it(self):
        secret_dir = tempfile.mkdtemp(prefix="tutel-secret-")
        self.addCleanup(shutil.rmtree, secret_dir, True)
        secret = os.path.join(secret_dir, "secret")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("python-tenant-secret-0123456789\n")
        guarded = Daemon(extra_tenant=f'secret_file = "{secret}"\n')
        self.addCleanup(guarded.stop)
        os.environ.pop("TUTEL_SECRET_FILE", None)
        with self.assertRaises(tuteld.TutelError) as e:
            tuteld.Client(guarded.client_socket)
        self.assertEqual(e.exception.name, "PermissionDenied", str(e.exception))
        self.assertIn("requires its secret", str(e.exception))
        with tuteld.Client(guarded.client_socket, secret_file=secret) as client:
            self.assertEqual(client.tenant, "default")
            client.ping()


if __name__ == "__main__":
    unittest.main()
