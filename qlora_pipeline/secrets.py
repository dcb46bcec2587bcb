"""Credentials: which ones this machine holds, so that no log, saved config, card, checkpoint or upload carries
their values. The one place that knows their names and how a value is redacted."""

from __future__ import annotations

import os

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
REDACTED = "[redacted]"


def secret_values() -> dict[str, str]:
    """{env var: value} of the credentials set in the environment (values of 8+ characters)."""
    values = {}
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if len(value) >= 8:
            values[name] = value
    return values


def machine_secrets() -> dict[str, str]:
    """{description: value} of every credential this machine holds: the env vars and the saved Hub login."""
    values = secret_values()
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # noqa: BLE001 -- an unreadable token file: nothing to compare with
        token = None
    if token and len(token) >= 8 and token not in values.values():
        values["the saved Hugging Face token"] = token
    return values


def redact(text: str, secrets: dict[str, str] | None = None) -> str:
    """The text with every credential value (default: those in the environment) replaced by [redacted]."""
    for value in (secret_values() if secrets is None else secrets).values():
        text = text.replace(value, REDACTED)
    return text
