"""train_toy.py: the toy task of train_toy.cpp in PyTorch, with the MoE layer in tuteld.

    u --embedding--> e --tuteld.nn.MoE--> m ;  h = e + m --head--> p ;  MSE(p, t) + w * l_aux

Inputs come from a few clusters, each with its own nonlinear target, so the experts can
specialise by cluster. Autograd runs the MoE's backward in the daemon; torch's Adam updates the
embedding and the head, the daemon's AdamW the experts and the gate. Prints the held-out loss
before and after training and exits 1 unless it fell below half (a few dozen steps may not get
there). The layer is the run's own: one of its name left in the daemon (by a run that was
killed) is replaced, and it is destroyed at the end, whatever ends the run.

    PYTHONPATH=client/python TUTEL_CLIENT_LIBRARY=build/lib/libtutel_client.so.0 \\
        /usr/bin/python3 examples/train_toy.py --socket /tmp/tuteld/run/client.sock

Needs numpy and PyTorch (python3-numpy, python3-torch) and a running tuteld (README.md,
"Running the daemon", puts its client socket at /tmp/tuteld/run/client.sock).
"""

import argparse
import sys

import torch

import tuteld
import tuteld.nn

CLUSTERS, IN_DIM, MODEL_DIM, OUT_DIM = 4, 8, 32, 4


def make_task(seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLUSTERS, IN_DIM, generator=g) * 3
    maps = torch.randn(CLUSTERS, IN_DIM, OUT_DIM, generator=g) / IN_DIM**0.5
    offsets = torch.randn(CLUSTERS, OUT_DIM, generator=g)

    def batch(n, gen):
        c = torch.randint(CLUSTERS, (n,), generator=gen)
        u = centres[c] + torch.randn(n, IN_DIM, generator=gen)
        t = torch.tanh(torch.einsum("ni,nio->no", u, maps[c])) + offsets[c]
        return u, t

    return batch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, help="tuteld's client socket")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--aux-weight", type=float, default=0.01)
    ap.add_argument("--print-every", type=int, default=50)
    ap.add_argument("--layer-name", default="toy_py")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.steps < 1 or args.batch < 1 or args.print_every < 1:
        ap.error("--steps, --batch and --print-every must be at least 1")
    if not args.aux_weight >= 0:  # (NaN too)
        ap.error("--aux-weight must be a number >= 0")

    torch.manual_seed(args.seed)
    batch = make_task(args.seed)
    data = torch.Generator().manual_seed(args.seed + 1)
    held_out = batch(1024, torch.Generator().manual_seed(args.seed + 2))

    with tuteld.Client(args.socket) as client:
        try:  # a layer of this name left by an earlier run (killed, or from an older version)
            client.attach_layer(args.layer_name).destroy()
        except tuteld.TutelError as e:
            if e.name != "NotFound":
                raise
        moe = tuteld.nn.MoE(client, f'name = "{args.layer_name}"\nexperts = {CLUSTERS}\n'
                            f"model_dim = {MODEL_DIM}\nhidden = 64\nk = 1\n"
                            f"capacity_factor = 2.0\ninit_seed = {args.seed}\n"
                            "[optimizer]\nkind = \"adamw\"\nlr = 0.003\n")
        try:
            before, after = train(args, moe, batch, data, held_out)
        except BaseException:  # (KeyboardInterrupt too) the layer goes with the run
            try:
                moe.layer.destroy()
            except tuteld.TutelError:
                pass  # the daemon may be what failed: the error on its way says why
            raise
        moe.layer.destroy()
    return 0 if after < before / 2 else 1


def train(args, moe, batch, data, held_out):
    """Trains the toy model around `moe`; returns the held-out loss before and after."""
    embed, head = torch.nn.Linear(IN_DIM, MODEL_DIM), torch.nn.Linear(MODEL_DIM, OUT_DIM)
    dense = torch.optim.Adam(list(embed.parameters()) + list(head.parameters()), lr=0.003)

    def loss_of(u, t):
        e = embed(u)
        m, l_aux = moe(e)
        return torch.nn.functional.mse_loss(head(e + m), t), l_aux

    def evaluate():
        moe.eval()
        with torch.no_grad():
            loss, _ = loss_of(*held_out)
        moe.train()
        return loss.item()

    before = evaluate()
    print(f"held-out loss before training: {before:.4f}")
    for step in range(1, args.steps + 1):
        loss, l_aux = loss_of(*batch(args.batch, data))
        (loss + args.aux_weight * l_aux).backward()
        dense.step()
        moe.step()
        dense.zero_grad()
        moe.zero_grad()
        if step % args.print_every == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  l_aux {l_aux.item():.3f}")
    after = evaluate()
    print(f"held-out loss after {args.steps} steps: {after:.4f} ({after / before:.2f} of before)")
    return before, after


if __name__ == "__main__":
    sys.exit(main())
