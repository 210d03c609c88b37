"""benchmarks/study.sh: the overrides of each study entry, skipping finished runs, the compare step."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "study.sh"

# Stands in for `retain`: records its arguments; `run` writes a metrics.json into output_dir.
FAKE_RETAIN = """#!{python}
import json, sys
from pathlib import Path
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "run":
    out = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir=")))
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({{"tasks": ["a"], "matrix": [[0.0], [1.0]]}}))
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_study_script_runs_each_entry_once_and_compares(tmp_path):
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "retain"
    fake.write_text(FAKE_RETAIN.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    env = {
        **os.environ,
        "RETAIN": str(fake),
        "RUNS": str(tmp_path / "runs"),
        "DEST": str(tmp_path / "study"),
        "METHODS": "seq ilora_a0.9",
        "EXTRA": "bf16=true",
    }

    def study(*args):
        return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True)

    assert study("short2", "1", "2").returncode == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 4
    ilora_s2 = calls[3]
    assert ilora_s2[:2] == ["run", "examples/lnt_short1.yaml"]
    for override in ("cl_method=ilora", "ema_alpha=0.9", "benchmark_order=short2", "seed=2", "bf16=true"):
        assert override in ilora_s2
    assert f"output_dir={tmp_path / 'runs' / 'short2' / 'ilora_a0.9_s2'}" in ilora_s2
    assert "learning_rate=1e-3" not in calls[0] and "seed=1" in calls[0]

    assert study("short2", "1").returncode == 0  # finished runs are skipped
    assert len(log.read_text().splitlines()) == 4

    assert study("compare", "short2").returncode == 0
    compare_call = json.loads(log.read_text().splitlines()[-1])
    dest = tmp_path / "study" / "short2"
    assert compare_call[0] == "compare" and compare_call[-2:] == ["--out", str(dest)]
    assert [Path(p).name for p in compare_call[1:-2]] == [
        "seq_s1",
        "seq_s2",
        "ilora_a0.9_s1",
        "ilora_a0.9_s2",
    ]
    assert (dest / "seq_s1" / "metrics.json").exists()

    bad = study("short2")
    assert bad.returncode != 0 and "seed" in bad.stderr
    env["METHODS"] = "nonsense"
    unknown = study("short2", "1")
    assert unknown.returncode != 0 and "unknown study method 'nonsense'" in unknown.stderr
    assert len(log.read_text().splitlines()) == 5  # nothing ran
