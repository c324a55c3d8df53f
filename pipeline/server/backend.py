"""The server's database URI (`BACKEND_STORE_URI`): shown only with its password masked, and
checked for a connection before `mlflow server` starts on it.

MLflow retries a refused database connection for about 100 s and then ends in a SQLAlchemy
traceback; one connection attempt of our own says the same in one line within seconds.
"""

from __future__ import annotations

import os
import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

ENV = "BACKEND_STORE_URI"
CONNECT_TIMEOUT_S = 5


class BackendError(Exception):
    """The database cannot be used; the message says which one (password masked) and why."""


def from_environment() -> str:
    """The URI the user exported (the only way a password in it stays off command lines)."""
    return os.environ.get(ENV, "")


def masked(uri: str) -> str:
    """`uri` with its password, if any, as ***."""
    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        # Not a URL SQLAlchemy understands: mask whatever sits between user: and @.
        return re.sub(r"(://[^/@:]*:)[^@/]*@", r"\1***@", uri)


def has_password(uri: str) -> bool:
    try:
        return make_url(uri).password is not None
    except ArgumentError:
        return masked(uri) != uri


def check_connection(uri: str) -> None:
    """Connect to the database once (libpq reads the password from the URI, PGPASSFILE or
    ~/.pgpass, as the server will); BackendError naming host and port if that fails."""
    from sqlalchemy import create_engine, exc
    from sqlalchemy.pool import NullPool

    url = make_url(uri)
    engine = create_engine(url, poolclass=NullPool,
                           connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        with engine.connect():
            pass
    except exc.DBAPIError as err:
        raise BackendError(
            f"cannot connect to PostgreSQL at {url.host or 'localhost'}:{url.port or 5432} "
            f"({_reason(err.orig)}): start it, or fix {ENV} ({masked(uri)})") from None
    finally:
        engine.dispose()


def _reason(error: BaseException) -> str:
    """libpq's own words, without its multi-line hints: 'Connection refused',
    'FATAL:  password authentication failed for user "alice"', ..."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"\s+", " ", first.rsplit(" failed: ", 1)[-1]).strip()


def scrub(text: str, uri: str) -> str:
    """`text` (a log's tail, say) with the password of `uri` replaced by ***."""
    try:
        password = make_url(uri).password
    except ArgumentError:
        password = None
    return text.replace(password, "***") if password else text
