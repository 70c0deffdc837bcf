"""Running the export script as a user's scheduler does: a real process, configured the dlt
way through the environment, with nothing of the test process's own settings."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "klaviyo_pipeline.py"


def script_env(tmp_path: Path, base_url: str, api_key: str, **settings: str) -> Dict[str, str]:
    """This process's environment without its dlt settings, pointed at `base_url`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SOURCES__", "DESTINATION__", "RUNTIME__"))
    }
    env.update(
        DLT_DATA_DIR=str(tmp_path / "dlt_home"),
        DESTINATION__DUCKDB__CREDENTIALS=str(tmp_path / "export.duckdb"),
        SOURCES__KLAVIYO__API_KEY=api_key,
        SOURCES__KLAVIYO__BASE_URL=base_url,
        **settings,
    )
    return env


def run_script(env: Dict[str, str], *args: str) -> "subprocess.CompletedProcess[str]":
    """The script run with `args`; its output captured."""
    return run_python(env, str(SCRIPT), *args)


def run_python(env: Dict[str, str], *args: str) -> "subprocess.CompletedProcess[str]":
    command: List[str] = [sys.executable, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def stderr_lines(result: "subprocess.CompletedProcess[str]") -> List[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]
