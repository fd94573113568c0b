"""The one error the local broker tooling raises: it always says what to do next."""


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started, reached or stopped."""
