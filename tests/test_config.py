"""chatd.toml + environment: strict loading with errors that point at the line."""

import subprocess
import sys
from pathlib import Path

import pytest

from chatd import config
from chatd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GOOD = '[auth]\nhs256_secret = "s3cret-value"\n'


def load_text(tmp_path, text, env=None):
    path = tmp_path / "chatd.toml"
    path.write_text(text)
    return config.load(path, env=env or {})


def problems(tmp_path, text, env=None):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    return info.value.problems


def test_defaults_and_values_load_into_frozen_dataclasses(tmp_path):
    cfg = load_text(tmp_path, GOOD + "[websocket]\nport = 9000\nhello_timeout = 2\n")
    assert cfg.websocket.port == 9000 and cfg.websocket.hello_timeout == 2.0
    assert cfg.http.host == "127.0.0.1"
    with pytest.raises(AttributeError):
        cfg.websocket.port = 1  # frozen


def test_unknown_key_names_key_file_and_line(tmp_path):
    (msg,) = problems(tmp_path, GOOD + "[http]\nport = 80\nprot = 81\n")
    assert "chatd.toml:5" in msg and "unknown key 'http.prot'" in msg and "host, port" in msg


def test_unknown_section(tmp_path):
    (msg,) = problems(tmp_path, GOOD + "[htp]\nport = 80\n")
    assert "unknown key 'htp'" in msg and ":3" in msg


def test_wrong_type(tmp_path):
    (msg,) = problems(tmp_path, GOOD + '[http]\nport = "eighty"\n')
    assert "'http.port' must be an integer, got 'eighty'" in msg and ":4" in msg


def test_bool_is_not_an_integer(tmp_path):
    (msg,) = problems(tmp_path, GOOD + "[http]\nport = true\n")
    assert "must be an integer" in msg


def test_out_of_range(tmp_path):
    (msg,) = problems(tmp_path, GOOD + "[database]\npool_size = 0\n")
    assert "'database.pool_size' must be between 1 and 500, got 0" in msg


def test_choice(tmp_path):
    (msg,) = problems(tmp_path, GOOD + '[log]\nformat = "xml"\n')
    assert "must be one of json, console" in msg


def test_pattern(tmp_path):
    (msg,) = problems(tmp_path, GOOD + '[websocket]\npath = "ws"\n')
    assert "'websocket.path' has the wrong form" in msg


def test_nested_section(tmp_path):
    (msg,) = problems(tmp_path, GOOD + "[database.embedded]\nport = 70000\n")
    assert "'database.embedded.port' must be between 0 and 65535" in msg and ":4" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems(tmp_path, GOOD + '[http]\nport = "x"\nbogus = 1\n[log]\nlevel = "loud"\n')
    assert len(found) == 3


def test_not_toml(tmp_path):
    (msg,) = problems(tmp_path, "[http\nport = 1\n")
    assert "not valid TOML" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml", env={})


def test_no_token_key_is_an_error(tmp_path):
    (msg,) = problems(tmp_path, "[http]\nport = 1\n")
    assert "[auth] needs at least one of" in msg


def test_environment_overrides_file_with_typed_values(tmp_path):
    env = {"CHATD_HTTP__PORT": "9999", "CHATD_DATABASE__EMBEDDED__PORT": "5433", "CHATD_LOG__FORMAT": "json"}
    cfg = load_text(tmp_path, GOOD + "[http]\nport = 80\n", env)
    assert cfg.http.port == 9999 and cfg.database.embedded.port == 5433 and cfg.log.format == "json"


def test_bad_environment_value_names_the_variable(tmp_path):
    (msg,) = problems(tmp_path, GOOD, {"CHATD_WEBSOCKET__PORT": "abc"})
    assert "environment variable CHATD_WEBSOCKET__PORT" in msg and "must be an integer" in msg


def test_unknown_environment_key(tmp_path):
    (msg,) = problems(tmp_path, GOOD, {"CHATD_HTTP__PROT": "1"})
    assert "CHATD_HTTP__PROT" in msg and "unknown key 'http.prot'" in msg


def test_relative_state_dir_is_relative_to_the_file(tmp_path):
    cfg = load_text(tmp_path, GOOD + '[database.embedded]\nstate_dir = "data"\n')
    assert cfg.database.embedded.state_dir == tmp_path / "data"


def test_effective_config_masks_secrets(tmp_path):
    cfg = load_text(tmp_path, GOOD + '[database]\nurl = "postgresql://chatd:hunter2@db/chatd"\n')
    shown = config.to_toml(config.effective(cfg))
    assert "hunter2" not in shown and "s3cret-value" not in shown
    assert "postgresql://chatd:***@db/chatd" in shown


def test_check_config_cli_prints_errors_and_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(GOOD + "[http]\nport = -1\n")
    run = subprocess.run([sys.executable, "-m", "chatd", "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"{path}:4" in run.stderr and "'http.port' must be between 0 and 65535" in run.stderr


def test_check_config_cli_prints_effective_config(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(GOOD)
    run = subprocess.run([sys.executable, "-m", "chatd", "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "[websocket]" in run.stdout and 'hs256_secret = "***"' in run.stdout


def test_docs_and_example_are_generated_from_the_schema():
    assert (ROOT / "docs" / "config.md").read_text() == config.render_markdown(), "run: chatd check-config --docs > docs/config.md"
    assert (ROOT / "config" / "chatd.example.toml").read_text() == config.render_example(), "run: chatd check-config --example > config/chatd.example.toml"


def test_example_and_dev_config_load(tmp_path):
    config.load(ROOT / "chatd.toml", env={})
    example = (ROOT / "config" / "chatd.example.toml").read_text().replace('hs256_secret = ""', 'hs256_secret = "x"')
    load_text(tmp_path, example)
