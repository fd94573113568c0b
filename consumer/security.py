"""Why a connection to Kafka fails, in words an operator can act on (docs/security.md).

aiokafka's ``start()`` reports a refused password, an untrusted certificate and a wrong address
alike, as ``KafkaConnectionError("Unable to bootstrap from ...")``: the cause is only logged.
After a failed start the service makes one more connection itself, to the first bootstrap
server, to say which it is; then it exits. One diagnostic connection, never a retry loop.

``producer_sdk/_security.py`` holds the same function for the SDK, which does not depend on the
service; keep the two in step.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping

from aiokafka import errors as kafka_errors


class HideSaslAuthBytes(logging.Filter):
    """aiokafka.conn logs every request it sends at DEBUG, SaslAuthenticateRequest too, and with
    PLAIN those bytes are the password in clear. The line stays; the request's bytes do not."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(map(_is_sasl_request, record.args)):
            record.args = tuple(
                "SaslAuthenticateRequest(<hidden>)" if _is_sasl_request(arg) else arg
                for arg in record.args
            )
        return True


def _is_sasl_request(arg: object) -> bool:
    return type(arg).__name__.startswith("SaslAuthenticateRequest")


# On import, so it is in place before the first connection: a filter on the logger itself
# applies whichever handlers the application configures.
_aiokafka_conn_log = logging.getLogger("aiokafka.conn")
if not any(type(f).__name__ == HideSaslAuthBytes.__name__ for f in _aiokafka_conn_log.filters):
    _aiokafka_conn_log.addFilter(HideSaslAuthBytes())


async def connect_failure_reason(
    bootstrap_servers: str, security: Mapping[str, object], timeout_s: float = 10.0
) -> str | None:
    """Why one connection with ``security`` (``kafka_security()``) fails; None if it works.

    The connection goes as far as aiokafka's bootstrap does: TLS, SASL, a metadata request.
    """
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    host, _, port = bootstrap_servers.split(",")[0].strip().rpartition(":")
    tls = security.get("security_protocol") in ("SSL", "SASL_SSL")
    conn = None
    try:
        async with asyncio.timeout(timeout_s):
            conn = await create_conn(
                host.strip("[]"), int(port), request_timeout_ms=int(timeout_s * 1000), **security
            )
            await conn.send(MetadataRequest([]))
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout_s:.0f}s"
    except Exception as exc:
        return describe_connect_error(exc, tls=tls, address=f"{host}:{port}")
    finally:
        if conn is not None:
            conn.close()
    return None


def describe_connect_error(exc: BaseException, *, tls: bool, address: str) -> str:
    """One connection error, as the configuration it points at (never a credential)."""
    if isinstance(exc, kafka_errors.SaslAuthenticationFailed):
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else exc.description
        return f"the broker rejected the credentials ({detail})"
    if isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else exc.description
        return f"the listener does not offer this SASL mechanism ({detail})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the broker's certificate is not trusted ({exc.verify_message}): check ssl_cafile, "
            "and that the bootstrap host is named in the certificate"
        )
    if isinstance(exc, ssl.SSLError):
        return f"the TLS handshake failed ({exc.reason or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens on {address}"
    if isinstance(exc, kafka_errors.KafkaConnectionError) and "closed" in str(exc):
        # What a broker does to a TLS client it does not accept (ssl.client.auth=required and no
        # certificate, or one from a CA it does not trust), or to a client speaking the wrong
        # protocol for the listener.
        if tls:
            return (
                "the broker closed the connection during the TLS handshake: it requires a client "
                "certificate it trusts (ssl_certfile, ssl_keyfile), or the listener is not TLS"
            )
        return "the broker closed the connection: the listener expects another security_protocol"
    return f"{type(exc).__name__}: {exc}"
