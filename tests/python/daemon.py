"""Starts the real tuteld (TUTELD_BIN) on a generated config in a fresh temporary directory and
stops it by its PID (SIGTERM, then SIGKILL) when the test ends, passed or not."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time


class Daemon:
    def __init__(self, extra_tenant="", uids=None):
        """uids: the tenant "default"'s uids; by default this process's, so it may connect."""
        uids = [os.getuid()] if uids is None else uids
        self.dir = tempfile.mkdtemp(prefix="tuteld-pytest-")
        self.client_socket = os.path.join(self.dir, "run", "client.sock")
        self.checkpoints = os.path.join(self.dir, "state", "default", "checkpoints")
        self.log_path = os.path.join(self.dir, "tuteld.log")
        config = os.path.join(self.dir, "tuteld.toml")
        with open(config, "w") as f:
            f.write(
                "[server]\n"
                'client_socket = "run/client.sock"\n'
                'admin_socket = "run/admin.sock"\n'
                'state_dir = "state"\n'
                'metrics_listen = "127.0.0.1:0"\n'
                'arena_bytes = "16MiB"\n'
                '[backend]\nkind = "cpu"\nranks = 1\nthreads_per_rank = 1\n'
                f'[[tenant]]\nname = "default"\nuids = [{", ".join(map(str, uids))}]\n{extra_tenant}'
            )
        self.config = config
        self._starts_seen = 0  # "serving on" lines in the log: one per start
        self._start()

    def _start(self):
        binary = os.environ["TUTELD_BIN"]
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen([binary, "--config", self.config], stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_serving(10.0)
            os.makedirs(self.checkpoints, exist_ok=True)
        except BaseException:
            self.stop()
            raise

    def restart(self):
        """Stops the daemon as SIGTERM does (its layers checkpointed) and starts it again on the
        same state directory and sockets."""
        self.process.send_signal(signal.SIGTERM)
        if self.process.wait(timeout=30) != 0:
            raise RuntimeError("tuteld did not exit cleanly:\n" + self.log())
        self._start()

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def layer_field(self, layer, field):
        """A field of `layer` in tutelctl's (beside tuteld) `layers` reply, read from the admin
        socket: "pending_backwards" (training forwards held for their backwards), "step", ..."""
        tutelctl = os.path.join(os.path.dirname(os.environ["TUTELD_BIN"]), "tutelctl")
        out = subprocess.run([tutelctl, "--socket", os.path.join(self.dir, "run", "admin.sock"), "--json", "layers"],
                             check=True, capture_output=True, text=True).stdout
        for entry in json.loads(out)["layers"]:
            if entry["name"] == layer:
                return entry[field]
        raise KeyError(f"tuteld serves no layer {layer!r}: {out}")

    def pending_backwards(self, layer):
        return self.layer_field(layer, "pending_backwards")

    def _wait_serving(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("tuteld exited during start-up:\n" + self.log())
            if os.path.exists(self.client_socket) and self.log().count("serving on") > self._starts_seen:
                self._starts_seen += 1
                return
            time.sleep(0.01)
        raise RuntimeError(f"tuteld did not come up within {timeout} s:\n" + self.log())

    def stop(self):
        """SIGTERM, a bounded wait, SIGKILL if it did not exit; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.process.returncode
