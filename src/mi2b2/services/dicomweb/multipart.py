"""multipart/related framing for WADO-RS answers (PS3.18 8.6.1.2), streamed.

Files go out from disk in chunks, each part naming its real transfer syntax;
frames go out one at a time. Nothing larger than a chunk or a frame is held in
memory, however large the answer.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mi2b2.adapters.dicom.files import parse_instance_header
from mi2b2.services.dicomweb.negotiation import DICOM

LOG = logging.getLogger(__name__)

CHUNK = 256 * 1024


@dataclass(frozen=True)
class Multipart:
    content_type: str  # the whole answer's, with its boundary
    body: Iterator[bytes]


def files_answer(paths: list[Path]) -> Multipart:
    """Files as application/dicom parts, exactly as stored."""
    boundary = uuid.uuid4().hex
    return Multipart(f'multipart/related; type="{DICOM}"; boundary={boundary}', _file_parts(paths, boundary))


def parts_answer(parts: Iterable[bytes], media_type: str, part_type: str) -> Multipart:
    """Byte strings (frames) as parts of one media type; ``part_type`` is each part's Content-Type."""
    boundary = uuid.uuid4().hex
    return Multipart(f'multipart/related; type="{media_type}"; boundary={boundary}',
                     _byte_parts(parts, part_type, boundary))


def _file_parts(paths: list[Path], boundary: str) -> Iterator[bytes]:
    for path in paths:
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed below, after the generator resumes
        except FileNotFoundError:
            LOG.warning("a cached file disappeared while it was being sent over DICOMweb; the answer lacks it")
            continue
        with file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(CHUNK)
            header = parse_instance_header(head)
            syntax = f"; transfer-syntax={header.transfer_syntax}" if header and header.transfer_syntax else ""
            yield (f"--{boundary}\r\nContent-Type: {DICOM}{syntax}\r\nContent-Length: {size}\r\n\r\n").encode() + head
            while chunk := file.read(CHUNK):
                yield chunk
            yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _byte_parts(parts: Iterable[bytes], content_type: str, boundary: str) -> Iterator[bytes]:
    for part in parts:
        yield (f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Length: {len(part)}\r\n\r\n").encode()
        yield part
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()
