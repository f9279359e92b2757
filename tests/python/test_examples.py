"""examples/train_toy.py against a real tuteld: the held-out loss must fall below half (the
example's own exit status). Skips without PyTorch, as test_torch does."""

import os
import signal
import subprocess
import sys
import unittest

import tuteld
from daemon import Daemon

try:
    import torch  # noqa: F401  (only to know whether the example can run)
except ImportError:
    torch = None

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_toy.py")


@unittest.skipIf(torch is None, "PyTorch is not installed (python3-torch)")
class ExamplesTest(unittest.TestCase):
    def test_train_toy_learns(self):
        daemon = Daemon()
        self.addCleanup(daemon.stop)
        run = subprocess.run([sys.executable, EXAMPLE, "--socket", daemon.client_socket, "--steps", "200"],
                             capture_output=True, text=True, timeout=240)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr + daemon.log())
        self.assertIn("held-out loss after 200 steps", run.stdout)

    def test_bad_arguments_are_refused_and_the_layer_goes_with_the_run(self):
        daemon = Daemon()
        self.addCleanup(daemon.stop)
        for bad in (["--batch", "0"], ["--steps", "-1"], ["--print-every", "0"], ["--aux-weight", "nan"]):
            run = subprocess.run([sys.executable, EXAMPLE, "--socket", daemon.client_socket] + bad,
                                 capture_output=True, text=True, timeout=60)
            self.assertEqual(run.returncode, 2, bad)
            self.assertIn("must be", run.stderr, bad)
        # A layer of its name left in the daemon (a run that was killed) is replaced; an
        # interrupted run destroys its own.
        with tuteld.Client(daemon.client_socket) as client:
            client.create_layer('name = "toy_py"\nexperts = 2\nmodel_dim = 8\nhidden = 8\nk = 1\ninit_seed = 1\n')
        proc = subprocess.Popen([sys.executable, "-u", EXAMPLE, "--socket", daemon.client_socket,
                                 "--steps", "1000000", "--print-every", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(lambda: proc.poll() is not None or proc.kill())
        output = ""
        for line in proc.stdout:
            output += line
            if line.startswith("step"):
                break
        self.assertIn("step", output, output + daemon.log())
        proc.send_signal(signal.SIGINT)
        output += proc.communicate(timeout=60)[0]
        self.assertNotEqual(proc.returncode, 0, output)
        self.assertIn("KeyboardInterrupt", output)
        with tuteld.Client(daemon.client_socket) as client:
            with self.assertRaises(tuteld.TutelError) as refused:
                client.attach_layer("toy_py")
            self.assertEqual(refused.exception.name, "NotFound", output)


if __name__ == "__main__":
    unittest.main()
