"""Settings from the environment: one typed object per service, validated at start-up.

A service declares its settings as a ``msgspec.Struct`` whose field names are the env var
names in lower case. ``load_settings`` reads them once; a bad or missing value raises
``ConfigError`` naming the variable, which ``run_service`` prints as one line and exits 2.

    class Settings(BaseSettings, frozen=True, kw_only=True):
        smtp_port: int = 2587
        postal_api_key: Secret = Secret("")
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec


class ConfigError(Exception):
    """A setting is missing or malformed. The message names the variable."""


class Secret(str):
    """A string that never shows its value in repr, logs or error messages."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('**********')" if self else "Secret('')"

    def reveal(self) -> str:
        return str.__str__(self)


class BaseSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings every service has."""

    nats_url: str = "nats://127.0.0.1:4222"
    service_name: str = "mailgate"
    ops_host: str = "0.0.0.0"
    ops_port: int = 9100
    """Port of /metrics, /healthz and /readyz (HTTP services serve them on their own port)."""
    log_level: str = "info"
    shutdown_grace_s: float = 20.0
    jetstream_replicas: int = 1
    """Replicas of the streams, KV buckets and object store ``provision`` creates (3 on a
    3-node JetStream cluster; 1 on one server)."""
    consumer_lag_interval_s: float = 15.0
    """How often each pull consumer's backlog gauges are refreshed (0: never)."""


S = TypeVar("S", bound=BaseSettings)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(raw: str, annotation: Any) -> Any:
    """Turn an env string into what the field's type expects, before msgspec validates it."""
    text = raw.strip()
    if annotation is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        return raw  # msgspec will complain with the type name
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            return raw
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            return raw
    origin = getattr(annotation, "__origin__", None)
    if origin in (list, tuple):
        return [item.strip() for item in text.split(",") if item.strip()]
    return raw


def _type_phrase(annotation: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "a boolean (true/false)"}
    if annotation in names:
        return names[annotation]
    return f"a valid {getattr(annotation, '__name__', str(annotation))}"


def load_settings(cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """Build ``cls`` from ``env`` (default: os.environ); raise ConfigError naming the variable."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    hints = {f.name: f for f in info.fields}
    resolved = typing.get_type_hints(cls)
    for name, field in hints.items():
        var = name.upper()
        if var not in source:
            if field.required:
                raise ConfigError(f"config error: {var} is required but not set")
            continue
        annotation = resolved.get(name, str)
        raw = source[var]
        value = _coerce(raw, annotation)
        try:
            msgspec.convert({name: value}, type=_single_field(cls, name, annotation))
        except msgspec.ValidationError:
            shown = "'**********'" if annotation is Secret else repr(raw)
            raise ConfigError(
                f"config error: {var}={shown} is not {_type_phrase(annotation)}"
            ) from None
        values[name] = Secret(value) if annotation is Secret else value
    try:
        settings = msgspec.convert(values, type=cls)
    except msgspec.ValidationError as exc:  # cross-field or unusual types
        raise ConfigError(f"config error: {exc}") from None
    # msgspec turns Secret back into str; restore the wrapper so values stay redacted.
    for name in hints:
        if resolved.get(name) is Secret:
            current = getattr(settings, name)
            if not isinstance(current, Secret):
                settings = msgspec.structs.replace(settings, **{name: Secret(current)})
    validate = getattr(settings, "validate", None)
    if callable(validate):
        validate()
    return settings


_single_cache: dict[tuple[type, str], type] = {}


def _single_field(cls: type, name: str, annotation: Any) -> type:
    key = (cls, name)
    if key not in _single_cache:
        target = str if annotation is Secret else annotation
        _single_cache[key] = msgspec.defstruct(f"{cls.__name__}_{name}", [(name, target)])
    return _single_cache[key]


def redacted(settings: msgspec.Struct) -> dict[str, Any]:
    """Settings as a dict for a start-up log line, secrets replaced."""
    out: dict[str, Any] = {}
    for name in settings.__struct_fields__:
        value = getattr(settings, name)
        out[name] = "**********" if isinstance(value, Secret) and value else value
    return out
