"""Mail: the .eml outbox, SMTP against a real server on loopback (plain and STARTTLS), and failures.

The SMTP server is aiosmtpd in a thread on 127.0.0.1, with a throwaway
self-signed certificate made here with ``cryptography``. A server that is
down, refuses TLS or shows a certificate we do not trust must never get the
message (or the password), and the page must not change.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import ipaddress
import logging
import os
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_recovery import LINK_RE, ask_reset, outbox

from helpers import make_app
from secure_app import mail
from secure_app.store import get_store
from servers import free_port

SMTP_USER, SMTP_PASSWORD = "site", "relay-password-for-tests"


# -- a real SMTP server ------------------------------------------------------------------


class Inbox:
    """aiosmtpd handler: keep every message, whether it came over TLS, and who logged in."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages.append(
            {
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "message": email.message_from_bytes(envelope.content, policy=email.policy.default),
                "tls": session.ssl is not None,
                "user": session.auth_data,
            }
        )
        return "250 Message accepted"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            self.logins.append((auth_data.login, auth_data.password))
            ok = auth_data == (SMTP_USER.encode(), SMTP_PASSWORD.encode())
            return AuthResult(success=ok, auth_data=auth_data.login if ok else None)
        return AuthResult(success=False, handled=False)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and localhost; returns (cert, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def smtp_server(inbox: Inbox, port: int, tls: tuple[Path, Path] | None = None) -> Controller:
    """A running SMTP server on 127.0.0.1:port; with ``tls``, STARTTLS required before anything."""
    options: dict = {}
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
        options = {
            "tls_context": context,
            "require_starttls": True,
            "authenticator": inbox.authenticate,
            "auth_require_tls": True,
        }
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    return controller


@pytest.fixture
def running() -> Iterator[list[Controller]]:
    """Servers a test starts go here and are stopped after it, whatever happened."""
    started: list[Controller] = []
    yield started
    for controller in started:
        controller.stop()


def smtp_app(tmp_path: Path, port: int, **config: object):
    defaults = {"MAIL_TIMEOUT": 5, "MAIL_RETRY_DELAY": 0.05}
    app = make_app(
        tmp_path,
        PUBLIC_URL="https://www.example.org",
        MAIL_BACKEND="smtp",
        MAIL_SERVER="127.0.0.1",
        MAIL_PORT=port,
        **(defaults | config),
    )
    with app.app_context():  # set-up: the verification flow has its own tests
        get_store().create(
            "alice",
            {"username": "alice", "password_hash": "x", "email": "a@example.org"}
            | {"email_verified": "a@example.org"},
        )
    return app


class Failures(logging.Handler):
    """Collect the mail thread's error lines; ``first`` is set at the first one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []
        self.first = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.first.set()


@pytest.fixture
def failures() -> Iterator[Failures]:
    handler = Failures()
    logger = logging.getLogger("secure_app.mail")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# -- the file backend ----------------------------------------------------------------------


def test_the_file_backend_writes_one_private_rfc5322_file_per_message(tmp_path) -> None:
    app = make_app(tmp_path, PUBLIC_URL="https://www.example.org")
    # Built during a request that names another host: the link must not follow it.
    with app.test_request_context("/", base_url="http://evil.example"):
        for n in range(2):
            mail.send(
                mail.message(
                    f"u{n}@example.org",
                    "Reset your password",
                    "recovery/mail/reset.txt",
                    username=f"u{n}",
                    link=mail.link("recovery.reset_password", token="abc"),
                    minutes=15,
                )
            )
    messages = outbox(app)
    folder = Path(app.config["MAIL_FILE_PATH"])
    assert folder == tmp_path / "data" / "outbox"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(os.listdir(folder))
    assert len(files) == 2 and all(f.endswith(".eml") for f in files)  # no temporary file left
    assert all(stat.S_IMODE((folder / f).stat().st_mode) == 0o600 for f in files)
    assert [m["To"] for m in messages] == ["u0@example.org", "u1@example.org"]
    raw = (folder / files[0]).read_bytes()
    assert b"\r\n\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF lines
    for msg in messages:
        assert not msg.defects
        assert msg["From"] == "secure_app <no-reply@www.example.org>"
        assert msg["Date"] and msg["Message-ID"]
        assert msg.get_content_type() == "text/plain"
        link = LINK_RE.search(msg.get_content()).group(1)
        assert link == "https://www.example.org/reset-password/abc"


@pytest.mark.parametrize(
    "config",
    [{"MAIL_BACKEND": "sendmail"}, {"MAIL_BACKEND": "os.system"}, {"MAIL_USERNAME": "site"}],
)
def test_a_mail_configuration_that_cannot_be_safe_refuses_to_start(tmp_path, config) -> None:
    with pytest.raises(RuntimeError, match="FLASK_MAIL_"):
        make_app(tmp_path, **config)


def test_the_queue_works_in_a_forked_child(tmp_path) -> None:
    app = make_app(tmp_path)

    def send(to: str) -> None:
        with app.app_context():
            mail.send(mail.message(to, "Hello", "recovery/mail/verify.txt", username="u", link="x"))

    send("parent@example.org")  # the parent's mail thread is running when it forks
    assert mail.flush(10, app)
    pid = os.fork()
    if pid == 0:  # the child: its own queue and thread, or nothing would be sent
        code = 1
        try:
            send("child@example.org")
            code = 0 if mail.flush(10, app) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sorted(m["To"] for m in outbox(app)) == ["child@example.org", "parent@example.org"]


# -- SMTP ------------------------------------------------------------------------------------


def test_smtp_delivers_the_reset_link(tmp_path, running) -> None:
    inbox, port = Inbox(), free_port()
    running.append(smtp_server(inbox, port))
    app = smtp_app(tmp_path, port)
    assert ask_reset(app.test_client(), "a@example.org").status_code == 200
    assert mail.flush(10, app)
    [got] = inbox.messages
    assert got["to"] == ["a@example.org"] and got["from"] == "no-reply@www.example.org"
    link = LINK_RE.search(got["message"].get_content()).group(1)
    assert link.startswith("https://www.example.org/reset-password/")


def test_smtp_with_starttls_verifies_the_server_and_logs_in(tmp_path, running) -> None:
    cert, key = self_signed(tmp_path)
    inbox, port = Inbox(), free_port()
    running.append(smtp_server(inbox, port, tls=(cert, key)))
    app = smtp_app(
        tmp_path,
        port,
        MAIL_USE_TLS=True,
        MAIL_CA_FILE=str(cert),
        MAIL_USERNAME=SMTP_USER,
        MAIL_PASSWORD=SMTP_PASSWORD,
    )
    assert ask_reset(app.test_client(), "a@example.org").status_code == 200
    assert mail.flush(10, app)
    [got] = inbox.messages
    assert got["tls"] is True and got["user"] == SMTP_USER.encode()
    assert "/reset-password/" in got["message"].get_content()


def test_smtp_refuses_a_certificate_it_does_not_trust(tmp_path, running, failures) -> None:
    # Flask-Mailman alone would accept it: smtplib's starttls() without a context checks nothing.
    inbox, port = Inbox(), free_port()
    running.append(smtp_server(inbox, port, tls=self_signed(tmp_path)))
    app = smtp_app(
        tmp_path,
        port,
        MAIL_USE_TLS=True,
        MAIL_USERNAME=SMTP_USER,
        MAIL_PASSWORD=SMTP_PASSWORD,
        MAIL_MAX_ATTEMPTS=2,
    )
    assert ask_reset(app.test_client(), "a@example.org").status_code == 200
    assert mail.flush(10, app)
    assert inbox.messages == [] and inbox.logins == []  # neither the link nor the password
    assert any("CERTIFICATE_VERIFY_FAILED" in line for line in failures.lines), failures.lines
    assert "giving up" in failures.lines[-1]


def test_smtp_never_falls_back_to_plain_text(tmp_path, running, failures) -> None:
    inbox, port = Inbox(), free_port()
    running.append(smtp_server(inbox, port))  # offers no STARTTLS (a stripping attacker)
    app = smtp_app(tmp_path, port, MAIL_USE_TLS=True, MAIL_MAX_ATTEMPTS=1)
    assert ask_reset(app.test_client(), "a@example.org").status_code == 200
    assert mail.flush(10, app)
    assert inbox.messages == []
    assert any("SMTPNotSupportedError" in line for line in failures.lines), failures.lines


def test_a_server_that_is_down_changes_nothing_for_the_user_and_gets_the_mail_later(
    tmp_path, running, failures
) -> None:
    port = free_port()  # nothing listens here yet
    app = smtp_app(tmp_path, port, MAIL_RETRY_DELAY=0.2, MAIL_MAX_ATTEMPTS=10)
    client = app.test_client()
    down = ask_reset(client, "a@example.org")
    assert failures.first.wait(10), "the failed send was not logged"
    assert "will retry" in failures.lines[0] and "ConnectionRefusedError" in failures.lines[0]
    assert "a@example.org" not in failures.lines[0]  # the log names the domain only

    inbox = Inbox()
    running.append(smtp_server(inbox, port))
    assert mail.flush(30, app), "the message was never delivered"
    assert len(inbox.messages) == 1  # delivered once, by a retry
    assert inbox.messages[0]["to"] == ["a@example.org"]

    up = ask_reset(client, "a@example.org")
    assert mail.flush(10, app)
    assert len(inbox.messages) == 2
    assert (down.status_code, down.get_data()) == (up.status_code, up.get_data())
