"""Helpers shared by the test modules (one place: test modules never import each other)."""

from __future__ import annotations

import os
import pathlib

from segproto import TOKEN_ENV, TOKEN_FILE_ENV


def without_token(monkeypatch) -> None:
    """This process, as a user without the server's token: no ``$SEGSERVE_TOKEN`` and a token
    file that does not exist (a real one may sit in ~/.config/segserve from another run)."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(TOKEN_FILE_ENV, "/nonexistent/segserve-token")


def environment_without_token(directory: pathlib.Path) -> dict[str, str]:
    """Environment of a subprocess run by a user without the token."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env[TOKEN_FILE_ENV] = str(directory / "no-token-here")
    return env
