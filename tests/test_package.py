"""What importing brats_tf and running its entry points do to the environment."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, setting: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return out.strip().splitlines()[-1]


def test_importing_brats_tf_sets_no_environment_variable():
    """The library chooses nothing from the environment and changes none of it
    (numerics must not depend on which module was imported first)."""
    code = ("import os\n"
            "before = dict(os.environ)\n"
            "import brats_tf, brats_tf.model, brats_tf.training, brats_tf.evaluation\n"
            "print(before == dict(os.environ))\n")
    assert _run(code, None) == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="x86 Linux wheels")
@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_entry_points_turn_onednn_on_and_respect_the_user(entry):
    """train.py and evaluate.py run oneDNN's CPU kernels on every x86 CPU
    (TensorFlow's default is on only for some), unless the environment says
    otherwise."""
    code = (f"import runpy, sys\n"
            f"sys.argv = ['{entry}.py']\n"
            f"runpy.run_path('{entry}.py', run_name='not_main')\n"
            f"import tensorflow\n"
            f"from tensorflow.python.util import _pywrap_util_port\n"
            f"print(_pywrap_util_port.IsMklEnabled())\n")
    assert _run(code, None) == "True"
    assert _run(code, "0") == "False"
