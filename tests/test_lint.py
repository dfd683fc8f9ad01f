"""`ruff check` over the repository is clean (settings in ruff.toml: pycodestyle E/W, pyflakes F,
120 columns). Ruff is a dev dependency (setup.py's dev extra, installed by
launch_scripts/setup_env.sh): a missing ruff fails here, it is never skipped."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ruff_is_installed():
    proc = _ruff("--version")
    assert proc.returncode == 0, ("ruff is missing: bash launch_scripts/setup_env.sh installs it "
                                  f"(or pip install ruff)\n{proc.stderr}")


def test_ruff_check_is_clean():
    proc = _ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert proc.returncode == 0, f"ruff check . found problems (fix them; some: ruff check --fix):\n{proc.stdout}"


def test_ruff_uses_the_project_settings_and_reports_file_and_line(tmp_path):
    """The settings are the repository's (a 121-column line and an unused import are caught), and a
    finding names the file and line."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n" + "x = " + "1 + " * 29 + "1\n")
    proc = _ruff("check", "--no-cache", "--output-format", "concise", "--config", os.path.join(ROOT, "ruff.toml"),
                 str(bad))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bad.py:1:8: F401" in proc.stdout and "bad.py:2:121: E501" in proc.stdout, proc.stdout
