"""Settings of the local object store (env prefix SVD_LOCALSTORE_).

The credentials are local throwaway ones, the same on every machine; they still exist so that
every request is signed (SigV4) and checked, as it would be against S3.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

# S3's bucket naming rules: 3-63 characters, lower case letters, digits, dots and hyphens.
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class LocalStoreSettings(BaseSettings):
    """Where the jar is cached, where the store keeps its objects, and how it is started."""

    # hide_input_in_errors: a validation error would otherwise print the secret.
    model_config = SettingsConfigDict(
        env_prefix="SVD_LOCALSTORE_", frozen=True, hide_input_in_errors=True
    )

    s3proxy_version: str = "3.0.0"
    home: Path = Field(default=REPO_ROOT / ".s3proxy", description="jar cache, default instance")
    workdir: Path | None = Field(default=None, description="store state; default <home>/instance")
    port: int = Field(default=0, ge=0, le=65535, description="HTTP port; 0: previous or free")
    host: str = "127.0.0.1"
    bucket: str = Field(default="svd-payloads", pattern=BUCKET_PATTERN)
    region: str = "us-east-1"
    access_key_id: str = Field(default="svd-local", min_length=1)
    secret_access_key: SecretStr = Field(default=SecretStr("svd-local-secret"), min_length=1)
    # S3Proxy holds a single (not multipart) SigV4 PUT in its heap to check the payload's hash:
    # a 140 MiB PUT failed with OutOfMemoryError at 256 MiB. obstore uploads anything over its
    # chunk size (5 MiB) in parts, so 512 MiB leaves room for several concurrent uploads.
    heap_mb: int = Field(default=512, ge=128)
    start_timeout_s: float = Field(default=60.0, gt=0)
    stop_timeout_s: float = Field(default=20.0, gt=0)

    @property
    def jar_path(self) -> Path:
        return self.home / f"s3proxy-{self.s3proxy_version}-jar-with-dependencies.jar"
