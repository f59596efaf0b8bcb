"""The one exception tree of mi2b2.

    Mi2b2Error                 every error mi2b2 raises on purpose; str() is shown to users
    ├── InvalidInput           the caller sent something unusable (fix the input)
    │   ├── ConfigError        the site configuration is wrong (fix the file)
    │   └── LimitExceeded      the input is over one of the site's limits (size, count, range)
    ├── AccessDenied           the caller may not do this (IRB, membership, role)
    ├── NotFound               the named thing does not exist
    ├── PermanentError         an operation failed and retrying will not help
    └── RetriableError         an operation failed for a reason that may pass (network, load)

Adapters translate library exceptions (pynetdicom, SQLAlchemy, OS errors) into
these at their boundary; services never raise HTTP errors; the API maps these
to status codes in one handler, the CLI prints them without a traceback.
"""


class Mi2b2Error(Exception):
    """Base of every deliberate mi2b2 error. The message names the fix."""


class InvalidInput(Mi2b2Error):
    pass


class ConfigError(InvalidInput):
    pass


class LimitExceeded(InvalidInput):
    """Over a limit that keeps one request from exhausting the server; the message names the limit."""


class AccessDenied(Mi2b2Error):
    pass


class NotFound(Mi2b2Error):
    pass


class PermanentError(Mi2b2Error):
    pass


class RetriableError(Mi2b2Error):
    retry_after: int | None = None  # seconds worth waiting before trying again, when known
