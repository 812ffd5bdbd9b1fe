"""Configuration: defaults, YAML file, environment overrides, and errors that name the field."""

import pytest

from braid.shared.config import ConfigError, load_config


def test_dev_defaults():
    config = load_config(dev=True, env={})
    assert config.keys == {"devkey": "secret"}
    assert (config.bind, config.port, config.role) == ("127.0.0.1", 7880, "all")
    assert not config.redis.enabled


def test_file_then_environment(tmp_path):
    path = tmp_path / "braid.yaml"
    path.write_text(
        "keys:\n  k1: s1\nport: 9000\nroom:\n  empty_timeout: 30\nwebhook:\n  urls: [http://a/hook]\n"
        "redis:\n  address: 127.0.0.1:6390\n  key_prefix: test\n"
    )
    config = load_config(str(path), env={"BRAID_PORT": "9100", "BRAID_KEYS": "k2: s2\nk3: s3"})
    assert config.port == 9100, "environment overrides the file"
    assert config.keys == {"k2": "s2", "k3": "s3"}
    assert config.room.empty_timeout == 30 and config.webhook.urls == ["http://a/hook"]
    assert config.redis.address == "127.0.0.1:6390" and config.redis.key_prefix == "test"


@pytest.mark.parametrize(
    "text,field",
    [
        ("keys: {a: b}\nprot: 1\n", "prot: unknown field"),
        ("keys: {a: b}\nroom:\n  max_participants: many\n", "room.max_participants"),
        ("keys: {a: b}\nwebhook:\n  urls: [ftp://x]\n", "webhook.urls"),
        ("keys: {a: b}\nrtc:\n  port_range_start: 9\n  port_range_end: 2\n", "rtc.port_range_start"),
        ("port: 7880\n", "keys"),
        ("keys: [1, 2]\n", "keys"),
        ("- a\n- b\n", "config"),
    ],
)
def test_invalid_files_name_the_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path), env={})
    assert str(err.value).startswith(field), str(err.value)


def test_unreadable_file_is_reported():
    with pytest.raises(ConfigError, match="config file"):
        load_config("/nonexistent/braid.yaml", env={})
