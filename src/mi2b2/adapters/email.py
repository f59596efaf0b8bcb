"""Sending one plain-text e-mail through the site's SMTP relay.

A failure is reported, never retried here: the notification stays in the
app (with the error recorded), which is where researchers look anyway.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from mi2b2.config import SmtpConfig
from mi2b2.errors import RetriableError

TIMEOUT_SECONDS = 10.0


class MailError(RetriableError):
    """The SMTP relay could not be reached or refused the message."""


def send_mail(smtp: SmtpConfig, to: str, subject: str, body: str, sent_at: datetime,
              timeout: float = TIMEOUT_SECONDS) -> None:
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(sent_at)
    message["Message-ID"] = make_msgid(domain=smtp.sender.rpartition("@")[2] or "mi2b2")
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to a robot
    message.set_content(body)
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=timeout) as client:
            if client.sock is not None:
                client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.ehlo()
            if smtp.starttls:
                client.starttls(context=ssl.create_default_context())
                client.ehlo()
            client.send_message(message)
    except smtplib.SMTPRecipientsRefused:
        raise MailError(f"the mail relay {smtp.host}:{smtp.port} refused the recipient address") from None
    except smtplib.SMTPNotSupportedError:
        raise MailError(f"the mail relay {smtp.host}:{smtp.port} does not offer STARTTLS; "
                        "set smtp.starttls = false or use a relay that does") from None
    except smtplib.SMTPException as exc:
        raise MailError(f"the mail relay {smtp.host}:{smtp.port} refused the message ({type(exc).__name__})") from None
    except (OSError, ssl.SSLError) as exc:
        raise MailError(f"cannot reach the mail relay {smtp.host}:{smtp.port} "
                        f"({exc.strerror or type(exc).__name__}); check [smtp] host and port") from None
