"""The README's two set-up commands are the ones CI and the main job use."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    install_and_run_main, install_and_test = readme_commands()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert install_and_test in ci_lines
    assert install_and_run_main.endswith("python -m ce_export build demo --out build/demo --force")


def test_main_job_prints_artifacts_and_parity(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ce_export", "build", "demo", "--out", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"artifacts: {tmp_path / 'demo'}" in result.stdout
    assert re.search(r"parity PASSED \(fp32.*greedy 32 tokens identical in 2/2 rows", result.stdout)
