"""The one exception tree of imitate. The CLI turns any ImitateError into one line and an exit code.

    ImitateError                      exit 1
    ├── ConfigError                   exit 2   bad YAML, unknown key, bad value, missing env var
    ├── InputError                    exit 3   unreadable input file/row, bad dataset, bad model path
    ├── TeacherError                  exit 4   anything the teacher API did wrong (per row: recorded, not raised)
    │   ├── RateLimited                        429 throttling: wait (Retry-After) and retry
    │   ├── QuotaExhausted                     429 insufficient_quota / billing: stop that teacher
    │   ├── AuthError                          401/403: stop that teacher
    │   ├── ModelNotFound                      404 model not found: stop that teacher
    │   ├── TLSFailure                         certificate/handshake failure: stop that teacher
    │   ├── ContextTooLong                     400 context_length_exceeded: record, never retry
    │   ├── BadRequest                         other 4xx: record, never retry
    │   ├── Truncated                          finish_reason == "length": kept with a flag
    │   ├── ContentFiltered                    finish_reason == "content_filter" or a policy 400
    │   ├── ServerError                        5xx: back off and retry
    │   ├── NetworkError                       reset, timeout: back off and retry
    │   │   └── ConnectFailed                  refused, DNS: retry; many in a row with no answer stop the run
    │   └── BadResponse                        malformed JSON, no choices: retry a few times
    │       └── ResponseTooLarge               decoded body over max_response_bytes: never retried
    ├── BudgetExhausted               exit 5   --max-usd / --max-tokens / --max-requests reached
    ├── StorageError                  exit 7   the output cannot be written (disk full, read-only): stop at once
    ├── HubError                      exit 8   the Hugging Face Hub refused a push or could not be reached
    ├── Interrupted                   exit 130 SIGINT/SIGTERM: partial output is valid
    └── TrainError                    exit 6   tokenisation refusals, training or merge failures

Every class carries `retryable` (does a new attempt make sense) so the retry policy is data, not `isinstance`
chains spread across the harvester.
"""

from __future__ import annotations


class ImitateError(Exception):
    """Base of every error imitate raises on purpose."""

    exit_code = 1
    retryable = False

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = f"{type(self).__name__}: {self.message}"
        if self.hint:
            text += f" — {self.hint}"
        return " ".join(text.split())


class ConfigError(ImitateError):
    """A config file, override or environment variable is wrong. `problems` lists every one at once."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None, hint: str | None = None):
        self.problems = problems or []
        if self.problems:
            message = f"{message}: " + "; ".join(self.problems)
        super().__init__(message, hint=hint)


class InputError(ImitateError):
    exit_code = 3


class TeacherError(ImitateError):
    """A teacher request failed. `status` is the HTTP status when there was one."""

    exit_code = 4

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
        hint: str | None = None,
        rate: object | None = None,
    ):
        super().__init__(message, hint=hint)
        self.status = status
        self.retry_after = retry_after
        self.request_id = request_id
        self.rate = rate  # the RateLimitState read off the error response's headers, when there was one


class RateLimited(TeacherError):
    retryable = True


class QuotaExhausted(TeacherError):
    pass


class AuthError(TeacherError):
    pass


class ModelNotFound(TeacherError):
    """404 for the model (or the endpoint): no request to this teacher can succeed."""


class TLSFailure(TeacherError):
    """The TLS handshake or certificate check failed: retrying cannot help."""


class ContextTooLong(TeacherError):
    pass


class BadRequest(TeacherError):
    pass


class Truncated(TeacherError):
    pass


class ContentFiltered(TeacherError):
    pass


class ServerError(TeacherError):
    retryable = True


class NetworkError(TeacherError):
    retryable = True


class ConnectFailed(NetworkError):
    """No connection could be made (refused, DNS failure, unreachable host): nothing was sent or billed."""


class BadResponse(TeacherError):
    retryable = True


class ResponseTooLarge(BadResponse):
    """An endless or inflating body, cut at the cap: a server that sent it once would send it again, and the
    teacher may bill each attempt, so the row fails for good."""

    retryable = False


class BudgetExhausted(ImitateError):
    exit_code = 5


class StorageError(ImitateError):
    """The output directory cannot be written (ENOSPC, EROFS, EACCES...): buying answers that cannot be stored
    would waste money, so the run stops at once."""

    exit_code = 7


class HubError(ImitateError):
    """`imitate export --hub`: the Hub answered with an error (auth, permission, bad card) or could not be reached."""

    exit_code = 8


class Interrupted(ImitateError):
    exit_code = 130


class TrainError(ImitateError):
    exit_code = 6


# Teacher errors after which no more requests should go to that teacher in this run.
TEACHER_FATAL = (QuotaExhausted, AuthError, ModelNotFound, TLSFailure)
