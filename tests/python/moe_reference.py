"""A float64 numpy reference of the single-rank MoE layer (DESIGN section 2), forward and
backward, written from the math, not from the daemon's code: the Python tests check the daemon
through the Python module against it. Covers what those tests use: capacity factor f > 0,
post-score gating, relu experts with both biases, slots filled choice by choice in token order."""

import json
import struct

import numpy as np


def top_k(scores, k):
    # Descending score, ties to the lower expert index (a stable sort of the negated scores).
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def routing_margin(x, wg, k):
    """The smallest gap between neighbouring scores among any token's top k+1: float32 and
    float64 may order a near tie differently, so the tests redraw inputs that have one."""
    logits = x @ wg.T
    s = np.sort(softmax(logits), axis=1)[:, ::-1]
    gaps = [s[:, j] - s[:, j + 1] for j in range(min(k, s.shape[1] - 1))]
    return min(g.min() for g in gaps) if gaps else np.inf


def relu_margin(p, x):
    """The smallest |pre-activation| of any token at any expert: one closer to 0 than float32's
    error may take the other side of relu in the daemon, so the tests redraw such inputs."""
    pre = np.einsum("sm,ehm->seh", x, p["w1"]) + p["b1"][None, :, :]
    return np.abs(pre).min()


def softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def forward(p, x, k, capacity_factor, normalize_gate=True, capacity=None):
    """p: wg [E,M], w1 [E,H,M], b1 [E,H], w2 [E,H,O], b2 [E,O] (Tutel's layouts). `capacity`:
    the expert-parallel group's, in place of the one from x's tokens (capacity_factor > 0)."""
    S, _ = x.shape
    E = p["wg"].shape[0]
    logits = x @ p["wg"].T
    scores = softmax(logits)
    idx = top_k(scores, k)
    graw = np.take_along_axis(scores, idx, axis=1)
    g = graw / graw.sum(axis=1, keepdims=True) if (k > 1 and normalize_gate) else graw.copy()
    me = scores.mean(axis=0)
    ce = np.bincount(idx[:, 0], minlength=E) / S
    l_aux = E * np.sum(me * ce)
    C = k * int(np.floor(capacity_factor * -(-S // E))) if capacity is None else capacity
    # Slots: all first choices in token order, then all second choices, and so on.
    loc = np.zeros_like(idx)
    count = np.zeros(E, dtype=np.int64)
    for j in range(k):
        for s in range(S):
            e = idx[s, j]
            loc[s, j] = count[e]
            count[e] += 1
    kept = loc < C
    pre = np.zeros((S, k, p["w1"].shape[1]))
    h = np.zeros_like(pre)
    out = np.zeros((S, k, p["w2"].shape[2]))
    y = np.zeros((S, p["w2"].shape[2]))
    for s in range(S):
        for j in range(k):
            if not kept[s, j]:
                continue
            e = idx[s, j]
            pre[s, j] = p["w1"][e] @ x[s] + p["b1"][e]
            h[s, j] = np.maximum(pre[s, j], 0.0)
            out[s, j] = h[s, j] @ p["w2"][e] + p["b2"][e]
            y[s] += g[s, j] * out[s, j]
    saved = dict(x=x, scores=scores, idx=idx, graw=graw, g=g, ce=ce, kept=kept, pre=pre, h=h,
                 out=out, k=k, normalize=(k > 1 and normalize_gate))
    return y, dict(l_aux=l_aux, capacity=C, dropped=int((~kept).sum())), saved


def backward(p, saved, dy, dl_aux):
    """dx and the parameter gradients (named as p) for dy and dl_aux."""
    x, idx, kept, k = saved["x"], saved["idx"], saved["kept"], saved["k"]
    S, _ = x.shape
    E = p["wg"].shape[0]
    grads = {name: np.zeros_like(v) for name, v in p.items()}
    dx = np.zeros_like(x)
    dg = np.zeros((S, k))
    for s in range(S):
        for j in range(k):
            if not kept[s, j]:
                continue
            e = idx[s, j]
            dg[s, j] = dy[s] @ saved["out"][s, j]
            dout = saved["g"][s, j] * dy[s]
            grads["w2"][e] += np.outer(saved["h"][s, j], dout)
            grads["b2"][e] += dout
            dpre = (p["w2"][e] @ dout) * (saved["pre"][s, j] > 0)
            grads["w1"][e] += np.outer(dpre, x[s])
            grads["b1"][e] += dpre
            dx[s] += dpre @ p["w1"][e]
    if saved["normalize"]:
        z = saved["graw"].sum(axis=1, keepdims=True)
        dgraw = (dg - (dg * saved["g"]).sum(axis=1, keepdims=True)) / z
    else:
        dgraw = dg
    dscores = np.zeros((S, E))
    np.put_along_axis(dscores, idx, dgraw, axis=1)  # a token picks an expert at most once
    dscores += dl_aux * E * saved["ce"][None, :] / S
    sc = saved["scores"]
    dlogits = sc * (dscores - (dscores * sc).sum(axis=1, keepdims=True))
    dx += dlogits @ p["wg"]
    grads["wg"] = dlogits.T @ x
    return dx, grads


# Tutel's parameter names in a checkpoint, and ours here.
TUTEL_NAMES = {
    "wg": "gates.0.wg.weight",
    "w1": "experts.batched_fc1_w",
    "b1": "experts.batched_fc1_bias",
    "w2": "experts.batched_fc2_w",
    "b2": "experts.batched_fc2_bias",
}


def write_safetensors(path, tensors):
    """float32 tensors by name, in the safetensors layout."""
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        data = np.ascontiguousarray(value, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        assert meta["dtype"] == "F32", meta
        out[name] = np.frombuffer(body[begin:end], dtype="<f4").reshape(meta["shape"]).astype(np.float64)
    return out
