"""What the three services' settings share: their base class and the field types that validate
(and normalise) a log level, an http(s) base URL and a path taken from the repository root.

Each service's settings class subclasses ServiceSettings with its own GESCO_<SERVICE>_ prefix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.paths import resolve_repo_path


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _base_url(value: str) -> str:
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


# DEBUG, INFO, WARNING or ERROR, in any case.
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)]
# An http(s) URL that paths are appended to, without its trailing slash; "" stays empty.
BaseUrl = Annotated[str, AfterValidator(_base_url)]
# A path as given when absolute, else taken from the repository root (not the working directory).
RepoPath = Annotated[Path, AfterValidator(resolve_repo_path)]


class ServiceSettings(BaseSettings):
    """Settings read from the environment, unknown variables ignored; every service logs."""

    model_config = SettingsConfigDict(extra="ignore")

    log_level: LogLevel = "INFO"
