"""tuteld.nn.MoE under PyTorch autograd against the float64 reference: x's gradient, the
gradients the daemon accumulates (seen through its optimizer step), two forwards in flight
before their backwards, inputs that need no gradient, and inference. Skips without PyTorch
(tools/bootstrap.sh does not install it)."""

import gc
import os
import random
import unittest

import numpy as np

import moe_reference as ref
from daemon import Daemon
from test_client import (ATOL, RTOL, E, F, H, K, LR, M, assert_group_stepped, free_port, group_spec,
                         random_case, random_inputs, run_ranks)

# Every daemon these tests start keeps UCX on loopback (test_client sets it too).
os.environ["UCX_NET_DEVICES"] = "lo"

try:
    import torch
    import torch.utils.checkpoint

    import tuteld
    import tuteld.nn
except ImportError as e:  # only PyTorch is optional
    if "torch" not in str(e):
        raise
    torch = None


@unittest.skipIf(torch is None, "PyTorch is not installed (python3-torch)")
class TorchModuleTest(unittest.TestCase):
    def setUp(self):
        self.seed = random.SystemRandom().randrange(2**63)
        self.rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed % 2**32)
        self.daemon = Daemon()
        self.addCleanup(self.daemon.stop)
        self.client = tuteld.Client(self.daemon.client_socket)
        self.addCleanup(self.client.close)

    def make_moe(self, p):
        ref.write_safetensors(os.path.join(self.daemon.checkpoints, "init.safetensors"),
                              {ref.TUTEL_NAMES[n]: v for n, v in p.items()})
        spec = (f'name = "moe"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\nk = {K}\n'
                f'capacity_factor = {F}\nweights = "init.safetensors"\n'
                f'optimizer = {{ kind = "sgd", lr = {LR} }}\n')
        return tuteld.nn.MoE(self.client, spec)

    def assert_close(self, actual, expected, what):
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what} (seed {self.seed})")

    def assert_stepped(self, moe, p, grads, lr=None):
        moe.step(lr=lr)
        moe.layer.save("after.safetensors")
        stored = ref.read_safetensors(os.path.join(self.daemon.checkpoints, "after.safetensors"))
        for n, tutel_name in ref.TUTEL_NAMES.items():
            self.assert_close(stored[tutel_name], p[n] - (LR if lr is None else lr) * grads[n],
                              f"{tutel_name} after the step")

    def test_gradients_through_autograd_match_the_reference(self):
        p, x1 = random_case(self.rng, 12)
        x2 = random_inputs(self.rng, p, (12, M))
        moe = self.make_moe(p)
        head = torch.from_numpy(self.rng.normal(0, 1, (M,)))
        xs = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (x1, x2)]
        # Two forwards in flight, then one backward of their sum (gradient accumulation):
        # autograd runs the two daemon backwards in an order of its own.
        outs = [moe(x) for x in xs]
        for y, _ in outs:
            self.assertEqual(y.dtype, torch.float64)  # x's dtype comes back
        loss = sum((y * head).sum() + 0.1 * l_aux for y, l_aux in outs)
        loss.backward()
        grads = {n: 0.0 for n in ref.TUTEL_NAMES}
        for x_in, x, (y, _) in zip(xs, (x1, x2), outs):
            y_ref, _, saved = ref.forward(p, x, K, F)
            self.assert_close(y.detach().numpy(), y_ref, "y")
            dx_ref, g = ref.backward(p, saved, np.broadcast_to(head.numpy(), y_ref.shape), 0.1)
            self.assert_close(x_in.grad.numpy(), dx_ref, "x's gradient")
            grads = {n: grads[n] + g[n] for n in grads}
        self.assert_stepped(moe, p, grads)

    def test_inputs_without_gradient_still_train_the_experts(self):
        p, x = random_case(self.rng, 10)
        moe = self.make_moe(p)
        y, l_aux = moe(torch.from_numpy(x).float())  # no requires_grad anywhere upstream
        self.assertTrue(y.requires_grad)
        (y.sum() + l_aux).backward()
        _, _, saved = ref.forward(p, x, K, F)
        self.assert_stepped(moe, p, ref.backward(p, saved, np.ones((10, M)), 1.0)[1])

    def test_a_schedules_learning_rate_reaches_the_daemons_step(self):
        # torch's scheduler runs over the model's torch optimizer; the daemon's layers step with
        # its value (tuteld.nn.step(model, lr=...)), against the reference's p - lr * grad.
        p, x = random_case(self.rng, 10)
        moe = self.make_moe(p)
        torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        scheduler = torch.optim.lr_scheduler.StepLR(torch_optimizer, step_size=1, gamma=0.25)
        torch_optimizer.step()
        scheduler.step()
        lr = scheduler.get_last_lr()[0]
        self.assertAlmostEqual(lr, LR * 0.25)
        y, l_aux = moe(torch.from_numpy(x).float())
        (y.sum() + l_aux).backward()
        _, _, saved = ref.forward(p, x, K, F)
        self.assert_stepped(moe, p, ref.backward(p, saved, np.ones((10, M)), 1.0)[1], lr=lr)
        for bad in (-0.5, float("nan"), float("inf")):
            with self.assertRaisesRegex(ValueError, "finite number >= 0"):
                moe.step(lr=bad)

    def test_a_frozen_or_unused_module_is_not_stepped(self):
        # torch's optimizers skip a parameter whose .grad is None: so does the daemon's step,
        # whose SGD momentum or AdamW decay would move the layer otherwise.
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        proj = torch.nn.Linear(M, M)
        model = torch.nn.ModuleDict({"proj": proj, "moe": moe})
        xt = torch.from_numpy(x).float()
        tuteld.nn.zero_grad(model)
        proj(xt).sum().backward()  # the layer unused this iteration
        tuteld.nn.step(model)
        self.assertEqual(self.daemon.layer_field("moe", "step"), 0)
        moe.requires_grad_(False)  # frozen: x still gets its gradient through it
        xg = xt.clone().requires_grad_()
        y, l_aux = moe(proj(xg))
        (y.sum() + l_aux).backward()
        self.assertIsNotNone(xg.grad)
        tuteld.nn.step(model)
        self.assertEqual(self.daemon.layer_field("moe", "step"), 0)
        with torch.no_grad():
            self.assert_close(moe(xt)[0].numpy(), ref.forward(p, x, K, F)[0], "y of the unstepped layer")

    def test_layers_of_one_name_on_two_daemons_are_each_stepped(self):
        other = Daemon()
        self.addCleanup(other.stop)
        other_client = tuteld.Client(other.client_socket)
        self.addCleanup(other_client.close)
        spec = (f'name = "moe"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\nk = {K}\ninit_seed = 3\n'
                f'optimizer = {{ kind = "sgd", lr = {LR} }}\n')
        model = torch.nn.ModuleList([tuteld.nn.MoE(self.client, spec), tuteld.nn.MoE(other_client, spec)])
        xt = torch.from_numpy(random_case(self.rng, 6)[1]).float()
        for m in model:
            y, l_aux = m(xt)
            (y.sum() + l_aux).backward()
        tuteld.nn.step(model)
        self.assertEqual(self.daemon.layer_field("moe", "step"), 1)
        self.assertEqual(other.layer_field("moe", "step"), 1)

    def test_a_forked_child_cannot_use_its_parents_client(self):
        # The child shares the parent's socket and rings: its request would take the parent's
        # results. It is refused, and the parent goes on.
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        xt = torch.from_numpy(x).float()
        with torch.no_grad():
            before = moe(xt)[0]
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                try:
                    with torch.no_grad():
                        moe(xt)
                    said = b"the child's forward ran"
                except tuteld.TutelError as e:
                    said = b"refused" if "forked from it" in str(e) else str(e).encode()
                os.write(write_end, said)
            finally:
                os._exit(0)
        os.close(write_end)
        said = os.read(read_end, 4096)
        os.close(read_end)
        os.waitpid(pid, 0)
        self.assertEqual(said, b"refused")
        with torch.no_grad():
            torch.testing.assert_close(moe(xt)[0], before, rtol=0, atol=0)

    def test_a_backward_interrupted_after_it_was_sent_says_so_on_a_retry(self):
        # Ctrl-C while the backward waits: the daemon may still run it, so a retry does not say
        # "backwarded already" (the user never saw it complete) but what to do.
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        y, l_aux = moe(torch.from_numpy(x).float())
        loss = y.sum() + l_aux
        lib = tuteld._lib
        real_wait_for = lib.tutel_wait_for

        def interrupted_wait_for(*args):
            lib.tutel_wait_for = real_wait_for
            raise KeyboardInterrupt

        lib.tutel_wait_for = interrupted_wait_for
        self.addCleanup(setattr, lib, "tutel_wait_for", real_wait_for)
        with self.assertRaises(KeyboardInterrupt):
            loss.backward(retain_graph=True)
        with self.assertRaisesRegex(RuntimeError, "interrupted or timed out after it was sent.*zero_grad"):
            loss.backward()

    def test_a_model_carries_on_through_a_restarted_daemon(self):
        p, x = random_case(self.rng, 12)
        local = self.make_moe(p)
        group = tuteld.nn.MoE(self.client, group_spec(0, free_port(), size=1).replace('"moe"', '"moe_g"'))
        model = torch.nn.ModuleList([local, group])

        def train_step():
            xt = torch.tensor(x, requires_grad=True)
            loss = sum(y.sum() + l_aux for y, l_aux in (m(xt) for m in model))
            loss.backward()
            tuteld.nn.step(model)
            tuteld.nn.zero_grad(model)

        def outputs():
            with torch.no_grad():
                return [m(torch.tensor(x))[0].numpy() for m in model]

        train_step()
        before = outputs()
        pending = local(torch.tensor(x, requires_grad=True))[0]  # its backward never runs
        self.daemon.restart()  # checkpoints both; the group layer is not restored at start
        with self.assertRaises(tuteld.TutelError) as lost:
            outputs()
        self.assertEqual(lost.exception.name, "Unavailable", lost.exception)
        client = tuteld.Client(self.daemon.client_socket)
        self.addCleanup(client.close)
        tuteld.nn.reattach(model, client)
        for got, want, m in zip(outputs(), before, model):
            np.testing.assert_array_equal(got, want, err_msg=f"{m.layer.name} after the restart")
        self.assertEqual([m.layer.step() for m in model], [1, 1])  # no gradients: not applied
        with self.assertRaises(tuteld.TutelError):  # its forward went with the old session
            pending.sum().backward()
        train_step()  # and training goes on
        self.assertEqual(self.daemon.layer_field("moe", "step"), 2)
        self.assertEqual(self.daemon.layer_field("moe_g", "step"), 2)
        # A layer without [group] that the daemon no longer holds is not created afresh from the
        # spec (its training would restart from the initial weights, silently): NotFound.
        client.attach_layer("moe").destroy()
        with self.assertRaises(tuteld.TutelError) as gone:
            local.reattach(client)
        self.assertEqual(gone.exception.name, "NotFound", gone.exception)

    def test_no_grad_is_inference_and_eval_mode_keeps_gradients_on(self):
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        with torch.no_grad():
            y, _ = moe(torch.from_numpy(x).float())
        self.assert_close(y.numpy(), ref.forward(p, x, K, F)[0], "y under no_grad")
        moe.eval()
        with torch.no_grad():
            y, _ = moe(torch.from_numpy(x).float())
        self.assertFalse(y.requires_grad)
        # Nothing was kept for a backward: the daemon has no training forward to match one.
        with self.assertRaises(tuteld.TutelError):
            moe.layer.backward(np.zeros((6, M), np.float32))
        # Eval mode with gradients on is differentiable, as torch's own layers are (the experts'
        # parameters need gradients even where x needs none); a dropped graph is discarded.
        y, l_aux = moe(torch.from_numpy(x).float())
        self.assertTrue(y.requires_grad)
        self.assert_close(y.detach().numpy(), ref.forward(p, x, K, F)[0], "y in eval mode")
        del y, l_aux
        gc.collect()
        moe.layer.infer(x.astype(np.float32))  # the next call sends the discard
        self.assertEqual((len(moe.layer._pending), len(moe.layer._discards)), (0, 0))

    def test_a_frozen_module_runs_inference_and_keeps_nothing(self):
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        moe.requires_grad_(False)  # a frozen backbone, in train mode, grad enabled
        y, _ = moe(torch.from_numpy(x).float())
        self.assertFalse(y.requires_grad)
        self.assertEqual(len(moe.layer._pending), 0)
        with self.assertRaises(tuteld.TutelError):
            moe.layer.backward(np.zeros((6, M), np.float32))

    def test_eval_mode_gives_x_its_gradient(self):
        # A frozen eval-mode block with trainable layers below it: the gradient reaches x (and
        # the experts, whose anchor needs one, as torch's eval mode leaves gradients on) against
        # the reference.
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        moe.eval()
        head = torch.from_numpy(self.rng.normal(0, 1, (M,)))
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        y, l_aux = moe(xt)
        ((y * head).sum() + 0.1 * l_aux).backward()
        y_ref, _, saved = ref.forward(p, x, K, F)
        self.assert_close(y.detach().numpy(), y_ref, "y in eval mode")
        dx_ref, grads = ref.backward(p, saved, np.broadcast_to(head.numpy(), y_ref.shape), 0.1)
        self.assert_close(xt.grad.numpy(), dx_ref, "x's gradient in eval mode")
        self.assertEqual(len(moe.layer._pending), 0)
        self.assert_stepped(moe, p, grads)

    def test_eval_mode_with_gate_noise_warns_that_x_gets_no_gradient(self):
        # Its training forwards draw noise, which an eval-mode forward must not: an inference.
        spec = (f'name = "noisy"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\nk = {K}\ninit_seed = 4\n'
                f'gate_noise = 1.0\n')
        moe = tuteld.nn.MoE(self.client, spec)
        moe.eval()
        xt = torch.from_numpy(random_case(self.rng, 6)[1]).float().requires_grad_()
        with self.assertWarnsRegex(UserWarning, "no gradient reaches x"):
            y, _ = moe(xt)
        self.assertFalse(y.requires_grad)
        self.assertEqual(len(moe.layer._pending), 0)
        # Known from then on: the next eval forward is the inference alone, no refused request
        # (nor its discard) before it.
        calls = []
        real_forward = moe.layer.forward

        def spying_forward(x, training=True, noise=True):
            calls.append(training)
            return real_forward(x, training=training, noise=noise)

        moe.layer.forward = spying_forward
        y, _ = moe(xt)
        self.assertEqual(calls, [False])
        self.assertEqual(len(moe.layer._discards), 0)

    def test_reentrant_checkpointing_recomputes_with_the_noise_it_first_drew(self):
        # torch.utils.checkpoint runs the forward under no_grad, then again in the backward with
        # torch's generator restored: the module's noise key comes from that generator, so the
        # recomputation routes as the first pass did, and both equal a plain forward drawn from
        # the same seed (the first pass, under no_grad in train mode, draws the noise too).
        def noisy(name):
            return tuteld.nn.MoE(self.client, f'name = "{name}"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\n'
                                              f'k = {K}\ninit_seed = 4\ngate_noise = 1.0\nnoise_seed = 3\n'
                                              f'optimizer = {{ kind = "sgd", lr = {LR} }}\n')
        plain, checkpointed = noisy("plain"), noisy("checkpointed")
        self.assertEqual(plain.layer.gate_noise, 1.0)
        x = random_case(self.rng, 12)[1]
        head = torch.from_numpy(self.rng.normal(0, 1, (M,))).float()
        seed = int(self.rng.integers(2**32))
        outs = []
        for moe, run in ((plain, lambda m, xt: m(xt)),
                         (checkpointed, lambda m, xt: torch.utils.checkpoint.checkpoint(m, xt, use_reentrant=True))):
            xt = torch.from_numpy(x).float().requires_grad_()
            torch.manual_seed(seed)
            y, l_aux = run(moe, xt)
            ((y * head).sum() + 0.1 * l_aux).backward()
            outs.append((y.detach().numpy(), float(l_aux), xt.grad.numpy()))
        (y1, l1, dx1), (y2, l2, dx2) = outs
        np.testing.assert_array_equal(y2, y1, err_msg=f"y (seed {self.seed})")
        self.assertEqual(l2, l1)
        np.testing.assert_array_equal(dx2, dx1, err_msg=f"x's gradient (seed {self.seed})")
        # The daemon's gradients alike: both layers step to the same parameters.
        plain.step()
        checkpointed.step()
        np.testing.assert_array_equal(checkpointed.layer.infer(x)[0], plain.layer.infer(x)[0])
        # Another seed, other noise: the key did reach the daemon.
        torch.manual_seed(seed ^ 1)
        with torch.no_grad():
            self.assertFalse(np.array_equal(plain(torch.from_numpy(x).float())[0].numpy(), y1))

    def test_a_second_derivative_through_the_layer_raises(self):
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        xt = torch.from_numpy(x).float().requires_grad_()
        h = xt + moe(xt)[0]
        (g,) = torch.autograd.grad(h.pow(2).sum(), xt, create_graph=True)
        with self.assertRaises(RuntimeError):
            g.pow(2).sum().backward()

    def test_a_frozen_module_gives_x_its_gradient_and_keeps_the_experts(self):
        # Frozen: (x1, head1) gives x1 its gradient and the experts none; then unfrozen: (x2,
        # head2). The step is the second backward's alone.
        p, x1 = random_case(self.rng, 6)
        x2 = random_inputs(self.rng, p, (6, M))
        moe = self.make_moe(p)
        heads = [torch.from_numpy(self.rng.normal(0, 1, (M,))) for _ in range(2)]
        moe.requires_grad_(False)
        x1t = torch.tensor(x1, dtype=torch.float64, requires_grad=True)
        y, l_aux = moe(x1t)
        ((y * heads[0]).sum() + 0.1 * l_aux).backward()
        _, _, saved1 = ref.forward(p, x1, K, F)
        dx1, _ = ref.backward(p, saved1, np.broadcast_to(heads[0].numpy(), (6, M)), 0.1)
        self.assert_close(x1t.grad.numpy(), dx1, "the frozen module's x gradient")
        moe.requires_grad_(True)
        y, l_aux = moe(torch.from_numpy(x2))
        ((y * heads[1]).sum() + 0.1 * l_aux).backward()
        _, _, saved2 = ref.forward(p, x2, K, F)
        _, grads = ref.backward(p, saved2, np.broadcast_to(heads[1].numpy(), (6, M)), 0.1)
        self.assert_stepped(moe, p, grads)

    def test_a_second_backward_through_the_same_graph_says_why(self):
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        y, l_aux = moe(torch.from_numpy(x).float().requires_grad_())
        loss = y.sum() + l_aux
        loss.backward(retain_graph=True)
        with self.assertRaisesRegex(RuntimeError, "retain_graph"):
            loss.backward()

    def test_a_dropped_graph_is_discarded_in_the_daemon(self):
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        xt = torch.from_numpy(x).float()
        for _ in range(3):
            y, l_aux = moe(xt)  # a training forward whose graph goes unused: each call discards
            del y, l_aux        # the forwards dropped before it
        self.assertEqual(self.daemon.pending_backwards("moe"), 1)
        self.assertEqual(len(moe.layer._discards), 1)
        # backward(inputs=...) that does not reach the layer drops its graph too.
        w = torch.zeros(M, requires_grad=True)
        y, l_aux = moe(xt)
        (y.sum() + (w * w).sum()).backward(inputs=[w])
        del y, l_aux
        self.assertEqual(self.daemon.pending_backwards("moe"), 1)
        self.assertEqual(len(moe.layer._discards), 1)
        with torch.no_grad():
            moe(xt)  # the layer's next call discards them
        self.assertEqual(self.daemon.pending_backwards("moe"), 0)
        self.assertEqual(len(moe.layer._pending), 0)
        y, l_aux = moe(xt)
        (y.sum() + l_aux).backward()  # the layer goes on as before
        self.assertEqual(self.daemon.pending_backwards("moe"), 0)

    def test_an_empty_batch_is_a_step_that_changes_nothing(self):
        # Through the daemon, as every batch (an expert-parallel rank's peers need its part).
        p, _ = random_case(self.rng, 6)
        moe = self.make_moe(p)
        xt = torch.zeros(3, 0, M, requires_grad=True)
        y, l_aux = moe(xt)
        self.assertEqual(tuple(y.shape), (3, 0, M))
        self.assertEqual(float(l_aux), 0.0)
        self.assertEqual(self.daemon.pending_backwards("moe"), 1)
        (y.sum() + l_aux).backward()
        self.assertEqual(tuple(xt.grad.shape), (3, 0, M))
        self.assertEqual(len(moe.layer._pending), 0)
        self.assertEqual(self.daemon.pending_backwards("moe"), 0)
        self.assertEqual(moe.layer.grad_norm(), 0.0)
        with torch.no_grad():
            self.assertEqual(tuple(moe(torch.zeros(0, M))[0].shape), (0, M))

    def test_an_expert_parallel_rank_with_an_empty_batch_keeps_its_peers_going(self):
        # Two daemons, a group MoE of two ranks; rank 1's first micro-batch is empty: every
        # forward and backward through autograd completes on both (a rank that skipped one would
        # leave its peer's next collective waiting), y and x.grad are the reference's where
        # there are tokens, and the step sums the ranks' gradients.
        peer = Daemon()
        self.addCleanup(peer.stop)
        daemons = [self.daemon, peer]
        p = random_case(self.rng, 1)[0]
        for d in daemons:
            ref.write_safetensors(os.path.join(d.checkpoints, "init.safetensors"),
                                  {ref.TUTEL_NAMES[n]: v for n, v in p.items()})
        # [micro-batch][rank]: who has tokens.
        xs = [[random_inputs(self.rng, p, (2, 5, M)), np.zeros((2, 0, M))],
              [random_inputs(self.rng, p, (9, M)), random_inputs(self.rng, p, (7, M))]]
        capacities = [K * int(F * -(-max(b[0].size, b[1].size) // M // E)) for b in xs]
        port = free_port()
        results = [[None, None], [None, None]]

        def rank(r):
            with tuteld.Client(daemons[r].client_socket) as client:
                moe = tuteld.nn.MoE(client, group_spec(r, port))
                for m, batch in enumerate(xs):
                    xt = torch.tensor(batch[r], dtype=torch.float32, requires_grad=True)
                    y, l_aux = moe(xt)
                    (y.square().sum() + 0.5 * l_aux).backward()
                    results[m][r] = (y.detach().numpy().astype(np.float64), float(l_aux), xt.grad.numpy())
                moe.step()
                moe.layer.save("after.safetensors")

        errors = run_ranks(rank, 2)
        self.assertEqual(errors, [], f"{errors}\n{self.daemon.log()}\n{peer.log()}")
        grads = {n: np.zeros_like(v) for n, v in p.items()}
        for m, batch in enumerate(xs):
            for r in range(2):
                y, l_aux, dx = results[m][r]
                if batch[r].size == 0:
                    self.assertEqual((y.shape, dx.shape, l_aux), (batch[r].shape, batch[r].shape, 0.0))
                    continue
                # The group's capacity: from the most tokens of a rank (f > 0).
                rows = batch[r].reshape(-1, M)
                y_ref, stats, saved = ref.forward(p, rows, K, F, capacity=capacities[m])
                self.assert_close(y.reshape(-1, M), y_ref, f"y of micro-batch {m}")
                self.assertAlmostEqual(l_aux, stats["l_aux"], delta=1e-5 + 1e-4 * abs(stats["l_aux"]))
                dx_ref, g = ref.backward(p, saved, 2 * y_ref, 0.5)
                self.assert_close(dx.reshape(-1, M), dx_ref, f"x.grad of micro-batch {m}")
                for n in grads:
                    grads[n] += g[n]
        assert_group_stepped(daemons, p, grads, 1e-3, 1e-4, f"seed {self.seed}")

    def test_copy_and_pickle_say_the_parameters_live_in_the_daemon(self):
        import copy
        import pickle

        p, _ = random_case(self.rng, 6)
        moe = self.make_moe(p)
        model = torch.nn.Sequential(torch.nn.Linear(M, M), moe)
        with self.assertRaisesRegex(TypeError, "live in the daemon"):
            copy.deepcopy(model)
        with self.assertRaisesRegex(TypeError, "live in the daemon"):
            pickle.dumps(model)
        with self.assertRaisesRegex(TypeError, "live in the daemon"):
            copy.copy(moe)
        for handle in (self.client, moe.layer):
            with self.assertRaisesRegex(TypeError, "cannot be pickled or copied"):
                pickle.dumps(handle)
        with self.assertRaisesRegex(TypeError, "real floating-point x"):
            moe(torch.ones(3, M, dtype=torch.int64))
        self.assertIn(f"name='moe', model_dim={M}, output_dim={M}, experts={E}", repr(model))

    def make_adamw_moe(self, name, seed):
        spec = (f'name = "{name}"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\nk = {K}\n'
                f'capacity_factor = {F}\ninit_seed = {seed}\n'
                f'optimizer = {{ kind = "adamw", lr = 0.01, weight_decay = 0.01 }}\n')
        return tuteld.nn.MoE(self.client, spec)

    def train_step(self, model, x, head):
        y, l_aux = model(x)
        ((y * head).sum() + 0.1 * l_aux).backward()
        tuteld.nn.step(model)
        tuteld.nn.zero_grad(model)
        return y.detach()

    def test_another_optimizers_state_dict_loads_its_weights_and_starts_this_optimizer_afresh(self):
        # The state_dict says whose optimizer state it holds (torch's per-module metadata, kept
        # by torch.save): an SGD layer's, loaded into an AdamW layer, gives it the weights, and
        # its optimizer starts afresh (zero moments, step 0) rather than taking the momentum for
        # a first moment; nothing is missing or unexpected.
        import io

        spec = (f'name = "sgd_source"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\nk = {K}\n'
                f'capacity_factor = {F}\ninit_seed = 5\noptimizer = {{ kind = "sgd", lr = 0.01, momentum = 0.9 }}\n')
        source = tuteld.nn.MoE(self.client, spec)
        target = self.make_adamw_moe("adamw_target", 6)
        head = torch.from_numpy(self.rng.normal(0, 1, (M,))).float()
        self.train_step(source, torch.from_numpy(self.rng.normal(0, 1, (8, M))).float(), head)
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer)
        with self.assertWarnsRegex(UserWarning, "holds a sgd optimizer's state; this layer's adamw optimizer starts afresh"):
            result = target.load_state_dict(state)
        self.assertEqual((result.missing_keys, result.unexpected_keys), ([], []))
        after = target.state_dict()
        for name in ref.TUTEL_NAMES.values():
            torch.testing.assert_close(after[name], state[name], rtol=0, atol=0)
            for i in (0, 1):
                self.assertEqual(float(after[f"optimizer.state{i}.{name}"].abs().max()), 0.0)
        self.assertEqual(int(after["optimizer.step"]), 0)

    def test_state_dict_holds_the_daemons_state_and_load_state_dict_makes_a_twin(self):
        import io

        first = torch.nn.Sequential(torch.nn.Linear(M, M), self.make_adamw_moe("first", 1))
        second = torch.nn.Sequential(torch.nn.Linear(M, M), self.make_adamw_moe("second", 2))
        head = torch.from_numpy(self.rng.normal(0, 1, (M,))).float()
        xs = [torch.from_numpy(self.rng.normal(0, 1, (8, M))).float() for _ in range(3)]
        for x in xs[:2]:
            self.train_step(first, x, head)

        state = first.state_dict()
        moe_keys = {"1." + name for name in ref.TUTEL_NAMES.values()}
        optimizer_keys = {f"1.optimizer.state{i}.{n}" for i in (0, 1) for n in ref.TUTEL_NAMES.values()}
        self.assertEqual(set(state), {"0.weight", "0.bias", "1.optimizer.step", "1._num_global_experts"}
                         | moe_keys | optimizer_keys)
        self.assertEqual(int(state["1._num_global_experts"]), E)
        self.assertTrue(all(torch.is_tensor(v) for v in state.values()))
        first[1].layer.save("first.safetensors")
        stored = ref.read_safetensors(os.path.join(self.daemon.checkpoints, "first.safetensors"))
        self.assertEqual(set(stored), {key[2:] for key in moe_keys | optimizer_keys})  # no more, no less
        for name, values in stored.items():  # what the daemon holds, exactly
            np.testing.assert_array_equal(state["1." + name].numpy(), values, name)
        self.assertEqual(state["1.optimizer.step"].dtype, torch.int64)
        self.assertEqual(int(state["1.optimizer.step"]), 2)

        # Through torch.save and torch.load, into a model initialised otherwise.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        result = second.load_state_dict(torch.load(buffer))
        self.assertEqual((result.missing_keys, result.unexpected_keys), ([], []))
        # Twins: the same outputs, and after the same AdamW step (its bias correction counts the
        # steps) the same parameters, bit for bit.
        self.assertTrue(torch.equal(self.train_step(first, xs[2], head), self.train_step(second, xs[2], head)))
        after_first, after_second = first.state_dict(), second.state_dict()
        for key in moe_keys:
            self.assertTrue(torch.equal(after_first[key], after_second[key]), key)
        self.assertEqual(int(after_second["1.optimizer.step"]), 3)

    def test_load_state_dict_reports_as_torch_does_and_a_refused_module_stays(self):
        moe = self.make_adamw_moe("moe", 1)
        model = torch.nn.Sequential(torch.nn.Linear(M, M), moe)
        head = torch.from_numpy(self.rng.normal(0, 1, (M,))).float()
        self.train_step(model, torch.from_numpy(self.rng.normal(0, 1, (8, M))).float(), head)
        state = model.state_dict()
        fc2 = "1." + ref.TUTEL_NAMES["w2"]
        gate = "1." + ref.TUTEL_NAMES["wg"]

        def moe_state():  # the parameters, the optimizer state and the step
            return {k: v for k, v in model.state_dict().items() if k.startswith("1.")}

        before = moe_state()
        for broken, says in (({**state, gate: torch.zeros(E, M + 1)}, "size mismatch for 1.gates.0.wg.weight"),
                             ({**state, gate: "not a tensor"}, "expected torch.Tensor"),
                             ({**state, "1.optimizer.step": torch.tensor(2.5)}, "integer scalar"),
                             ({**state, "1.optimizer.step": torch.tensor(-2)}, "not a step count")):
            with self.assertRaisesRegex(RuntimeError, says):
                model.load_state_dict(broken)
            for key, value in moe_state().items():
                self.assertTrue(torch.equal(value, before[key]), f"{key} changed by a refused load ({says})")

        # strict: missing and unexpected keys are reported; strict=False loads what is there.
        missing = {k: v for k, v in state.items() if k != fc2}
        with self.assertRaisesRegex(RuntimeError, "Missing key"):
            model.load_state_dict(missing)
        with self.assertRaisesRegex(RuntimeError, "Unexpected key.*1.experts.extra"):
            model.load_state_dict({**state, "1.experts.extra": torch.zeros(1)})
        new_gate = torch.from_numpy(self.rng.normal(0, 1, (E, M))).float()
        result = model.load_state_dict({**missing, gate: new_gate}, strict=False)
        self.assertEqual(result.missing_keys, [fc2])
        now = moe_state()
        self.assertTrue(torch.equal(now[gate], new_gate))
        self.assertTrue(torch.equal(now[fc2], before[fc2]), "a missing entry keeps the layer's value")

        # Reported and kept, as torch keeps what it finds no entry for: the optimizer state of
        # some tensors only (the others' moments stay), moments without their step (the step
        # stays), and a checkpoint with nothing for this module (nothing changes).
        first_moment, second_moment = ("1.optimizer.state0." + ref.TUTEL_NAMES["w1"],
                                       "1.optimizer.state1." + ref.TUTEL_NAMES["w1"])
        before = moe_state()
        self.assertTrue(before[second_moment].any())
        for partial, says in (({k: v for k, v in state.items() if ".state1." not in k}, "optimizer.state1"),
                              ({k: v for k, v in state.items() if k != "1.optimizer.step"}, "optimizer.step"),
                              ({"0.weight": state["0.weight"], "0.bias": state["0.bias"]}, "1.gates.0.wg.weight")):
            with self.assertRaisesRegex(RuntimeError, "Missing key.*" + says):
                model.load_state_dict(partial)
            result = model.load_state_dict(partial, strict=False)
            self.assertIn("1." + says if not says.startswith("1.") else says, " ".join(result.missing_keys))
            now = moe_state()
            for key in (second_moment, "1.optimizer.step"):
                self.assertTrue(torch.equal(now[key], before[key]), f"{key} changed by a load without it ({says})")
        # Weights alone, as a Tutel MOELayer's state_dict has them (with its buffer of the expert
        # count): strict, and the optimizer starts afresh.
        tutel = {"0.weight": state["0.weight"], "0.bias": state["0.bias"], "1._num_global_experts": torch.tensor(E)}
        tutel.update({"1." + n: torch.from_numpy(self.rng.normal(0, 1, state["1." + n].shape)).float()
                      for n in ref.TUTEL_NAMES.values()})
        with self.assertRaisesRegex(RuntimeError, "_num_global_experts.*this layer has"):
            model.load_state_dict({**tutel, "1._num_global_experts": torch.tensor(E + 1)})
        result = model.load_state_dict(tutel)
        self.assertEqual((result.missing_keys, result.unexpected_keys), ([], []))
        now = moe_state()
        for n in ref.TUTEL_NAMES.values():
            self.assertTrue(torch.equal(now["1." + n], tutel["1." + n]), n)
        self.assertEqual(int(now["1.optimizer.step"]), 0)
        self.assertFalse(now[first_moment].any())
        self.assertEqual(int(now["1._num_global_experts"]), E)
        # An older Tutel's expert tensors, with a leading size-1 dimension, load as Tutel loads
        # them; the same elements in other dimensions (a transposed fc1) are a size mismatch.
        legacy = {**tutel, **{"1." + n: torch.from_numpy(self.rng.normal(0, 1, state["1." + n].shape)).float()
                              .unsqueeze(0) for n in ref.TUTEL_NAMES.values() if n.startswith("experts.")}}
        result = model.load_state_dict(legacy)
        self.assertEqual((result.missing_keys, result.unexpected_keys), ([], []))
        now = moe_state()
        for n in ref.TUTEL_NAMES.values():
            self.assertTrue(torch.equal(now["1." + n], legacy["1." + n].reshape(now["1." + n].shape)), n)
        fc1 = "1." + ref.TUTEL_NAMES["w1"]
        with self.assertRaisesRegex(RuntimeError, "size mismatch for " + fc1):
            model.load_state_dict({**tutel, fc1: tutel[fc1].transpose(1, 2).contiguous()})
        self.assertTrue(torch.equal(moe_state()[fc1], now[fc1]))
        # A state_dict saved before the anchor was left out loads too.
        model.load_state_dict({**state, "1._anchor": torch.empty(0)})

    def test_load_state_dict_exports_the_daemons_state_only_for_what_is_missing(self):
        # The names and shapes are known after one export per layer; a load that gives every
        # entry exports nothing more, one that leaves an entry missing (strict=False) exports
        # once for the value it keeps.
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        state = moe.state_dict()
        exports = []
        real_export = moe.layer.export_state

        def counting_export():
            exports.append(1)
            return real_export()

        moe.layer.export_state = counting_export
        moe.load_state_dict(state)
        self.assertEqual(len(exports), 0)
        partial = {k: v for k, v in state.items() if not k.endswith("batched_fc2_w")}
        result = moe.load_state_dict(partial, strict=False)
        self.assertEqual(result.missing_keys, ["experts.batched_fc2_w"])
        self.assertEqual(len(exports), 1)
        with torch.no_grad():
            self.assert_close(moe(torch.from_numpy(x).float())[0].numpy(), ref.forward(p, x, K, F)[0],
                              "y after the loads")

    def test_a_subclass_keeps_its_own_entries_and_pre_hooks(self):
        class Scaled(tuteld.nn.MoE):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.scale = torch.nn.Parameter(torch.ones(1))
                self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

        spec = (f'name = "sub"\nexperts = {E}\nmodel_dim = {M}\nhidden = {H}\nk = {K}\ninit_seed = 4\n')
        moe = Scaled(self.client, spec)
        state = moe.state_dict()
        self.assertIn("scale", state)
        self.assertIn("calls", state)
        self.assertNotIn("_anchor", state)
        seen = []
        moe._register_load_state_dict_pre_hook(lambda sd, prefix, *rest: seen.append(sorted(sd)))
        result = moe.load_state_dict({**state, "scale": torch.full((1,), 3.0), "calls": torch.tensor(7)})
        self.assertEqual((result.missing_keys, result.unexpected_keys), ([], []))
        self.assertEqual(float(moe.scale), 3.0)
        self.assertEqual(int(moe.calls), 7)
        self.assertEqual(len(seen), 1, "a later pre-hook runs, on what is left for torch")

    def test_a_step_between_a_forward_and_its_backward_makes_the_backward_raise(self):
        # Its activations are of the old parameters, its backward would run with the new: the
        # daemon refuses it (a gradient of no function otherwise, without a word).
        p, x = random_case(self.rng, 6)
        moe = self.make_moe(p)
        xt = torch.from_numpy(x).float()
        y, l_aux = moe(xt)
        (y.sum() + l_aux).backward()
        y, l_aux = moe(xt)
        moe.step()
        with self.assertRaisesRegex(tuteld.TutelError, "the parameters changed"):
            (y.sum() + l_aux).backward()
        self.assertEqual(len(moe.layer._pending), 0)
        # The module trains on.
        y, l_aux = moe(xt)
        (y.sum() + l_aux).backward()
        moe.step()

    def test_gradients_of_x_alone_leave_the_daemons_gradients(self):
        # torch.autograd.grad and backward(inputs=[x]) accumulate no parameter's gradient: the
        # daemon's stay as they were, while x gets its own; loss.backward() accumulates them.
        p, x = random_case(self.rng, 8)
        moe = self.make_moe(p)
        head = torch.from_numpy(self.rng.normal(0, 1, (M,)))
        _, _, saved = ref.forward(p, x, K, F)
        dx_ref, grads = ref.backward(p, saved, np.broadcast_to(head.numpy(), (8, M)), 0.1)
        norm_ref = np.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))

        def loss_of(xt):
            y, l_aux = moe(xt)
            return (y * head).sum() + 0.1 * l_aux

        xt = torch.tensor(x, requires_grad=True)
        (gx,) = torch.autograd.grad(loss_of(xt), xt)
        self.assert_close(gx.numpy(), dx_ref, "torch.autograd.grad's dx")
        loss_of(xt).backward(inputs=[xt])
        self.assert_close(xt.grad.numpy(), dx_ref, "backward(inputs=[x])'s dx")
        # Over the parameters (the empty anchor), without allow_unused: its gradient is empty.
        (anchor_grad,) = torch.autograd.grad(loss_of(xt), list(moe.parameters()))
        self.assertEqual(anchor_grad.numel(), 0)
        self.assertEqual(moe.layer.grad_norm(), 0.0)
        loss_of(xt).backward()
        self.assertAlmostEqual(moe.layer.grad_norm(), norm_ref, delta=1e-4 * norm_ref, msg=f"seed {self.seed}")

    def test_model_helpers_zero_and_step_every_moe(self):
        # model.zero_grad() does not call the modules' own zero_grad: tuteld.nn.zero_grad does.
        p, x = random_case(self.rng, 6)
        first = self.make_moe(p)
        second = tuteld.nn.MoE.attach(self.client, "moe")  # the same layer: its gradients twice
        model = torch.nn.ModuleDict({"first": first, "second": second})
        xt = torch.from_numpy(x).float()
        with torch.no_grad():
            before = first(xt)[0]
        for m in (first, second):
            y, l_aux = m(xt)
            (y.pow(2).sum() + l_aux).backward()
        tuteld.nn.zero_grad(model)
        steps = self.daemon.layer_field("moe", "step")
        tuteld.nn.step(model)  # no gradients since zero_grad (set to none): nothing moves
        self.assertEqual(self.daemon.layer_field("moe", "step"), steps)
        with torch.no_grad():
            torch.testing.assert_close(first(xt)[0], before, rtol=0, atol=0)
        for m in (first, second):
            y, l_aux = m(xt)
            (y.pow(2).sum() + l_aux).backward()
        tuteld.nn.step(model)  # one step (the two modules share one layer)
        self.assertEqual(self.daemon.layer_field("moe", "step"), steps + 1)
        with torch.no_grad():
            self.assertFalse(torch.equal(first(xt)[0], before))

    def test_clip_grad_norm_clips_torchs_and_the_daemons_gradients_together(self):
        p, x = random_case(self.rng, 10)
        moe = self.make_moe(p)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(M, M).double()
                self.moe = moe

            def forward(self, x):
                return self.moe(self.proj(x))

        net = Net()
        head = torch.from_numpy(self.rng.normal(0, 1, (M,)))
        xt = torch.from_numpy(x)
        y, l_aux = net(xt)
        ((y * head).sum() + 0.1 * l_aux).backward()
        with torch.no_grad():
            moe_in = net.proj(xt).numpy()
        _, _, saved = ref.forward(p, moe_in, K, F)
        _, grads = ref.backward(p, saved, np.broadcast_to(head.numpy(), (x.shape[0], M)), 0.1)
        daemon_norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
        proj_grads = [q.grad.clone() for q in net.proj.parameters()]
        torch_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in proj_grads)))
        total = np.hypot(torch_norm, daemon_norm)
        # Above the norm: nothing is scaled.
        got = tuteld.nn.clip_grad_norm_(net, 2 * total)
        self.assertEqual(got.dtype, torch.float64)  # the gradients' dtype, as torch's
        self.assertAlmostEqual(float(got), total, delta=1e-4 * total, msg=f"seed {self.seed}")
        for q, g in zip(net.proj.parameters(), proj_grads):
            torch.testing.assert_close(q.grad, g, rtol=0, atol=0)
        # Below: both by max_norm / (norm + 1e-6), so the joint norm becomes max_norm.
        got = tuteld.nn.clip_grad_norm_(net, total / 4)
        self.assertAlmostEqual(float(got), total, delta=1e-4 * total, msg=f"seed {self.seed}")
        coef = (total / 4) / (float(got) + 1e-6)
        for q, g in zip(net.proj.parameters(), proj_grads):
            torch.testing.assert_close(q.grad, g * coef)
        self.assertAlmostEqual(moe.layer.grad_norm(), coef * daemon_norm, delta=1e-4 * daemon_norm)
        self.assert_stepped(moe, p, {n: coef * g for n, g in grads.items()})
        # A gradient that is not finite: nothing is scaled, the norm says so, or it raises.
        net.proj.weight.grad[0, 0] = float("inf")
        with self.assertRaises(RuntimeError):
            tuteld.nn.clip_grad_norm_(net, 1.0, error_if_nonfinite=True)
        before = moe.layer.grad_norm()
        torch_before = [q.grad.clone() for q in net.proj.parameters()]
        self.assertEqual(float(tuteld.nn.clip_grad_norm_(net, 1.0)), float("inf"))
        self.assertEqual(moe.layer.grad_norm(), before)
        for q, g in zip(net.proj.parameters(), torch_before):
            torch.testing.assert_close(q.grad, g, rtol=0, atol=0)
        # What torch's signature would let through silently is refused.
        with self.assertRaises(TypeError):
            tuteld.nn.clip_grad_norm_(net.parameters(), 1.0)
        with self.assertRaises(NotImplementedError):
            tuteld.nn.clip_grad_norm_(net, 1.0, float("inf"))
        with self.assertRaises(TypeError):
            tuteld.nn.clip_grad_norm_(net, 1.0, 2.0, True)  # error_if_nonfinite is keyword-only

    def test_unscale_divides_the_daemons_gradients_and_reports_an_overflow(self):
        # A stand-in for torch.cuda.amp.GradScaler (disabled without CUDA): only its scale.
        class Scaler:
            def __init__(self, scale):
                self.scale = scale

            def get_scale(self):
                return self.scale

        p, x = random_case(self.rng, 10)
        moe = self.make_moe(p)
        head = torch.from_numpy(self.rng.normal(0, 1, (M,)))
        y, l_aux = moe(torch.from_numpy(x))
        (1024.0 * ((y * head).sum() + 0.1 * l_aux)).backward()  # a loss scaled by 1024
        _, _, saved = ref.forward(p, x, K, F)
        _, grads = ref.backward(p, saved, np.broadcast_to(head.numpy(), y.shape), 0.1)
        self.assertFalse(tuteld.nn.unscale_(moe, Scaler(1024.0)))
        self.assert_stepped(moe, p, grads)  # the step applies the unscaled gradients
        with self.assertRaises(ValueError):
            tuteld.nn.unscale_(moe, Scaler(0.0))
        with self.assertRaises(TypeError):
            tuteld.nn.unscale_(moe.parameters(), Scaler(2.0))
        # An overflow: reported, and nothing is divided (inf / 1024 would still be inf: the
        # layer's scale_grads is watched instead).
        moe.zero_grad()
        y, l_aux = moe(torch.from_numpy(x))
        (float("inf") * y.sum()).backward()
        self.assertFalse(np.isfinite(moe.layer.grad_norm()))
        scaled = []
        real_scale_grads = moe.layer.scale_grads
        moe.layer.scale_grads = lambda factor: scaled.append(factor) or real_scale_grads(factor)
        try:
            self.assertTrue(tuteld.nn.unscale_(moe, Scaler(1024.0)))
            self.assertEqual(scaled, [])
            moe.zero_grad()  # finite again: now it divides
            self.assertFalse(tuteld.nn.unscale_(moe, Scaler(1024.0)))
            self.assertEqual(scaled, [1.0 / 1024.0])
        finally:
            del moe.layer.scale_grads


if __name__ == "__main__":
    unittest.main()
