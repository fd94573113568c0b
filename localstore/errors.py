"""The one error the local object store tooling raises: it always says what to do next."""


class LocalStoreError(RuntimeError):
    """The local object store could not be fetched, started, reached or stopped."""
