"""Mail: Flask-Mailman behind a small background queue, and the security notices (ASVS 5.0 V6.3.7).

``MAIL_BACKEND`` picks where messages go:

* ``file`` (the default): one RFC 5322 ``.eml`` file per message in
  ``MAIL_FILE_PATH`` (unset: ``outbox`` in the data folder), folder 0700,
  files 0600, written under a temporary name and renamed, so a reader never
  sees half a message. Someone trying the site opens the newest file.
* ``smtp``: Flask-Mailman's SMTP backend, with the server's certificate
  verified. Flask-Mailman 1.1 calls ``starttls()`` without a context, and
  smtplib then uses an unverifying one: anyone on the path could present any
  certificate and read every reset link (the same bug as pallets-eco/flask-mail#241).
* ``console`` and ``locmem``: Flask-Mailman's own, for debugging and tests.

Sending never happens on the request's thread. :func:`submit` hands a job to
a per-process daemon thread (started at first use, and again in a forked
child); a failed send is logged and retried after ``MAIL_RETRY_DELAY``
seconds, doubling, up to ``MAIL_MAX_ATTEMPTS`` times. The page is the same
whether the mail server is up, slow or down. :func:`flush` waits for the
queue to drain (tests; shutdown).
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import itertools
import logging
import os
import secrets
import smtplib
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from email.utils import make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, current_app, has_request_context, render_template, request
from flask_mailman import EmailMessage, Mail
from flask_mailman.backends.base import BaseEmailBackend
from flask_mailman.backends.smtp import EmailBackend as MailmanSMTPBackend

from .sessions import clean_ip

log = logging.getLogger(__name__)

EXTENSION = "secure_app.mail"
BACKENDS = ("file", "smtp", "console", "locmem")
# What each notice says happened; the key is what callers pass to notify().
NOTICES = {
    "password_changed": "Your password was changed",
    "password_reset": "Your password was reset with a link sent to this address",
    "email_change_requested": "A new email address was set for your account",
    "totp_enabled": "Two-step sign-in was turned on",
    "totp_disabled": "Two-step sign-in was turned off",
    "recovery_codes_regenerated": "New recovery codes were made; the old ones no longer work",
    "recovery_code_used": "A recovery code was used to sign in",
    "passkey_added": "A passkey was added to your account",
    "passkey_removed": "A passkey was removed from your account",
    "two_factor_reset": "An operator removed your second factors and signed you out everywhere",
}


class EmlFileBackend(BaseEmailBackend):
    """Write each message as one RFC 5322 ``.eml`` file (Flask-Mailman's ``file`` appends a log)."""

    def send_messages(self, email_messages: list[EmailMessage]) -> int:
        folder = Path(current_app.config["MAIL_FILE_PATH"])
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for message in email_messages:
            data = message.message().as_bytes(linesep="\r\n")
            # Sortable by time, so "the newest message" is the last name.
            name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.eml"
            tmp = folder / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, folder / name)
            finally:
                tmp.unlink(missing_ok=True)
        return len(email_messages)


class VerifiedSMTPBackend(MailmanSMTPBackend):
    """Flask-Mailman's SMTP backend, verifying the server's certificate for STARTTLS and SSL."""

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=current_app.config["MAIL_CA_FILE"])
        if self.ssl_certfile:  # a client certificate, for relays that ask for one
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context

    def open(self) -> bool | None:
        if self.connection:
            return False
        # Our own host name for EHLO: socket.getfqdn() can wait seconds on DNS.
        params: dict[str, Any] = {
            "local_hostname": _public_host(),
            "timeout": self.timeout,
        }
        try:
            if self.use_ssl:
                self.connection = smtplib.SMTP_SSL(
                    self.host, self.port, context=self._context(), **params
                )
            else:
                self.connection = smtplib.SMTP(self.host, self.port, **params)
                if self.use_tls:  # never falls back to plain text: no STARTTLS is an error
                    self.connection.starttls(context=self._context())
            if self.username and self.password:
                self.connection.login(self.username, self.password)
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            self.connection = None
            raise
        return True


def init_app(app: Flask) -> None:
    """Set up Flask-Mailman from the ``MAIL_*`` keys and give the app its queue."""
    config = app.config
    backend = str(config["MAIL_BACKEND"] or "file")
    if backend not in BACKENDS:
        raise RuntimeError(f"FLASK_MAIL_BACKEND={backend!r}: use one of {', '.join(BACKENDS)}")
    path = Path(config["MAIL_FILE_PATH"] or Path(config["DATA_DIR"]) / "outbox")
    root = Path(app.root_path).parent
    config["MAIL_FILE_PATH"] = str(path if path.is_absolute() else root / path)
    if config["MAIL_USERNAME"] and not (config["MAIL_USE_TLS"] or config["MAIL_USE_SSL"]):
        raise RuntimeError("FLASK_MAIL_USERNAME needs FLASK_MAIL_USE_TLS or FLASK_MAIL_USE_SSL")
    if not config["MAIL_DEFAULT_SENDER"]:
        config["MAIL_DEFAULT_SENDER"] = f"secure_app <no-reply@{_public_host(config)}>"
    state = Mail().init_app(app)
    # A class, not a name: Flask-Mailman imports names, and ours are not in its package.
    state.backend = {"file": EmlFileBackend, "smtp": VerifiedSMTPBackend}.get(backend, backend)
    app.extensions[EXTENSION] = Outbox(app)


def _public_host(config: Any = None) -> str:
    config = current_app.config if config is None else config
    return urlsplit(config["PUBLIC_URL"]).hostname or "localhost"


def link(endpoint: str, **values: Any) -> str:
    """Return an absolute link for a message: ``PUBLIC_URL`` plus the route's path, never the Host.

    Built from the URL map, not ``url_for``: it must work on the mail thread,
    where there is no request, and give the same answer on a request thread
    whatever Host or X-Forwarded-Host the client sent (password-reset poisoning).
    """
    config = current_app.config
    adapter = current_app.url_map.bind("unused.invalid", script_name=config["APPLICATION_ROOT"])
    return config["PUBLIC_URL"] + adapter.build(endpoint, values)


def message(to: str, subject: str, template: str, **context: Any) -> EmailMessage:
    """Build a plain-text message from ``templates/<template>``; call with an app context."""
    body = render_template(template, public_url=current_app.config["PUBLIC_URL"], **context)
    return EmailMessage(
        subject=subject,
        body=body,
        to=[to],
        headers={"Message-ID": make_msgid(domain=_public_host())},
    )


def send(msg: EmailMessage) -> None:
    """Queue ``msg``: it is sent on the mail thread, retried if the server fails."""
    # The log names the domain only: an address is personal data.
    domain = msg.to[0].rpartition("@")[2]
    _outbox().submit(lambda: msg.send(), retry=True, what=f"mail to *@{domain}")


def submit(job: Callable[[], object]) -> None:
    """Run ``job`` once on the mail thread, with an app context (look-ups off the request path)."""
    _outbox().submit(job, retry=False, what=getattr(job, "__name__", "job"))


def flush(timeout: float = 10.0, app: Flask | None = None) -> bool:
    """Wait until every queued job and message is done (sent or given up); False on timeout."""
    outbox = _outbox() if app is None else app.extensions[EXTENSION]
    return outbox.flush(timeout)


def notify(record: dict[str, Any], what: str, ip: str | None = None, detail: str = "") -> None:
    """Tell the verified address that ``what`` (a key of NOTICES) happened, when and from where.

    Nothing is sent to an address that was never verified: anyone can type one.
    """
    address = record.get("email_verified")
    if not isinstance(address, str) or not address or what not in NOTICES:
        return
    if ip is None and has_request_context():
        # A forwarded header may carry any text, and this line goes into a mail
        # the owner trusts: only a real address is shown.
        ip = clean_ip(request.remote_addr)
    send(
        message(
            address,
            f"Security notice: {NOTICES[what].lower()}",
            "recovery/mail/notice.txt",
            username=record.get("username", ""),
            happened=NOTICES[what],
            when=time.strftime("%d %B %Y, %H:%M UTC", time.gmtime()),
            ip=ip or "unknown",
            detail=detail,
            forgot_url=link("recovery.forgot_password"),
            security_url=link("two_factor.security"),
        )
    )


def _outbox() -> Outbox:
    return current_app.extensions[EXTENSION]


# -- the queue ---------------------------------------------------------------------

_ALL: weakref.WeakSet[Outbox] = weakref.WeakSet()
# Seconds the mail thread waits with nothing to do before it ends.
IDLE_EXIT = 60.0


class Outbox:
    """A per-process queue with one daemon thread that runs jobs in the app's context."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._reset()
        _ALL.add(self)

    def _reset(self) -> None:
        """Start empty, with no thread: at creation, and in a forked child (threads do not fork)."""
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, int, Callable[[], object], bool, str]] = []
        self._seq = itertools.count()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def submit(self, job: Callable[[], object], retry: bool, what: str) -> None:
        if self._pid != os.getpid():
            self._reset()
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic(), next(self._seq), 1, job, retry, what))
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mail", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    if self._heap:  # a retry that is not due yet
                        self._cond.wait(max(0.0, self._heap[0][0] - time.monotonic()))
                    elif not self._cond.wait(IDLE_EXIT) and not self._heap:
                        self._thread = None  # idle: end; the next submit starts another
                        return
                _, _, attempt, job, retry, what = heapq.heappop(self._heap)
            done = self._attempt(job, retry, attempt, what)
            with self._cond:
                if not done:
                    delay = float(self.app.config["MAIL_RETRY_DELAY"]) * 2 ** (attempt - 1)
                    due = time.monotonic() + delay
                    heapq.heappush(
                        self._heap, (due, next(self._seq), attempt + 1, job, retry, what)
                    )
                else:
                    self._pending -= 1
                self._cond.notify_all()

    def _attempt(self, job: Callable[[], object], retry: bool, attempt: int, what: str) -> bool:
        """Run ``job``; True when it is finished with (done, or failed for good)."""
        try:
            with self.app.app_context():
                job()
            return True
        except Exception as exc:
            last = not retry or attempt >= int(self.app.config["MAIL_MAX_ATTEMPTS"])
            # Never the message itself: it may hold a reset link.
            log.error(
                "%s failed (attempt %d%s): %s: %s",
                what,
                attempt,
                ", giving up" if last else ", will retry",
                type(exc).__name__,
                exc,
            )
            return last


@atexit.register
def _drain_at_exit() -> None:
    """Give queued mail a few seconds when the process ends (a gunicorn worker's restart)."""
    for outbox in list(_ALL):
        if outbox._pid == os.getpid() and outbox._pending:
            outbox.flush(5.0)


os.register_at_fork(after_in_child=lambda: [o._reset() for o in list(_ALL)])
