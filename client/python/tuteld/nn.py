"""PyTorch modules over tuteld layers.

    moe = tuteld.nn.MoE(client, spec_toml)          # or MoE.attach(client, "moe0")
    y, l_aux = moe(x)                                # x: [..., model_dim]
    loss = task_loss(y) + 0.01 * l_aux
    loss.backward()                                  # the MoE's gradients accumulate in the daemon
    moe.step(); moe.zero_grad()                      # the daemon's optimizer, beside torch's own
    tuteld.nn.step(model); tuteld.nn.zero_grad(model)  # or every MoE in a model at once
    tuteld.nn.step(model, lr=scheduler.get_last_lr()[0])  # a learning-rate schedule's value
    tuteld.nn.clip_grad_norm_(model, 1.0)            # torch's and the daemon's gradients together
    tuteld.nn.reattach(model, tuteld.Client(socket))  # carry on after the daemon restarted

The expert and gate parameters live in the daemon, not in this module: torch's optimizers do
not see them, the daemon's optimizer (the layer spec's [optimizer]) updates them on step(), with
the spec's lr and weight_decay or the ones step() is given. As torch's optimizers skip a
parameter whose .grad is None, a step changes nothing where no backward reached the layer since
zero_grad (set_to_none, the default): a frozen or unused module is not moved.
model.state_dict() holds them all the same, under Tutel's names (prefix + "experts.batched_fc1_w",
"gates.0.wg.weight", ...: a Tutel MOELayer's state_dict loads into the module at the same path),
as float32 CPU tensors copied out of the daemon, with the daemon's optimizer state under its own
names (prefix + "optimizer.state0.experts.batched_fc1_w", ...), its step (prefix +
"optimizer.step", an int64 scalar) and Tutel's "_num_global_experts"; load_state_dict writes
them back (strict as torch's: missing, unexpected and mis-shaped entries are reported, what has
no entry keeps its value, and a module with an error in its entries is left as it was). Without
optimizer entries (weights alone, a Tutel checkpoint), or with another optimizer's (the dict's
metadata names it: a warning says so), the daemon's optimizer starts afresh, at step 0. On an expert-parallel layer, each rank's state_dict holds its own experts (save every
rank's), as Tutel's does.
Autograd calls the daemon's backward for every training forward, also when x needs no gradient
(the module holds an empty parameter so that the graph always reaches it). Tensors on another
device or of another dtype are moved to float32 on the CPU for the call and back (the daemon's
shared memory is host memory; GPU tensors without a copy need device regions, not here yet).
Several forwards may be in flight before their backwards, in any order (gradient accumulation,
pipelined micro-batches): each backward names the forward it belongs to. Under torch.no_grad(),
or frozen (requires_grad_(False)) with an x that needs no gradient, a forward is an inference,
which keeps nothing in the daemon. In train mode a layer with gate_noise > 0 draws its gate
noise, under no_grad too (as dropout does), keyed by a number drawn from torch's generator:
torch.manual_seed reproduces it, and torch.utils.checkpoint, which restores the generator before
it recomputes, recomputes a forward with the noise (and so the routing) it first drew. In eval
mode with gradients enabled it is, as torch's own layers are, differentiable: a training forward
without gate noise (routed as an inference is), so the gradient reaches x and the experts; a
layer with gate_noise > 0 infers instead, and no gradient flows through it (a warning says so
once). (An evaluation loop should run under
torch.no_grad(), as with torch's layers: otherwise each forward keeps its state in the daemon
until its graph is dropped.) A step, load_state_dict or import between a training forward and
its backward makes that backward raise (the daemon refuses it: its gradient would be of
neither the old parameters nor the new), as torch refuses a backward through a parameter
modified in place.
A client made before os.fork() cannot be used in the child (connect a new one there). A
training forward whose graph is dropped without a backward is discarded in the
daemon at the layer's next call (on an expert-parallel layer too: a discard is each rank's own).
The backward runs once per forward (the daemon drops a forward's state when its backward ran: a
second backward through the same graph raises, retain_graph or not) and is not differentiable
again (a second derivative raises). An empty batch (no tokens) is a step like any other: empty
outputs, l_aux 0, a backward that adds nothing to the gradients; on an expert-parallel layer the
rank still runs its part of the group's collectives, which its peers' tokens need.

What torch's own machinery does not reach, since the experts are not torch parameters:
- model.zero_grad() and torch optimizers do not zero or step the daemon's gradients: call
  tuteld.nn.zero_grad(model) and tuteld.nn.step(model) (or each MoE's own zero_grad/step);
- torch.nn.utils.clip_grad_norm_ does not see them either: tuteld.nn.clip_grad_norm_(model,
  max_norm) clips torch's gradients and the daemon's by their joint L2 norm;
- a frozen module (requires_grad_(False)), a backward that does not reach the module's
  parameters (torch.autograd.grad(y, x), backward(inputs=[x])) and torch.autograd.grad over
  them (which returns gradients rather than accumulating them, and the experts' cannot be
  returned) compute dx alone and leave the daemon's gradients as they were;
- copy.deepcopy and pickle (torch.save of the module itself) raise: torch.save the state_dict,
  or attach the layer again;
- a GradScaler's scaler.unscale_(optimizer) and its overflow check do not see them either:
  tuteld.nn.unscale_(model, scaler) unscales the daemon's gradients and says whether they
  overflowed (then skip tuteld.nn.step and lower the scale; see unscale_).
"""

import math
import re
import warnings

import torch
from torch.autograd.function import once_differentiable

from . import TutelError


class _PendingForward:
    """A training forward's place in its autograd graph: dropped before its backward ran (a
    graph freed unused, backward(inputs=...) that skips the layer, an exception between forward
    and backward), it has the layer discard the forward at its next call."""

    def __init__(self, layer, sequence):
        self.layer, self.sequence, self.backwarded = layer, sequence, False
        self.interrupted = False  # its backward was sent and then failed or given up (an exception)

    def __del__(self):
        if not self.backwarded:
            self.layer._discards.append(self.sequence)  # any thread: a deque append, no call


def _wants_param_grads(ctx):
    """Whether this backward is to accumulate the expert and gate gradients in the daemon, as
    torch accumulates a parameter's into .grad: only where autograd reaches the parameters with
    backward() (loss.backward(), backward(inputs=...) that names the module's). Not for a frozen
    module (the anchor needs no gradient), not where the backward does not reach the anchor
    (torch.autograd.grad(y, x), backward(inputs=[x])), and not for torch.autograd.grad over the
    parameters: it returns gradients instead of accumulating them, and the experts' cannot be
    returned through the empty anchor."""
    if not ctx.needs_input_grad[1]:
        return False
    anchor = ctx.next_functions[1][0]  # the anchor's AccumulateGrad node
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if anchor is None or will_execute is None:
        return True
    try:
        return bool(will_execute(anchor))
    except RuntimeError:
        # torch refuses the question for a leaf that torch.autograd.grad captures: the anchor is
        # among its inputs (e.g. torch.autograd.grad(loss, model.parameters())).
        return False


class _MoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, layer, noise, noise_key):
        rows = x.detach().to("cpu", torch.float32).contiguous()
        y, info = layer.forward(rows.numpy(), training=True, noise=noise, noise_key=noise_key)
        # First, so that a failure below (the copy of y to x's device) still discards the forward.
        ctx.pending = _PendingForward(layer, info.sequence)
        ctx.layer, ctx.sequence, ctx.x_meta = layer, info.sequence, (x.device, x.dtype)
        ctx.anchor_meta = (anchor.device, anchor.dtype)
        l_aux = torch.tensor(info.l_aux, dtype=torch.float32, device=x.device)
        return torch.from_numpy(y).to(x.device, x.dtype), l_aux

    @staticmethod
    @once_differentiable  # dx comes from the daemon, not from torch ops: no second derivative
    def backward(ctx, dy, dl_aux):
        # Autograd materialises the gradient of an unused output as zeros, so both are tensors.
        device, dtype = ctx.x_meta
        pending = ctx.pending
        if pending.interrupted:
            raise RuntimeError("tuteld.nn.MoE: this forward's backward failed, was interrupted or timed out "
                               "after it was sent, and the forward is gone; the daemon may have added it, "
                               "or part of it, to the gradients. Call zero_grad and run the forward again")
        if pending.backwarded:
            raise RuntimeError("tuteld.nn.MoE: this forward was backwarded already; the daemon keeps a "
                               "forward's state only until its backward, so a graph through the layer "
                               "can be backwarded once (retain_graph=True does not keep it)")
        dy_rows = dy.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            dx = ctx.layer.backward(dy_rows, dl_aux=float(dl_aux), sequence=ctx.sequence,
                                    param_grads=_wants_param_grads(ctx))
        except BaseException:
            # Submitted (the layer forgot the forward) and then given up: it may have run.
            pending.interrupted = ctx.sequence not in ctx.layer._pending
            raise
        finally:
            # Consumed once submitted (the layer forgets it then), also when it failed; still
            # pending when refused before that, so that a dropped graph discards it.
            pending.backwarded = ctx.sequence not in ctx.layer._pending
        # The anchor's gradient is as empty as the anchor: given whenever autograd asks for one,
        # so that torch.autograd.grad over model.parameters() does not fail on it as unused.
        anchor_grad = torch.zeros(0, device=ctx.anchor_meta[0], dtype=ctx.anchor_meta[1]) \
            if ctx.needs_input_grad[1] else None
        return torch.from_numpy(dx).to(device, dtype), anchor_grad, None, None, None


class MoE(torch.nn.Module):
    """An MoE layer served by tuteld: forward(x) returns (y, l_aux)."""

    def __init__(self, client, spec_toml=None, *, layer=None):
        super().__init__()
        if (spec_toml is None) == (layer is None):
            raise ValueError("give either a layer spec (TOML text) or an attached tuteld.Layer")
        self.layer = layer if layer is not None else client.create_layer(spec_toml)
        # What reattach() creates the layer from where the daemon holds none of its name (a group
        # layer after a restart); None for a module made from an attached layer.
        self._spec = spec_toml
        # Empty, never updated: it makes every output require a gradient, so autograd runs the
        # daemon's backward (which accumulates the expert and gate gradients) even when x
        # itself needs none.
        self._anchor = torch.nn.Parameter(torch.empty(0), requires_grad=True)
        # Set once the layer refused an eval-mode forward for gradients (it draws gate noise, or
        # the daemon predates the flag): from then on eval mode infers at once, with no request
        # refused first.
        self._eval_grad_refused = None
        # with_module: torch keeps a weak reference to the module, not a cycle through it.
        self._register_load_state_dict_pre_hook(MoE._load_daemon_state, with_module=True)

    @classmethod
    def attach(cls, client, name):
        return cls(client, layer=client.attach_layer(name))

    def forward(self, x):
        if not x.is_floating_point():
            raise TypeError(f"tuteld.nn.MoE takes a real floating-point x, not {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.layer.model_dim:
            raise ValueError(f"x must have shape [..., {self.layer.model_dim}], not {list(x.shape)}")
        # A backward comes only where autograd has something to differentiate: the anchor, or x.
        # Otherwise (no_grad, a frozen module given an x that needs no gradient) it is an
        # inference: a training forward would keep its state in the daemon until its graph goes.
        wants_backward = torch.is_grad_enabled() and (self._anchor.requires_grad or x.requires_grad)
        if self.training and self.layer.gate_noise > 0:
            # The gate noise's key comes from torch's generator, as torch's own random layers
            # draw theirs: torch.manual_seed makes it reproducible, and torch.utils.checkpoint
            # (which restores the generator before it recomputes) recomputes a forward with the
            # noise it first drew. Under no_grad, train mode still draws it (as dropout does):
            # an inference routed as a training forward is.
            noise_key = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
            if wants_backward:
                return _MoEFunction.apply(x, self._anchor, self.layer, True, noise_key)
            y, info = self.layer.infer(x.detach().to("cpu", torch.float32).contiguous().numpy(),
                                       noise_key=noise_key)
            return (torch.from_numpy(y).to(x.device, x.dtype),
                    torch.tensor(info.l_aux, dtype=torch.float32, device=x.device))
        if self.training and wants_backward:
            return _MoEFunction.apply(x, self._anchor, self.layer, True, None)
        if wants_backward and self._eval_grad_refused is None:
            # Eval mode with gradients enabled, as torch's own layers: a training forward without
            # gate noise, routed as an inference is, so the gradient reaches x (a frozen eval-mode
            # block with trainable layers below it, input attribution) and the experts (fine-tuning
            # in eval mode). Under no_grad, or frozen with an x that needs none, it is an inference.
            try:
                return _MoEFunction.apply(x, self._anchor, self.layer, False, None)
            except TutelError as e:
                if "gate noise" not in str(e) and "unknown request flags" not in str(e):
                    raise  # not a layer with gate noise, nor a daemon from before the flag
                self._eval_grad_refused = str(e)
                warnings.warn(f"tuteld.nn.MoE in eval mode runs an inference: no gradient reaches x or "
                              f"the experts through it ({e}); use train mode for gradients, torch.no_grad() "
                              f"to say none are wanted", stacklevel=3)
        y, info = self.layer.infer(x.detach().to("cpu", torch.float32).contiguous().numpy())
        return (torch.from_numpy(y).to(x.device, x.dtype),
                torch.tensor(info.l_aux, dtype=torch.float32, device=x.device))

    def reattach(self, client):
        """Binds the module to its layer (by name) through `client`: after the daemon restarted,
        which brings its layers back from their checkpoints, or once the old client was closed.
        A group layer, which a restart does not bring back, is created again from the spec the
        module was made with, and resumes from its checkpoint on every rank that does the same;
        any other layer the daemon does not hold raises NotFound (a daemon without state_dir
        keeps nothing across a restart: load a state_dict into the module created anew).
        Training forwards whose backward had not run are lost with the old session: their
        graphs' backward raises, so run that step again."""
        try:
            layer = client.attach_layer(self.layer.name)
        except TutelError as e:
            # Only a group layer is created again: any other layer a restart did not bring back
            # (a daemon without state_dir, one killed before it checkpointed) would start afresh
            # from its initial weights, silently.
            if e.name != "NotFound" or self._spec is None or not _is_group_spec(self._spec):
                raise
            layer = client.create_layer(self._spec)
        old, self.layer = self.layer, layer
        self._eval_grad_refused = None  # another daemon may take what the old one refused
        old.release()

    def step(self, lr=None, weight_decay=None):
        """The daemon's optimizer step on the gradients accumulated since zero_grad (none: the
        layer is left as it is, as torch skips a parameter whose .grad is None); returns the
        step count. lr, weight_decay: this step's, in place of the spec's (a schedule's value)."""
        return self.layer.step(lr=lr, weight_decay=weight_decay)

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none=set_to_none)
        self.layer.zero_grad(set_to_none=set_to_none)

    def extra_repr(self):
        return (f"name={self.layer.name!r}, model_dim={self.layer.model_dim}, "
                f"output_dim={self.layer.output_dim}, experts={self.layer.experts}")

    # The daemon's optimizer state goes beside the parameters under the daemon's own names
    # (prefix + "optimizer.state0.<parameter>", ...), and its step as prefix + "optimizer.step"
    # (an int64 scalar): torch's module state_dict holds no optimizer state, but the daemon's
    # optimizer has no state_dict of its own to hold it. Every entry is a tensor, so the dict
    # goes wherever torch's do (torch.save, safetensors). The anchor, an implementation detail,
    # is left out, and "_num_global_experts" (a Tutel MOELayer's buffer) is in, so that a Tutel
    # state_dict loads under strict=True (an older one's expert tensors with leading size-1
    # dimensions too, as Tutel's load takes them), and this one's weights into a Tutel layer (with
    # strict=False there, or the "optimizer." entries dropped: a Tutel layer has none).
    _OPTIMIZER = "optimizer."
    _STEP = "optimizer.step"
    _ANCHOR = "_anchor"
    _TUTEL_EXPERTS = ("_num_global_experts", "_max_num_global_experts")
    _NAMESPACES = ("gates.", "experts.", "optimizer.")  # the daemon's tensors' names begin so

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # a subclass's own entries
        destination.pop(prefix + self._ANCHOR, None)
        tensors, metadata = self.layer.export_state()
        # Whose optimizer state this is, in torch's per-module metadata of the dict (its entries
        # are tensors only): a load into a layer of another optimizer leaves it (kept by
        # torch.save; a format that keeps tensors alone loses it, and the load takes the state).
        dict_metadata = getattr(destination, "_metadata", None)
        if dict_metadata is not None and prefix[:-1] in dict_metadata and "tuteld.optimizer" in metadata:
            dict_metadata[prefix[:-1]]["tuteld.optimizer"] = metadata["tuteld.optimizer"]
        for name, values in tensors.items():
            destination[prefix + name] = torch.from_numpy(values)
        destination[prefix + self._STEP] = torch.tensor(int(metadata.get("tuteld.step", "0")), dtype=torch.int64)
        destination[prefix + self._TUTEL_EXPERTS[0]] = torch.tensor(self.layer.experts, dtype=torch.int64)

    @staticmethod
    def _legacy_tutel_shape(name, given, shape):
        """True for an expert tensor of an older Tutel checkpoint: the same dimensions with size-1
        ones among them ([1, E, H, M] for [E, H, M]), which Tutel's own load reshapes. (Tutel
        takes any tensor of as many elements; one of other dimensions, a transposed [E, M, H], is
        refused here as a size mismatch, not read in the wrong order.)"""
        def squeezed(dims):
            return [d for d in dims if d != 1]
        return name.startswith("experts.") and squeezed(given) == squeezed(shape)

    def _load_daemon_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs):
        """A load_state_dict pre-hook (the first of the module's): takes this module's daemon
        entries out of `state_dict` (torch's own copy) and imports them; torch then loads the
        rest (a subclass's entries) and reports what is left over."""
        ours = [key for key in state_dict if key.startswith(prefix) and
                (key[len(prefix):].startswith(self._NAMESPACES) or key[len(prefix):] in self._TUTEL_EXPERTS)]
        # The anchor is never saved: an entry for it is not missing (nor one a state_dict saved
        # before it was left out carries: torch copies that one in, an empty tensor).
        state_dict.setdefault(prefix + self._ANCHOR, self._anchor.detach())
        if not ours:
            # Nothing for this module (a checkpoint of another part of the model): nothing to
            # import, every entry missing, the daemon's state as it was.
            missing_keys.extend(prefix + name for name in self._daemon_names())
            return
        # Every tensor the daemon holds, by name and shape; its values only where an entry is
        # missing from state_dict and keeps them (as torch keeps a parameter strict=False finds
        # none for): exported then, once, not for every load.
        current = None

        def current_state():
            nonlocal current
            if current is None:
                current = self.layer.export_state()
            return current

        given = {key[len(prefix):]: state_dict.pop(key) for key in ours}
        theirs, mine = local_metadata.get("tuteld.optimizer"), self.layer.state_layout()[1]
        if theirs is not None and mine is not None and theirs != mine:
            # Another optimizer's state is none of this one's (SGD's momentum is no AdamW first
            # moment): its entries and step are left, neither loaded nor unexpected, and this
            # optimizer starts afresh at step 0, as the daemon does with such a file.
            for name in [n for n in given if n.startswith(self._OPTIMIZER)]:
                del given[name]
            warnings.warn(f"tuteld.nn.MoE {prefix or '(the module)'}: the state_dict holds a {theirs} "
                          f"optimizer's state; this layer's {mine} optimizer starts afresh", stacklevel=2)
        state, errors = {}, []
        optimizer_given = any(name.startswith(self._OPTIMIZER) for name in given)
        for name, shape in self.layer.state_layout()[0].items():
            key = prefix + name
            if name not in given:
                # Optimizer state absent altogether (a Tutel checkpoint, weights alone) starts
                # afresh, unreported; absent for some tensors only, it is reported, and kept.
                if not name.startswith(self._OPTIMIZER) or optimizer_given:
                    missing_keys.append(key)
                    state[name] = current_state()[0][name]
                continue
            value = given.pop(name)
            if not torch.is_tensor(value):
                errors.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                              f"object from checkpoint but received {type(value)}")
            elif tuple(value.shape) != shape and not self._legacy_tutel_shape(name, tuple(value.shape), shape):
                errors.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                              f"checkpoint, the shape in current model is {shape}.")
            else:
                state[name] = value.detach().to("cpu", torch.float32).reshape(shape).numpy()
        metadata = {}
        step = given.pop(self._STEP, None)
        if step is None and optimizer_given:  # moments without their step: keep the layer's
            missing_keys.append(prefix + self._STEP)
            metadata["tuteld.step"] = current_state()[1].get("tuteld.step", "0")
        elif step is not None:
            if (not torch.is_tensor(step) or step.numel() != 1 or step.is_floating_point() or step.is_complex()
                    or step.dtype == torch.bool):
                errors.append(f'"{prefix + self._STEP}" must be the integer scalar tensor a tuteld.nn.MoE '
                              f"state_dict holds, not {step!r}")
            else:
                metadata["tuteld.step"] = str(int(step))
        for name in self._TUTEL_EXPERTS:
            count = given.pop(name, None)
            if count is not None and (not torch.is_tensor(count) or count.numel() != 1
                                      or int(count) != self.layer.experts):
                errors.append(f'"{prefix + name}" says {count!r} experts; this layer has {self.layer.experts}')
        unexpected_keys.extend(prefix + name for name in given)  # entries no tensor of the layer's has
        error_msgs.extend(errors)
        if not errors:  # torch raises at the end where there are errors: the layer stays as it was
            try:
                self.layer.import_state(state, metadata)
            except TutelError as e:  # a refusal by the daemon (a step that is no count)
                error_msgs.append(f"tuteld refused the state of {prefix or 'the module'}: {e}")

    def _daemon_names(self):
        return list(self.layer.state_layout()[0]) + [self._STEP, self._TUTEL_EXPERTS[0]]

    def __deepcopy__(self, memo):
        raise TypeError("tuteld.nn.MoE cannot be copied: its parameters live in the daemon. Attach "
                        "the layer again (MoE.attach(client, name)), or save it (moe.layer.save) and "
                        "load it into another layer")

    def __copy__(self):
        self.__deepcopy__(None)

    def __reduce_ex__(self, protocol):
        raise TypeError("tuteld.nn.MoE cannot be pickled (torch.save of the module): its parameters "
                        "live in the daemon; torch.save(model.state_dict()) holds them, and "
                        "load_state_dict puts them back into a model made anew")


def _is_group_spec(spec_toml):
    """Whether a layer spec has a [group] table (or a group key)."""
    try:
        import tomllib  # Python 3.11
    except ImportError:
        return re.search(r"^\s*(\[\s*group\s*\]|group\s*=)", spec_toml, re.MULTILINE) is not None
    return "group" in tomllib.loads(spec_toml)


def _layers(model):
    """The daemon layers of the tuteld MoEs in `model`, each once: modules attached to the same
    layer (the same daemon, tenant and name) share its parameters, which torch would step once
    too."""
    seen = {}
    for m in model.modules():
        if isinstance(m, MoE):
            client = m.layer._client
            seen.setdefault((client._daemon, client.tenant, m.layer.name), m.layer)
    return seen.values()


def reattach(model, client):
    """MoE.reattach(client) for every tuteld MoE in `model`: the whole model carries on through
    a new client after its daemon restarted (or its old client was closed)."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.reattach(client)


def step(model, lr=None, weight_decay=None):
    """The daemon's optimizer step for every tuteld layer in `model`, once each (torch's
    optimizers do not see them); a layer without gradients since zero_grad is left as it is.
    lr, weight_decay: this step's, in place of the specs' (a schedule's: e.g. with
    torch.optim.lr_scheduler over the model's torch optimizer, lr=scheduler.get_last_lr()[0])."""
    first_error = None
    for layer in _layers(model):
        try:
            layer.step(lr=lr, weight_decay=weight_decay)
        except TutelError as e:  # the others still step (e.g. an older daemon refusing lr)
            first_error = first_error or e
    if first_error is not None:
        raise first_error


def zero_grad(model, set_to_none=True):
    """Zeroes the daemon-side gradients of every tuteld layer in `model`, and torch's own
    (model.zero_grad() alone does not reach the daemon: it does not call the modules'
    zero_grad). set_to_none as torch's."""
    model.zero_grad(set_to_none=set_to_none)
    for layer in _layers(model):
        layer.zero_grad(set_to_none=set_to_none)


def clip_grad_norm_(model, max_norm, norm_type=2.0, *, error_if_nonfinite=False):
    """torch.nn.utils.clip_grad_norm_ over `model`'s parameters and the daemon's gradients of
    its tuteld layers together: where their joint L2 norm passes max_norm, all of them are
    scaled by max_norm / (norm + 1e-6). Returns the joint norm (a tensor on the gradients'
    device, of their dtype, as torch's). `model` is the module itself (the daemon's layers are
    found through it), not model.parameters(); only the L2 norm (norm_type=2) is offered, since
    the daemon computes that one. Where the norm is not finite nothing is scaled
    (error_if_nonfinite=True raises instead): skip that step.
    On an expert-parallel layer the daemon's norm is the whole layer's, a collective: every rank
    calls this, in the same order as its steps (not on one rank alone, e.g. for logging). The
    torch parameters' gradients must be the same on every rank (data parallel, all-reduced), so
    that every rank scales by the same factor."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError("tuteld.nn.clip_grad_norm_ takes the model (a torch.nn.Module), not "
                        f"{type(model).__name__}: it finds the daemon's layers through the modules")
    if float(norm_type) != 2.0:
        raise NotImplementedError(f"tuteld.nn.clip_grad_norm_ offers the L2 norm only (norm_type=2), "
                                  f"not {norm_type}: the daemon computes that one")
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    like = grads[0] if grads else torch.zeros((), dtype=torch.float32)
    squares = 0.0
    if grads:  # one host sync for all of them, as torch's
        norms = torch.stack([torch.linalg.vector_norm(g, 2.0, dtype=torch.float64).to(like.device)
                             for g in grads])
        norm = float(torch.linalg.vector_norm(norms, 2.0))
        squares += norm * norm  # inf where it overflows (** 2 would raise)
    layers = list(_layers(model))
    for layer in layers:
        norm = layer.grad_norm()
        squares += norm * norm
    total = math.sqrt(squares)
    result = torch.tensor(total, dtype=like.dtype, device=like.device)
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise RuntimeError(f"the total norm of the gradients is {total}: clip_grad_norm_ cannot scale "
                               "them (skip this step, or lower the learning rate)")
        return result
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        # The daemon's first: where a call is refused (a closed session, a timeout), torch's
        # gradients are still as they were.
        for layer in layers:
            layer.scale_grads(coef)
        for g in grads:
            g.mul_(coef)
    return result


def unscale_(model, scaler):
    """GradScaler.unscale_ for the daemon's gradients of `model`'s tuteld layers: divides them by
    scaler.get_scale() and returns True where a layer's gradient norm is not finite (an inf or
    a NaN among them, or a sum of squares past f32's range); nothing is divided then, and the
    daemon's step is to be skipped. torch's scaler does not see the daemon's gradients, so its
    own overflow check and backoff do not cover them:

        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        overflow = tuteld.nn.unscale_(model, scaler)
        tuteld.nn.clip_grad_norm_(model, 1.0)           # optional, on unscaled gradients
        scaler.step(optimizer)                          # skipped where torch's overflowed
        if not overflow:
            tuteld.nn.step(model)
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor() if overflow else None)
        tuteld.nn.zero_grad(model)                      # torch's and the daemon's (inf ones too)

    As with two torch optimizers under one scaler, torch's step and the daemon's are skipped
    each on its own overflow. A scale set through update(new_scale) does not reset the scaler's
    count of good steps, as its own backoff does: the scale may grow again sooner after an
    overflow of the daemon's alone. Call it once per step (it divides again if called again),
    after the backward and before any clipping. On an expert-parallel layer it is a collective
    (the gradient norm), called by every rank alike."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError("tuteld.nn.unscale_ takes the model (a torch.nn.Module), not "
                        f"{type(model).__name__}: it finds the daemon's layers through the modules")
    scale = float(scaler.get_scale())
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"tuteld.nn.unscale_: the scaler's scale is {scale}; it must be a positive finite number")
    layers = list(_layers(model))
    # Every layer's norm, not up to the first overflow: on a group layer each is a collective,
    # and every rank makes the same calls.
    norms = [layer.grad_norm() for layer in layers]
    overflow = not all(math.isfinite(n) for n in norms)
    if not overflow:
        for layer in layers:
            layer.scale_grads(1.0 / scale)
    return overflow
