"""A component's object store: where it writes payloads, what it trusts to read, how to connect.

One settings class per component, each with its own env prefix: ``SVD_STORE_`` for the service,
``SVD_CLIENT_STORE_`` for the SDK (``producer_sdk.settings``). Secrets are ``SecretStr``: masked
in repr, dumps and validation errors, and never logged.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from objectstore.locations import Location, Trust


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SVD_STORE_", frozen=True, extra="forbid", hide_input_in_errors=True
    )

    url: str | None = Field(
        default=None,
        description=(
            "where payloads are written: s3://bucket[/prefix] or file:///absolute/root; "
            "None: no store, every payload travels inline"
        ),
    )
    trusted_urls: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="more locations to read references from (comma-separated), besides url",
    )
    # S3 (ignored for file://)
    endpoint: str | None = Field(default=None, description="None: AWS S3 of the region")
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    allow_http: bool = Field(default=False, description="plain HTTP to the endpoint (local only)")
    virtual_hosted_style: bool = Field(
        default=False, description="bucket.endpoint/key instead of endpoint/bucket/key"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="one HTTP request, whole body")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # The store client's own retries of one call; longer outages are the caller's (the service
    # retries a request with backoff for store_outage_s, the SDK within the call's timeout).
    request_retries: int = Field(default=2, ge=0)

    @field_validator("trusted_urls", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            Location.parse(value)  # a ValueError names the setting
        return value

    @field_validator("trusted_urls")
    @classmethod
    def _trusted(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            Location.parse(url)
        return value

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @property
    def location(self) -> Location:
        if self.url is None:
            raise RuntimeError("no object store is configured")
        return Location.parse(self.url)

    def trust(self) -> Trust:
        urls = ([self.url] if self.url else []) + list(self.trusted_urls)
        return Trust(tuple(Location.parse(url) for url in urls))

    def describe(self) -> str:
        """For logs: where, never credentials."""
        if self.url is None:
            return "no object store"
        via = f" via {self.endpoint}" if self.endpoint and self.url.startswith("s3:") else ""
        return f"{self.url}{via}"
