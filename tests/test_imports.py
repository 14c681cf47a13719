"""merge_core stays toolkit-free."""

import subprocess
import sys


def test_merge_core_pulls_in_neither_nemo_nor_speechbrain():
    code = (
        "import sys, merge_core, merge_core.app.cli, merge_core.methods, merge_core.checkpoint.formats, merge_core.evaluation, merge_core.evaluation.manifests;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('nemo', 'speechbrain', 'lightning', 'pytorch_lightning'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
