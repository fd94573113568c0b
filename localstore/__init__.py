"""A real S3-compatible object store for development, tests and the demo, without Docker.

S3Proxy (Apache-2.0, one jar from Maven Central, cached in the project's ``.s3proxy/`` folder so
only the first start needs the network) serves a local directory over the S3 API with real
SigV4 authentication, so the service and the SDK talk to it exactly as they would to S3.
"""

from localstore.errors import LocalStoreError
from localstore.server import CLIENT_PREFIX, SERVICE_PREFIX, LocalStore, StoreState, store_env
from localstore.settings import LocalStoreSettings

__all__ = [
    "CLIENT_PREFIX",
    "SERVICE_PREFIX",
    "LocalStore",
    "LocalStoreError",
    "LocalStoreSettings",
    "StoreState",
    "store_env",
]
