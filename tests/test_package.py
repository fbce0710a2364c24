"""brats_tf's import-time set-up: oneDNN's CPU kernels on every x86 CPU."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import brats_tf, tensorflow\n"
         "from tensorflow.python.util import _pywrap_util_port\n"
         "print('onednn', _pywrap_util_port.IsMklEnabled())\n")


def _onednn_enabled(setting: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return out.strip().splitlines()[-1] == "onednn True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="x86 Linux wheels")
def test_importing_brats_tf_first_turns_onednn_on_and_respects_the_user():
    # Without brats_tf, TensorFlow decides by the CPU (on an AVX2-only CPU: off);
    # brats_tf imported first turns it on unless the environment says otherwise.
    assert _onednn_enabled(None)
    assert not _onednn_enabled("0")
    assert _onednn_enabled("1")
