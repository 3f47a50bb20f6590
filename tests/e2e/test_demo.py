"""`ftjobs demo` on the embedded stack: SQLite database, SQLite-backed Celery broker, no servers, no downloads."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_trains_a_qlora_adapter_that_changes_the_logits(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("FTJOBS_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(FTJOBS_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "ftjobs.cli", "demo"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert " succeeded " in result.stdout
    assert "the adapter loads with peft and moves the tiny model's logits" in result.stdout
    assert (tmp_path / "home" / "ftjobs.db").is_file() and (tmp_path / "home" / "broker.db").is_file()
