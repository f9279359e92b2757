"""examples/train_toy.py against a real tuteld: the held-out loss must fall below half (the
example's own exit status). Skips without PyTorch, as test_torch does."""

import os
import subprocess
import sys
import unittest

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


if __name__ == "__main__":
    unittest.main()
