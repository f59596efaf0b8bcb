"""multipart/related framing for WADO-RS answers (PS3.18 8.6.1.2), streamed.

Files go out from disk in chunks, each part naming its real transfer syntax;
a file converted to Explicit VR Little Endian goes out whole once converted, one
at a time; frames go out one at a time. Nothing larger than a chunk, a converted
instance or a frame is held in memory, however large the answer.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mi2b2.adapters.dicom.deidentify import Deidentified
from mi2b2.adapters.dicom.files import parse_instance_header
from mi2b2.adapters.dicom.transcode import EXPLICIT_VR_LITTLE_ENDIAN, ConversionFailed, as_explicit_little_endian
from mi2b2.services.dicomweb.negotiation import DICOM

LOG = logging.getLogger(__name__)

CHUNK = 256 * 1024


@dataclass(frozen=True)
class Multipart:
    content_type: str  # the whole answer's, with its boundary
    body: Iterator[bytes]


@dataclass(frozen=True)
class OutgoingFile:
    path: Path
    convert: bool  # to Explicit VR Little Endian; else as stored
    # A de-identified project's: its new header, made (or found made) when its turn comes, is sent with
    # the file's pixel data bytes; None from it: the instance is left out.
    deidentified: Callable[[], Deidentified | None] | None = None


def files_answer(files: list[OutgoingFile]) -> Multipart:
    """Files as application/dicom parts, as stored or converted.

    A conversion that fails raises ConversionFailed if it is the first part (nothing has been
    sent yet, so the caller can still refuse); a later one is left out with a warning."""
    boundary = uuid.uuid4().hex
    return Multipart(f'multipart/related; type="{DICOM}"; boundary={boundary}', _file_parts(files, boundary))


def parts_answer(parts: Iterable[bytes], media_type: str, part_type: str) -> Multipart:
    """Byte strings (frames) as parts of one media type; ``part_type`` is each part's Content-Type."""
    boundary = uuid.uuid4().hex
    return Multipart(f'multipart/related; type="{media_type}"; boundary={boundary}',
                     _byte_parts(parts, part_type, boundary))


def _file_parts(files: list[OutgoingFile], boundary: str) -> Iterator[bytes]:
    for index, outgoing in enumerate(files):
        if outgoing.deidentified is not None:
            yield from _deidentified_part(outgoing, outgoing.deidentified(), boundary, first=index == 0)
            continue
        if outgoing.convert:
            try:
                converted = as_explicit_little_endian(outgoing.path)
            except ConversionFailed as exc:
                if index == 0:
                    raise
                LOG.warning("a cached file could not be converted for DICOMweb (%s); the answer lacks it", exc)
                continue
            yield (f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}\r\n"
                   f"Content-Length: {len(converted)}\r\n\r\n").encode()
            yield converted  # apart, not joined: one copy of the instance in memory, not two
            yield b"\r\n"
            continue
        try:
            file = open(outgoing.path, "rb")  # noqa: SIM115 - closed below, after the generator resumes
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


def _deidentified_part(outgoing: OutgoingFile, made: Deidentified | None, boundary: str,
                       first: bool) -> Iterator[bytes]:
    """The new header, then the stored pixel data in chunks (the download's bytes); converted whole if asked."""
    if made is None:
        LOG.warning("a cached file was withheld or disappeared while it was being sent over DICOMweb; "
                    "the answer lacks it")
        return
    try:
        file = open(outgoing.path, "rb")  # noqa: SIM115 - closed below, after the generator resumes
    except FileNotFoundError:
        LOG.warning("a cached file disappeared while it was being sent over DICOMweb; the answer lacks it")
        return
    with file:
        if outgoing.convert:
            file.seek(made.pixel_start)
            try:
                converted = as_explicit_little_endian(made.header + file.read(made.pixel_end - made.pixel_start))
            except ConversionFailed as exc:
                if first:
                    raise
                LOG.warning("a cached file could not be converted for DICOMweb (%s); the answer lacks it", exc)
                return
            yield (f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}\r\n"
                   f"Content-Length: {len(converted)}\r\n\r\n").encode()
            yield converted
            yield b"\r\n"
            return
        header = parse_instance_header(made.header[:CHUNK])
        syntax = f"; transfer-syntax={header.transfer_syntax}" if header and header.transfer_syntax else ""
        yield (f"--{boundary}\r\nContent-Type: {DICOM}{syntax}\r\nContent-Length: {made.size}\r\n\r\n"
               ).encode() + made.header
        file.seek(made.pixel_start)
        left = made.pixel_end - made.pixel_start
        while left > 0 and (chunk := file.read(min(CHUNK, left))):
            left -= len(chunk)
            yield chunk
        yield b"\r\n"


def _byte_parts(parts: Iterable[bytes], content_type: str, boundary: str) -> Iterator[bytes]:
    for part in parts:
        yield (f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Length: {len(part)}\r\n\r\n").encode()
        yield part
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()
