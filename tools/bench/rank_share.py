"""rank_share.py: how tenants share one rank of a tuteld (the rank's fair lock, docs/config.md `share`).

Starts its own tuteld (one rank, unix sockets under a temporary directory, no metrics port) with
two tenants: "busy" (uid 0) runs --busy-sessions sessions of back-to-back forwards of
--busy-tokens tokens, "light" (uid 65534, a forked child) runs one session of forwards of
--light-tokens tokens. Prints each tenant's forwards and the light tenant's latency beside its
latency alone on the rank, measured first in the same run. Needs root (the second tenant is
another uid), numpy, and the client library:

    sudo PYTHONPATH=client/python TUTEL_CLIENT_LIBRARY=build/lib/libtutel_client.so.0 \\
        /usr/bin/python3 tools/bench/rank_share.py --tuteld build/bin/tuteld
"""

import argparse
import os
import signal
import subprocess
import tempfile
import threading
import time

import numpy as np

import tuteld

SPEC = 'name = "{}"\nexperts = 8\nk = 2\nmodel_dim = 256\nhidden = 512\ninit_seed = 1\n'


def forwards(socket, name, tokens, begin, seconds):
    """Forwards back to back from `begin` for `seconds`; their latencies."""
    with tuteld.Client(socket) as client:
        layer = client.create_layer(SPEC.format(name))
        x = np.random.default_rng(0).standard_normal((tokens, 256)).astype(np.float32)
        layer.infer(x)
        while time.time() < begin:
            time.sleep(0.001)
        latencies = []
        while time.time() < begin + seconds:
            t = time.perf_counter()
            layer.infer(x)
            latencies.append(time.perf_counter() - t)
        layer.destroy()
        return latencies


def light_tenant(socket, name, tokens, begin, seconds):
    """The light tenant's forwards in a child as uid 65534: (count, median ms, p99 ms)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            lat = forwards(socket, name, tokens, begin, seconds)
            os.write(w, f"{len(lat)} {np.median(lat) * 1e3} {np.percentile(lat, 99) * 1e3}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    return pid, r


def collect(pid, r):
    text = os.read(r, 200).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0 or not text:
        raise SystemExit("the light tenant's child failed")
    n, med, p99 = text.split()
    return int(n), float(med), float(p99)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuteld", required=True)
    ap.add_argument("--busy-sessions", type=int, default=3)
    ap.add_argument("--busy-tokens", type=int, default=512)
    ap.add_argument("--light-tokens", type=int, default=8)
    ap.add_argument("--busy-share", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    if os.getuid() != 0:
        raise SystemExit("run as root: the second tenant is uid 65534")

    with tempfile.TemporaryDirectory(prefix="rank-share-") as d:
        os.chmod(d, 0o755)
        socket = d + "/client.sock"
        with open(d + "/tuteld.toml", "w") as f:
            f.write(f'[server]\nclient_socket = "{socket}"\nadmin_socket = "{d}/admin.sock"\n'
                    'metrics_listen = ""\n[backend]\nranks = 1\n'
                    '[[tenant]]\nname = "busy"\nuids = [0]\n' +
                    (f'share = {args.busy_share}\n' if args.busy_share != 1 else '') +
                    '[[tenant]]\nname = "light"\nuids = [65534]\n')
        daemon = subprocess.Popen([args.tuteld, "--config", d + "/tuteld.toml"],
                                  stderr=open(d + "/tuteld.log", "w"))
        try:
            for _ in range(200):
                if os.path.exists(socket) or daemon.poll() is not None:
                    break
                time.sleep(0.05)
            if daemon.poll() is not None:
                raise SystemExit("tuteld exited at start:\n" + open(d + "/tuteld.log").read())
            time.sleep(0.1)
            os.chmod(socket, 0o666)
            alone = collect(*light_tenant(socket, "alone", args.light_tokens, time.time() + 0.5, 1.0))

            begin = time.time() + 1.0
            pid, r = light_tenant(socket, "light", args.light_tokens, begin, args.seconds)
            results = [None] * args.busy_sessions

            def busy(i):
                results[i] = forwards(socket, f"busy{i}", args.busy_tokens, begin, args.seconds)

            threads = [threading.Thread(target=busy, args=(i,)) for i in range(args.busy_sessions)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            light = collect(pid, r)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait()
    busy_n = sum(len(x) for x in results)
    print(f"busy tenant (share {args.busy_share}): {args.busy_sessions} sessions, {busy_n} forwards of "
          f"{args.busy_tokens} tokens, median {np.median(np.concatenate(results)) * 1e3:.2f} ms")
    print(f"light tenant (share 1): {light[0]} forwards of {args.light_tokens} tokens, median "
          f"{light[1]:.2f} ms, p99 {light[2]:.2f} ms; alone on the rank: median {alone[1]:.2f} ms")
    print(f"light tenant's share of the forwards: {light[0] / (light[0] + busy_n):.2f}")


if __name__ == "__main__":
    main()
