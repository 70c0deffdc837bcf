"""What a base URL may be: plain http only to this machine, and its password never shown.

Plain http carries the key readable to every network in between, so a base URL of scheme http
whose host is not a loopback address (127.0.0.0/8, ::1, localhost) is refused before any request
unless the user opts in with `allow_insecure_http`. A password in the base URL's user info
shows in no error and no log line at any level, in the source or through the script.
"""

import logging
import socket
from pathlib import Path
from typing import Callable, Iterator

import dlt
import pytest
from dlt.pipeline.exceptions import PipelineStepFailed
from script_runs import SCRIPT, run_python, run_script, script_env

from klaviyo_source import klaviyo
from klaviyo_source.client import KlaviyoClient
from klaviyo_source.errors import KlaviyoConfigError

API_KEY = "pk_test_0123456789abcdef"
# DEBUG for every logger, not only dlt's: urllib3 and requests log through the root logger.
DEBUG_EVERYTHING = (
    "import logging, runpy, sys; logging.basicConfig(level=logging.DEBUG); "
    f"sys.argv = [{str(SCRIPT)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
)
PASSWORD = "secretpw"


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "base_url",
    ["http://a.klaviyo.com", "http://10.0.0.5:8080", "http://[2001:db8::1]:80", "http://local"],
)
def test_plain_http_to_another_machine_is_refused_naming_the_setting(base_url: str) -> None:
    with pytest.raises(KlaviyoConfigError) as refused:
        KlaviyoClient("pk_x", base_url)
    message = str(refused.value)
    assert "allow_insecure_http" in message and "SOURCES__KLAVIYO__ALLOW_INSECURE_HTTP" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1:8080",
        "http://127.8.9.10",
        "http://localhost:8080",
        "http://LocalHost",
        "http://[::1]:9",
        "https://a.klaviyo.com",
    ],
)
def test_plain_http_to_this_machine_and_https_anywhere_need_no_opt_in(base_url: str) -> None:
    assert KlaviyoClient("pk_x", base_url).base_url == base_url


def test_the_opt_in_is_a_source_setting_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(KlaviyoConfigError):
        klaviyo(api_key="pk_x", base_url="http://klaviyo-proxy.internal:8080")
    monkeypatch.setenv("SOURCES__KLAVIYO__ALLOW_INSECURE_HTTP", "true")

    source = klaviyo(api_key="pk_x", base_url="http://klaviyo-proxy.internal:8080")

    assert "segment_memberships" in source.resources


def test_the_script_refuses_plain_http_elsewhere_in_one_line_before_any_request(
    tmp_path: Path,
) -> None:
    # An address no test machine answers on; refused before any connection is tried.
    env = script_env(tmp_path, "http://192.0.2.1:8080", API_KEY)

    result = run_script(env)

    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "allow_insecure_http" in lines[0] and "Traceback" not in result.stderr


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog at DEBUG for the root logger and dlt's, which does not propagate to the root."""
    dlt_logger = logging.getLogger("dlt")
    dlt_logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="dlt")
    try:
        yield caplog
    finally:
        dlt_logger.removeHandler(caplog.handler)


def test_a_password_in_base_url_shows_in_no_error_and_no_log_line_at_debug(
    closed_port: int,
    make_pipeline: Callable[..., dlt.Pipeline],
    everything_logged: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNTIME__LOG_LEVEL", "DEBUG")
    base_url = f"http://user:{PASSWORD}@127.0.0.1:{closed_port}"

    with pytest.raises(PipelineStepFailed) as failed:
        make_pipeline().run(klaviyo(api_key="pk_x", base_url=base_url))

    logged = everything_logged.text
    assert f"127.0.0.1:{closed_port}" in logged  # the capture does see request lines
    assert "Making GET request to" in logged
    assert PASSWORD not in logged
    shown = [str(error) for error in _chain(failed.value)]
    assert any("Cannot connect to Klaviyo" in text for text in shown)
    assert not any(PASSWORD in text for text in shown)


def test_a_password_in_base_url_shows_nowhere_in_the_scripts_output_at_debug(
    closed_port: int, tmp_path: Path
) -> None:
    env = script_env(tmp_path, f"http://user:{PASSWORD}@127.0.0.1:{closed_port}", API_KEY)
    env["RUNTIME__LOG_LEVEL"] = "DEBUG"

    result = run_python(env, "-c", DEBUG_EVERYTHING)

    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Making GET request to" in output and f"127.0.0.1:{closed_port}" in output
    assert "Cannot connect to Klaviyo" in result.stderr.splitlines()[-1]
    assert PASSWORD not in output


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps, through dlt's step failures."""
    seen = []
    current: object = error
    while isinstance(current, BaseException) and all(current is not known for known in seen):
        seen.append(current)
        yield current
        current = current.__cause__ or getattr(current, "exception", None)


def test_a_password_in_an_invalid_base_url_is_not_shown_either() -> None:
    with pytest.raises(KlaviyoConfigError) as refused:
        KlaviyoClient("pk_x", f"ftp://user:{PASSWORD}@a.klaviyo.com")
    assert PASSWORD not in str(refused.value) and "user:***@" in str(refused.value)
