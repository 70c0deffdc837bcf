"""`dlt deploy` accepts pipelines/klaviyo_pipeline.py and writes its deployment files.

Deploy needs a git repository with a GitHub origin, a script that calls `dlt.pipeline` with a
literal name and `.run()`, and a completed local run of that pipeline. So each test copies the
script and `.dlt/config.toml` into a fresh repository with a fake origin, runs the script once
against the simulator (the key comes from the environment, as on a real deployment), and then
runs `dlt deploy` as a user would.

`dlt deploy` fetches its workflow templates by cloning github.com/dlt-hub/dlt-deploy-template
unless `--location` names a local folder. The tests reach nothing but 127.0.0.1, so they give it
a local template folder of the same layout (`TEMPLATES` below); everything else deploy does,
reading the script, the pipeline's state and trace, the git origin and the installed packages,
is the real thing.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from klaviyo_source.simulator import Account, KlaviyoSimulator, generate_account

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "pipelines/klaviyo_pipeline.py"
SCHEDULE = "*/30 * * * *"
ORIGIN = "https://github.com/example/klaviyo.git"
DLT = str(Path(sys.executable).parent / "dlt")

# The files dlt deploy reads from its template repository, in the same places.
TEMPLATES: Dict[str, str] = {
    "github-action/run_pipeline_workflow.yml": """\
name: Run pipeline
'on':
  schedule:
    - cron: '*/30 * * * *'
  push:
    branches: [main]
  workflow_dispatch:
env: {}
jobs:
  run_pipeline:
    runs-on: ubuntu-latest
    steps:
      - name: Check out
        uses: actions/checkout@v4
      - name: Set up Python
        uses: actions/setup-python@v5
        with:
          python-version: '3.11'
      - name: Install dependencies
        run: pip install -r requirements_github_action.txt
      - name: Run pipeline script
        run: python pipeline.py
""",
    "github-action/requirements_blacklist.txt": "# packages not to pin in the workflow\npip\n",
    "airflow-composer/dag_template.py": '"""An Airflow DAG running a dlt pipeline."""\n',
    "airflow-composer/cloudbuild.yaml": "steps: []\n",
    "airflow-composer/requirements_blacklist.txt": "pip\n",
}


@pytest.fixture
def account() -> Account:
    """A small account: the local run only has to complete."""
    return generate_account(seed=5, segments=4, tags=2, profiles=150, memberships=300)


@pytest.fixture
def run_env(simulator: KlaviyoSimulator) -> Dict[str, str]:
    """The environment of a local run: the key and the simulator's address, as env vars."""
    return {
        **os.environ,
        "SOURCES__KLAVIYO__API_KEY": simulator.api_key,
        "SOURCES__KLAVIYO__BASE_URL": simulator.base_url,
        "SOURCES__KLAVIYO__RATE_LIMIT_TIME_SCALE": "1000",
        "RUNTIME__DLTHUB_TELEMETRY": "false",  # no usage reports: nothing but 127.0.0.1
    }


def _run(command: List[str], cwd: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def deployed_repo(tmp_path: Path, run_env: Dict[str, str]) -> Path:
    """A git repository holding the pipeline script, with a GitHub origin and one local run."""
    repo = tmp_path / "repo"
    for relative in (SCRIPT, ".dlt/config.toml", ".gitignore"):
        (repo / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / relative, repo / relative)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "pipeline")
    _git(repo, "remote", "add", "origin", ORIGIN)

    local_run = _run([sys.executable, SCRIPT], repo, run_env)
    assert local_run.returncode == 0, local_run.stderr
    assert (repo / "klaviyo_segments.duckdb").is_file()
    return repo


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    folder = tmp_path / "deploy-templates"
    for relative, text in TEMPLATES.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return folder


def test_github_action_deployment_of_the_pipeline_script(
    deployed_repo: Path, templates: Path, run_env: Dict[str, str], simulator: KlaviyoSimulator
) -> None:
    deploy = _run(
        [
            DLT,
            "deploy",
            SCRIPT,
            "github-action",
            "--schedule",
            SCHEDULE,
            "--location",
            str(templates),
        ],
        deployed_repo,
        run_env,
    )

    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "deployment for pipeline klaviyo_segments" in " ".join(deploy.stdout.split())
    workflow_file = deployed_repo / ".github" / "workflows" / "run_klaviyo_segments_workflow.yml"
    text = workflow_file.read_text()
    workflow = yaml.safe_load(text)
    assert workflow["on"]["schedule"] == [{"cron": SCHEDULE}]
    assert "push" not in workflow["on"]  # runs on the schedule, not on every push
    assert workflow["name"] == f"Run klaviyo_segments pipeline from {SCRIPT}"
    steps = workflow["jobs"]["run_pipeline"]["steps"]
    assert steps[-1]["run"] == "cd 'pipelines' && python 'klaviyo_pipeline.py'"
    # The key is read from the repository's secrets, never written into the workflow.
    assert (
        workflow["env"]["SOURCES__KLAVIYO__API_KEY"] == "${{ secrets.SOURCES__KLAVIYO__API_KEY }}"
    )
    assert simulator.api_key not in text
    # Settings the run took from the environment go along as plain variables.
    assert workflow["env"]["SOURCES__KLAVIYO__BASE_URL"] == simulator.base_url
    requirements = (deployed_repo / "requirements_github_action.txt").read_text().splitlines()
    # Top-level packages of the environment, pinned: the source's package brings dlt along.
    assert "klaviyo-source==0.1.0" in requirements


def test_airflow_composer_deployment_of_the_pipeline_script(
    deployed_repo: Path, templates: Path, run_env: Dict[str, str]
) -> None:
    deploy = _run(
        [DLT, "deploy", SCRIPT, "airflow-composer", "--location", str(templates)],
        deployed_repo,
        run_env,
    )

    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    dag = deployed_repo / "dags" / "dag_klaviyo_segments.py"
    assert dag.read_text() == TEMPLATES["airflow-composer/dag_template.py"]
    assert (deployed_repo / "build" / "cloudbuild.yaml").is_file()
    assert "SOURCES__KLAVIYO__API_KEY" in deploy.stdout or "api_key" in deploy.stdout


def test_deploy_refuses_a_pipeline_that_never_ran(
    tmp_path: Path, templates: Path, run_env: Dict[str, str]
) -> None:
    repo = tmp_path / "fresh"
    (repo / "pipelines").mkdir(parents=True)
    shutil.copy(REPO_ROOT / SCRIPT, repo / SCRIPT)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "remote", "add", "origin", ORIGIN)

    deploy = _run(
        [
            DLT,
            "deploy",
            SCRIPT,
            "github-action",
            "--schedule",
            SCHEDULE,
            "--location",
            str(templates),
        ],
        repo,
        run_env,
    )

    assert deploy.returncode != 0
    assert "run the pipeline locally" in " ".join((deploy.stdout + deploy.stderr).split())
    assert not (repo / ".github").exists()
