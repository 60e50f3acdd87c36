import pytest
from mailgate_core.config import BaseSettings, ConfigError, Secret, load_settings, redacted


class Settings(BaseSettings, frozen=True, kw_only=True):
    smtp_port: int = 2587
    postal_api_key: Secret = Secret("")
    allowed_sender_domains: list[str] = []
    tracking: bool = True
    domain: str


def test_values_are_read_and_typed() -> None:
    s = load_settings(
        Settings,
        {
            "SMTP_PORT": "25",
            "ALLOWED_SENDER_DOMAINS": "a.ru, b.ru",
            "TRACKING": "false",
            "DOMAIN": "ours.ru",
            "POSTAL_API_KEY": "k" * 24,
        },
    )
    assert (s.smtp_port, s.allowed_sender_domains, s.tracking) == (25, ["a.ru", "b.ru"], False)
    assert s.postal_api_key.reveal() == "k" * 24


def test_a_bad_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^config error: SMTP_PORT='abc' is not an integer$"):
        load_settings(Settings, {"SMTP_PORT": "abc", "DOMAIN": "x"})


def test_a_missing_required_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DOMAIN is required"):
        load_settings(Settings, {})


def test_secrets_never_show() -> None:
    s = load_settings(Settings, {"DOMAIN": "x", "POSTAL_API_KEY": "supersecretkey"})
    assert "supersecretkey" not in repr(s)
    assert redacted(s)["postal_api_key"] == "**********"
