"""DICOMweb out of a project's cache: QIDO-RS search and WADO-RS retrieve (PS3.18).

So that a DICOMweb viewer or a script (OHIF, dicomweb-client, 3D Slicer) can
read what a project already holds, with the same tokens and the same door as
the rest of mi2b2: members of the project and site admins.

Search answers from the cache index first (patient, study, accession, date,
modalities, counts) and reads the header of one file per study, series or
instance only for what the index lacks, and only for the results returned.
Matching follows PS3.4 C.2.2.2: single value (with * and ? wildcards;
person names ignore case), UID lists, and date/time ranges. ``includefield``,
``limit`` and ``offset`` are supported; ``fuzzymatching`` is not (a Warning
header says so).

Retrieve streams the files from disk exactly as stored (no transcoding): each
part of the multipart/related answer names its real transfer syntax. A client
that insists on a transfer syntax the files are not in gets 406 with the
reason. Frames (native or encapsulated) and metadata are served too.

Audit. Reading through DICOMweb is audited like the viewer and downloads,
with ``"via": "dicomweb"``: a study search is one ``view`` event; series and
instance searches and metadata one ``view`` per user and study per
``VIEW_AUDIT_HOURS``; a study or series retrieve one ``download`` event each
(with counts and bytes); instance and frame retrieves - which a viewer issues
by the hundred - one ``download`` per user and study per ``VIEW_AUDIT_HOURS``.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.uid import UID
from sqlalchemy import func, select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy
from mi2b2.adapters.dicom.files import parse_instance_header
from mi2b2.adapters.dicom.render import frame_count, quiet
from mi2b2.domain.governance import DataUse
from mi2b2.domain.principal import Principal
from mi2b2.errors import InvalidInput, LimitExceeded, NotFound
from mi2b2.services.audit import Action
from mi2b2.services.cache import cache_store
from mi2b2.services.context import ServiceContext
from mi2b2.services.data_access import patient_still_allowed, require_patients_allowed, require_use
from mi2b2.services.viewer import VIEW_AUDIT_HOURS, OnceLog, check_uid

LOG = logging.getLogger(__name__)

CHUNK = 256 * 1024
DICOM = "application/dicom"
RESERVED = {"includefield", "limit", "offset", "fuzzymatching", "fuzzy"}
MAX_LIMIT = 10_000
# What one query may ask, so that no request can keep the server busy for long (the answer names the limit).
MAX_OFFSET = 1_000_000
MAX_PARAMETERS = 64  # query parameters in one request
MAX_VALUE_CHARS = 8192  # one parameter's value (a list of UIDs fits ~120)
MAX_LIST_VALUES = 500  # values in one UID or code list
MAX_PATTERN_CHARS = 256  # one value with * or ? (DICOM values are at most 64 characters a component)
MAX_WILDCARD_VALUES = 32  # values with * or ? in one query: each is matched against every candidate
MAX_INCLUDE_FIELDS = 200
MAX_FRAMES = 1000  # distinct frames in one WADO-RS frame request

# What the index knows at each level (everything else comes from a file's header).
STUDY_INDEXED = ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate", "ModalitiesInStudy",
                 "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_INDEXED = ("SeriesInstanceUID", "NumberOfSeriesRelatedInstances")
INSTANCE_INDEXED = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")

# PS3.18 Tables 10.6.3-3 to -5: what each level returns by default.
STUDY_DEFAULT = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                 "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                 "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "RetrieveURL")
STUDY_MORE = ("PatientAge", "PatientSize", "PatientWeight", "OtherPatientIDs", "IssuerOfPatientID", "InstitutionName",
              "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription", "StudyComments")
SERIES_DEFAULT = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                  "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
                  "PerformedProcedureStepStartTime", "RetrieveURL")
SERIES_MORE = ("SeriesDate", "SeriesTime", "BodyPartExamined", "ProtocolName", "Laterality", "Manufacturer",
               "ManufacturerModelName", "StationName", "OperatorsName", "PerformingPhysicianName", "FrameOfReferenceUID")
INSTANCE_DEFAULT = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "InstanceNumber",
                    "Rows", "Columns", "BitsAllocated", "NumberOfFrames", "RetrieveURL")
STUDY_LEVEL = frozenset(STUDY_DEFAULT + STUDY_MORE) - {"RetrieveURL"}
SERIES_LEVEL = frozenset(SERIES_DEFAULT + SERIES_MORE) - {"RetrieveURL"}

# Transfer syntax -> media type of a frame in it (PS3.18 Table 8.7.3-2).
FRAME_MEDIA = {
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}


class NotAcceptable(InvalidInput):
    """The client accepts none of the forms the data exists in (HTTP 406)."""


# --- queries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    filters: dict[str, str]
    include: frozenset[str]
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    warnings: tuple[str, ...] = ()


def _keyword(name: str) -> str:
    """A query key (keyword or 8 hex digits) as a keyword; InvalidInput if DICOM has no such attribute."""
    key = name.strip()
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        found = keyword_for_tag(int(key, 16))
        if found:
            return str(found)
    elif tag_for_keyword(key) is not None:
        return key
    if "." in key:
        raise InvalidInput(f"matching inside sequences ({key!r}) is not supported; match on top-level attributes")
    raise InvalidInput(f"{key!r} is not a DICOM attribute; use keywords (PatientID) or tags (00100020)")


def parse_query(items: Sequence[tuple[str, str]]) -> Query:
    """QIDO-RS query parameters (repeated keys allowed) into a Query; LimitExceeded over a limit."""
    if len(items) > MAX_PARAMETERS:
        raise LimitExceeded(f"{len(items)} query parameters; at most {MAX_PARAMETERS} are accepted in one search")
    filters: dict[str, str] = {}
    include: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    warnings: list[str] = []
    wildcards = 0
    for name, value in items:
        lowered = name.lower()
        if len(value) > MAX_VALUE_CHARS or len(name) > 64:
            raise LimitExceeded(f"query parameter {name[:64]!r} is {len(value)} characters long; values of at most "
                                f"{MAX_VALUE_CHARS} characters are accepted")
        if lowered == "includefield":
            for part in value.split(","):
                if part.strip().lower() == "all":
                    include_all = True
                elif part.strip():
                    include.add(_keyword(part))
            if len(include) > MAX_INCLUDE_FIELDS:
                raise LimitExceeded(f"more than {MAX_INCLUDE_FIELDS} includefield attributes; ask for fewer, "
                                    "or includefield=all")
        elif lowered in ("limit", "offset"):
            try:
                number = int(value)
            except ValueError:
                raise InvalidInput(f"{lowered} must be a whole number, not {value[:32]!r}") from None
            if number < 0:
                raise InvalidInput(f"{lowered} must not be negative")
            highest = MAX_LIMIT if lowered == "limit" else MAX_OFFSET
            if number > highest:
                raise LimitExceeded(f"{lowered}={number} is over the most mi2b2 accepts, {highest}; "
                                    "page through the results with limit and offset")
            if lowered == "limit":
                limit = number
            else:
                offset = number
        elif lowered in ("fuzzymatching", "fuzzy"):
            if value.strip().lower() == "true":
                warnings.append('299 mi2b2 "fuzzymatching is not supported; only literal matching was performed"')
        else:
            keyword = _keyword(name)
            wildcards += _check_pattern(keyword, value)
            if wildcards > MAX_WILDCARD_VALUES:
                raise LimitExceeded(f"more than {MAX_WILDCARD_VALUES} values with * or ? in one search; "
                                    "narrow the search, or run several")
            filters[keyword] = value
    return Query(filters, frozenset(include), include_all, limit, offset, tuple(warnings))


def _check_pattern(keyword: str, value: str) -> int:
    """How many of the value's patterns have wildcards; LimitExceeded over a list or pattern limit."""
    listed = _list_values(value) if _is_list(keyword, value) else [value.strip()]
    if len(listed) > MAX_LIST_VALUES:
        raise LimitExceeded(f"{keyword} lists {len(listed)} values; at most {MAX_LIST_VALUES} are accepted in one "
                            "search: split the list over several searches")
    for pattern in listed:
        if ("*" in pattern or "?" in pattern) and len(pattern) > MAX_PATTERN_CHARS:
            raise LimitExceeded(f"a {keyword} value with wildcards is {len(pattern)} characters long; at most "
                                f"{MAX_PATTERN_CHARS} are accepted")
    return sum(1 for pattern in listed if "*" in pattern or "?" in pattern)


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value if str(v) != ""]
    text = str(value)
    return [v for v in text.split("\\") if v] if text else []


def _wildcard(pattern: str, value: str, ignore_case: bool) -> bool:
    """PS3.4 C.2.2.2.4 wildcard matching (``*`` any run, ``?`` one character) in time linear in the
    value for each piece of the pattern: never a backtracking regular expression, which a pattern such
    as ``*?*?*?...`` drives exponential while holding the interpreter."""
    if ignore_case:
        pattern, value = pattern.lower(), value.lower()
    if "*" not in pattern and "?" not in pattern:
        return value == pattern
    if "*" not in pattern:  # ? only: the same length, character by character
        return len(value) == len(pattern) and _piece_at(pattern, value, 0)
    first, *middle, last = pattern.split("*")
    end = len(value) - len(last)
    if len(first) > end or not _piece_at(first, value, 0) or not _piece_at(last, value, end):
        return False
    position = len(first)
    for piece in middle:  # each fixed-length piece at its leftmost place is the best any match can do
        if piece:
            found = _piece(piece).search(value, position, end)
            if found is None:
                return False
            position = found.end()
    return True


def _piece_at(piece: str, value: str, start: int) -> bool:
    return all(p == "?" or p == v for p, v in zip(piece, value[start:start + len(piece)], strict=True))


@lru_cache(maxsize=1024)
def _piece(piece: str) -> re.Pattern[str]:
    """A fixed-length pattern (literals and ``.``): no quantifier, so no backtracking."""
    return re.compile("".join("." if c == "?" else re.escape(c) for c in piece), re.DOTALL)


def _in_range(pattern: str, value: str) -> bool:
    low, _, high = pattern.partition("-")
    plain = value.replace(":", "").replace("-", "")
    low, high = low.replace(":", ""), high.replace(":", "")
    if low and plain[: len(low)] < low:
        return False
    return not (high and plain[: len(high)] > high)


def _is_list(keyword: str, pattern: str) -> bool:
    vr = dictionary_VR(keyword)
    return vr == "UI" or (vr == "CS" and ("," in pattern or "\\" in pattern))


def _list_values(pattern: str) -> list[str]:
    return [p.strip() for p in re.split(r"[,\\]", pattern) if p.strip()]


def matches(keyword: str, pattern: str, value: Any) -> bool:
    """PS3.4 C.2.2.2 matching of one key against one attribute's value(s)."""
    pattern = pattern.strip()
    if pattern in ("", "*"):
        return True  # universal matching
    vr = dictionary_VR(keyword)
    values = _values(value)
    if not values:
        return False
    if _is_list(keyword, pattern):
        wanted = _list_values(pattern)
        return any(_wildcard(w, v, False) for w in wanted for v in values)
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        return any(_in_range(pattern, v) for v in values)
    return any(_wildcard(pattern, v, ignore_case=vr == "PN") for v in values)


# --- records: what the index knows, and a header for the rest ------------------------------------


@dataclass
class Record:
    known: dict[str, Any]
    path: Path | None
    url: str
    patient_id: str
    study_uid: str
    db_id: int = 0  # the CachedStudy row it belongs to
    _header: Dataset | None = None
    _read: bool = False

    def header(self) -> Dataset | None:
        if not self._read:
            self._read = True
            self._header = _read_header(self.path) if self.path is not None else None
        return self._header

    def value(self, keyword: str) -> Any:
        if keyword in self.known:
            return self.known[keyword]
        header = self.header()
        if header is None or keyword not in header:
            return None
        return header.get(keyword)

    def element(self, keyword: str) -> DataElement | None:
        header = self.header()
        if header is None or keyword not in header:
            return None
        return header[keyword]


def _read_header(path: Path) -> Dataset | None:
    try:
        with quiet():
            return dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom on a damaged file can raise nearly anything; answer without it
        LOG.warning("cannot read the header of a cached file (%s); answering from the index", type(exc).__name__)
        return None


def _passes(record: Record, filters: Mapping[str, str]) -> bool:
    with quiet():  # values are converted on first access, and pydicom's warnings would quote them
        return all(matches(keyword, pattern, record.value(keyword)) for keyword, pattern in filters.items())


def _json(record: Record, keywords: Sequence[str], include_all: bool, extra: Sequence[str] = ()) -> dict[str, Any]:
    with quiet():
        return _dataset(record, keywords, include_all, extra).to_json_dict(suppress_invalid_tags=True)


def _dataset(record: Record, keywords: Sequence[str], include_all: bool, extra: Sequence[str]) -> Dataset:
    ds = Dataset()
    wanted = list(dict.fromkeys([*keywords, *extra]))
    for keyword in wanted:
        if keyword == "RetrieveURL":
            ds.RetrieveURL = record.url
        elif keyword in record.known:
            value = record.known[keyword]
            if keyword == "ModalitiesInStudy":
                value = _values(value)
            setattr(ds, keyword, value)
        else:
            element = record.element(keyword)
            if element is not None and not _bulky(element):
                ds.add(element)
            else:
                tag = tag_for_keyword(keyword)
                if tag is None:  # parse_query and the fixed key lists name only DICOM attributes
                    raise ValueError(f"{keyword!r} is not a DICOM keyword")
                ds.add_new(tag, dictionary_VR(keyword), None)
    if include_all and (header := record.header()) is not None:
        for element in header:
            if element.tag not in ds and element.tag.group != 0x0002 and not _bulky(element):
                ds.add(element)
    return ds


def _bulky(element: DataElement) -> bool:
    """Binary values over 1 KiB stay out of search answers (metadata has them)."""
    return element.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "UN") and len(element.value or b"") > 1024


# --- the service ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retrieval:
    content_type: str
    body: Iterator[bytes]
    parts: int
    bytes: int


@dataclass(frozen=True)
class SearchResult:
    items: list[dict[str, Any]]
    warnings: tuple[str, ...] = ()


@dataclass
class _Instance:
    study_id: int
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    number: int | None
    path: Path
    size: int = 0


class DicomWeb:
    """QIDO-RS and WADO-RS for one API process (it remembers what it audited)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.audited = OnceLog(ctx.clock)

    # search ---------------------------------------------------------------------------------------

    def search_studies(self, who: Principal, project_id: str, query: Query, base: str) -> SearchResult:
        self._may_search(who, project_id, query.filters.get("StudyInstanceUID"))
        if "Modality" in query.filters and "ModalitiesInStudy" not in query.filters:
            # Modality is a series attribute; at study level it can only mean "a series of this modality".
            filters = dict(query.filters)
            filters["ModalitiesInStudy"] = filters.pop("Modality")
            query = Query(filters, query.include, query.include_all, query.limit, query.offset, query.warnings)
        studies = self._studies(project_id, query.filters, base)
        studies = [s for s in studies if _passes(s, query.filters)]
        page = _page(studies, query)
        extra = sorted(query.include | set(query.filters))
        more = STUDY_MORE if query.include_all else ()
        items = [_json(s, STUDY_DEFAULT + more, False, extra) for s in page]
        patient = query.filters.get("PatientID") if "*" not in query.filters.get("PatientID", "*") else None
        self.ctx.audit.record(who, Action.VIEW, project_id=project_id, patient_id=patient,
                              detail={"via": "dicomweb", "kind": "search", "level": "study",
                                      "filters": query.filters, "matches": len(studies), "returned": len(page)})
        return SearchResult(items, query.warnings)

    def search_series(self, who: Principal, project_id: str, study_uid: str | None, query: Query,
                      base: str) -> SearchResult:
        self._may_search(who, project_id, study_uid or query.filters.get("StudyInstanceUID"))
        filters = dict(query.filters)
        if study_uid is not None:
            filters["StudyInstanceUID"] = check_uid(study_uid, "StudyInstanceUID")
        series = self._series(project_id, filters, base, must_exist=study_uid)
        series = [s for s in series if _passes(s, filters)]
        page = _page(series, query)
        extra = sorted(query.include | set(query.filters))
        more = SERIES_MORE if query.include_all else ()
        items = [_json(s, SERIES_DEFAULT + more, False, extra) for s in page]
        self._viewed(who, project_id, page, "search series")
        return SearchResult(items, query.warnings)

    def search_instances(self, who: Principal, project_id: str, study_uid: str | None, series_uid: str | None,
                         query: Query, base: str) -> SearchResult:
        self._may_search(who, project_id, study_uid or query.filters.get("StudyInstanceUID"))
        filters = dict(query.filters)
        if study_uid is not None:
            filters["StudyInstanceUID"] = check_uid(study_uid, "StudyInstanceUID")
        if series_uid is not None:
            filters["SeriesInstanceUID"] = check_uid(series_uid, "SeriesInstanceUID")
        series = self._series(project_id, {k: v for k, v in filters.items() if k in STUDY_INDEXED}, base,
                              must_exist=study_uid)
        series_filters = {k: v for k, v in filters.items() if k in STUDY_LEVEL or k in SERIES_LEVEL}
        series = [s for s in series if _passes(s, series_filters)]
        if series_uid is not None and not series:
            raise NotFound(f"series {series_uid} is not in the cache of project {project_id!r}")
        instances = self._instance_records(series)
        rest = {k: v for k, v in filters.items() if k not in series_filters}
        instances = [i for i in instances if _passes(i, rest)]
        page = _page(instances, query)
        extra = sorted(query.include | set(query.filters))
        items = [_json(i, INSTANCE_DEFAULT, query.include_all, extra) for i in page]
        self._viewed(who, project_id, page, "search instances")
        return SearchResult(items, query.warnings)

    # metadata and retrieve ---------------------------------------------------------------------------

    def metadata(self, who: Principal, project_id: str, study_uid: str, series_uid: str | None = None,
                 sop_uid: str | None = None, base: str = "") -> list[dict[str, Any]]:
        instances = self._scope(who, project_id, study_uid, series_uid, sop_uid, "read metadata (DICOMweb)")
        items = []
        for instance in instances:
            header = _read_header(instance.path)
            if header is None:
                continue
            with quiet():
                item = header.to_json_dict(suppress_invalid_tags=True)
                frames = frame_count(header)
            url = f"{base}/studies/{instance.study_uid}/series/{instance.series_uid}/instances/{instance.sop_uid}"
            if "Rows" in header:  # pixel data is the part left out; point at it
                item["7FE00010"] = {"vr": "OB" if _encapsulated(header) else "OW",
                                    "BulkDataURI": f"{url}/frames/{','.join(str(n) for n in range(1, frames + 1))}"}
            items.append(item)
        self._viewed(who, project_id, instances, "metadata")
        return items

    def retrieve(self, who: Principal, project_id: str, study_uid: str, series_uid: str | None = None,
                 sop_uid: str | None = None, transfer_syntaxes: frozenset[str] | None = None) -> Retrieval:
        """The instances of a study, series or one instance, as multipart/related application/dicom."""
        instances = self._scope(who, project_id, study_uid, series_uid, sop_uid, "retrieve (DICOMweb)")
        if transfer_syntaxes is not None:
            stored = {_stored_syntax(i.path) for i in instances}
            missing = sorted(s for s in stored if s not in transfer_syntaxes)
            if missing:
                raise NotAcceptable(
                    f"these files are stored as {', '.join(missing)} and mi2b2 sends files as stored; "
                    'ask with transfer-syntax=* (Accept: multipart/related; type="application/dicom"; '
                    "transfer-syntax=*)")
        total = sum(i.size for i in instances)
        level = "instance" if sop_uid else "series" if series_uid else "study"
        self._downloaded(who, project_id, instances[0], level, len(instances), total, series_uid,
                         once=sop_uid is not None)
        boundary = uuid.uuid4().hex
        return Retrieval(f'multipart/related; type="{DICOM}"; boundary={boundary}',
                         _multipart_files([i.path for i in instances], boundary), len(instances), total)

    def retrieve_frames(self, who: Principal, project_id: str, study_uid: str, series_uid: str, sop_uid: str,
                        frame_list: str, accept: str) -> Retrieval:
        """Frames of one instance: as stored (compressed frames in their own media type) or raw bytes."""
        numbers = _frame_numbers(frame_list)
        (instance,) = self._scope(who, project_id, study_uid, series_uid, sop_uid, "retrieve frames (DICOMweb)")
        with quiet():
            try:
                ds = dcmread(instance.path)
            except Exception as exc:  # a damaged file: say so rather than fail obscurely
                raise InvalidInput(f"image {sop_uid} cannot be read ({type(exc).__name__})") from None
        if "PixelData" not in ds:
            raise NotFound(f"instance {sop_uid} has no pixel data, so no frames")
        frames = frame_count(ds)
        bad = [n for n in numbers if n > frames]
        if bad:
            raise NotFound(f"frame {bad[0]} does not exist: instance {sop_uid} has {frames} frame(s)")
        syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        encapsulated = _encapsulated(ds)
        media = FRAME_MEDIA.get(syntax, "application/octet-stream") if encapsulated else "application/octet-stream"
        wanted = _accepted_types(accept)
        if encapsulated and wanted and media not in wanted and "*/*" not in wanted:
            raise NotAcceptable(f"the frames are stored as {media} ({syntax}) and mi2b2 does not transcode; "
                                f'ask with Accept: multipart/related; type="{media}"')
        with quiet():  # each frame once to check and measure it; the bytes are sent one frame at a time
            sizes = [len(_frame_bytes(ds, n - 1, frames, encapsulated)) for n in numbers]
        self._downloaded(who, project_id, instance, "frames", 1, sum(sizes), series_uid, once=True)
        boundary = uuid.uuid4().hex
        part_type = f"{media}; transfer-syntax={syntax}" if encapsulated else media
        parts = _frames(ds, numbers, frames, encapsulated)
        return Retrieval(f'multipart/related; type="{media}"; boundary={boundary}',
                         _multipart_bytes(parts, part_type, boundary), len(numbers), sum(sizes))

    def locate(self, who: Principal, project_id: str, study_uid: str, series_uid: str, sop_uid: str) -> None:
        """Check an instance exists in the project's cache (for the rendered resources)."""
        self._scope(who, project_id, study_uid, series_uid, sop_uid, "render (DICOMweb)")

    # the index -------------------------------------------------------------------------------------

    def _may_search(self, who: Principal, project_id: str, study_uids: str | None) -> None:
        """The read door; a search naming studies exactly is refused for a withdrawn patient (others are left out)."""
        require_use(self.ctx, who, project_id, DataUse.READ, "search the cache (DICOMweb)")
        if study_uids and not any(c in study_uids for c in "*?"):
            named = [u.strip() for u in re.split(r"[,\\]", study_uids) if u.strip()]
            require_patients_allowed(self.ctx, who, project_id, named, "search the cache (DICOMweb)")

    def _studies(self, project_id: str, filters: Mapping[str, str], base: str) -> list[Record]:
        store = cache_store(self.ctx)
        with self.ctx.sessions() as session:
            # Studies of patients who left the allow-list are no longer anyone's to read.
            statement = select(CachedStudy).where(CachedStudy.project_id == project_id, patient_still_allowed())
            uids = filters.get("StudyInstanceUID", "")
            if uids and not any(c in uids for c in "*?"):
                statement = statement.where(CachedStudy.study_uid.in_([u.strip() for u in re.split(r"[,\\]", uids)]))
            rows = session.scalars(statement.order_by(CachedStudy.study_date.desc(), CachedStudy.study_uid)).all()
            extra = {
                study_id: (int(series), path)
                for study_id, series, path in session.execute(
                    select(CachedInstance.cached_study_id, func.count(func.distinct(CachedInstance.series_uid)),
                           func.min(CachedInstance.relative_path))
                    .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
                    .where(CachedStudy.project_id == project_id).group_by(CachedInstance.cached_study_id)
                )
            }
        records = []
        for row in rows:
            series, path = extra.get(row.id, (0, None))
            record = Record(
                known={"StudyInstanceUID": row.study_uid, "PatientID": row.patient_id, "PatientName": row.patient_name,
                       "AccessionNumber": row.accession, "StudyDate": row.study_date,
                       "ModalitiesInStudy": row.modalities, "StudyDescription": row.description,
                       "NumberOfStudyRelatedSeries": series, "NumberOfStudyRelatedInstances": row.instance_count},
                path=store.absolute(path) if path else None, url=f"{base}/studies/{row.study_uid}",
                patient_id=row.patient_id, study_uid=row.study_uid, db_id=row.id,
            )
            records.append(record)
        indexed = {k: v for k, v in filters.items() if k in STUDY_INDEXED}
        return [r for r in records if _passes(r, indexed)]

    def _series(self, project_id: str, filters: Mapping[str, str], base: str, must_exist: str | None) -> list[Record]:
        studies = self._studies(project_id, filters, base)
        if must_exist is not None and not studies:
            raise NotFound(f"study {must_exist} is not in the cache of project {project_id!r}")
        by_id = {s.db_id: s for s in studies}
        if not by_id:
            return []
        store = cache_store(self.ctx)
        with self.ctx.sessions() as session:
            rows = session.execute(
                select(CachedInstance.cached_study_id, CachedInstance.series_uid, func.count(CachedInstance.id),
                       func.min(CachedInstance.relative_path))
                .where(CachedInstance.cached_study_id.in_(list(by_id)))
                .group_by(CachedInstance.cached_study_id, CachedInstance.series_uid)
                .order_by(CachedInstance.cached_study_id, CachedInstance.series_uid)
            ).all()
        records = []
        for study_id, series_uid, count, path in rows:
            study = by_id[study_id]
            known = {k: v for k, v in study.known.items() if k in ("StudyInstanceUID", "PatientID", "PatientName",
                                                                   "AccessionNumber", "StudyDate")}
            known.update({"SeriesInstanceUID": series_uid, "NumberOfSeriesRelatedInstances": int(count)})
            records.append(Record(known, store.absolute(path), f"{study.url}/series/{series_uid}",
                                  study.patient_id, study.study_uid, study_id))
        return records

    def _instance_records(self, series: list[Record]) -> list[Record]:
        if not series:
            return []
        keys = {(s.db_id, s.known["SeriesInstanceUID"]): s for s in series}
        store = cache_store(self.ctx)
        with self.ctx.sessions() as session:
            rows = session.execute(
                select(CachedInstance.cached_study_id, CachedInstance.series_uid, CachedInstance.sop_instance_uid,
                       CachedInstance.sop_class_uid, CachedInstance.instance_number, CachedInstance.relative_path)
                .where(CachedInstance.cached_study_id.in_(list({k[0] for k in keys})))
            ).all()
        records = []
        for study_id, series_uid, sop, sop_class, number, path in rows:
            parent = keys.get((study_id, series_uid))
            if parent is None:
                continue
            known = {k: v for k, v in parent.known.items() if k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                    "PatientID", "PatientName")}
            known.update({"SOPInstanceUID": sop, "SOPClassUID": sop_class})
            if number is not None:
                known["InstanceNumber"] = number
            records.append(Record(known, store.absolute(path), f"{parent.url}/instances/{sop}",
                                  parent.patient_id, parent.study_uid, study_id))
        records.sort(key=lambda r: (r.known["SeriesInstanceUID"], r.known.get("InstanceNumber") is None,
                                    r.known.get("InstanceNumber") or 0, r.known["SOPInstanceUID"]))
        return records

    def _scope(self, who: Principal, project_id: str, study_uid: str, series_uid: str | None, sop_uid: str | None,
               operation: str) -> list[_Instance]:
        check_uid(study_uid, "StudyInstanceUID")
        if series_uid is not None:
            check_uid(series_uid, "SeriesInstanceUID")
        if sop_uid is not None:
            check_uid(sop_uid, "SOPInstanceUID")
        require_use(self.ctx, who, project_id, DataUse.READ, operation)
        require_patients_allowed(self.ctx, who, project_id, [study_uid], operation)
        store = cache_store(self.ctx)
        with self.ctx.sessions() as session:
            study = session.scalar(
                select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid == study_uid)
            )
            if study is None:
                raise NotFound(f"study {study_uid} is not in the cache of project {project_id!r}")
            statement = select(CachedInstance).where(CachedInstance.cached_study_id == study.id)
            if series_uid is not None:
                statement = statement.where(CachedInstance.series_uid == series_uid)
            if sop_uid is not None:
                statement = statement.where(CachedInstance.sop_instance_uid == sop_uid)
            rows = session.scalars(statement).all()
            found = [
                _Instance(study.id, study.patient_id, study.study_uid, row.series_uid, row.sop_instance_uid,
                          row.sop_class_uid, row.instance_number, store.absolute(row.relative_path), row.bytes)
                for row in rows
            ]
        if not found:
            what = f"instance {sop_uid}" if sop_uid else f"series {series_uid}"
            raise NotFound(f"{what} is not in the cache of project {project_id!r}")
        found.sort(key=lambda i: (i.series_uid, i.number is None, i.number or 0, i.sop_uid))
        present = [i for i in found if i.path.is_file()]
        if len(present) < len(found):
            LOG.warning("%d of %d indexed files of a DICOMweb request are missing from the cache; "
                        "`mi2b2 admin fsck --repair` reconciles index and disk", len(found) - len(present), len(found))
        if not present:
            raise NotFound("the files of this request are missing from the cache; "
                           "an admin can reconcile index and disk with `mi2b2 admin fsck --repair`")
        return present

    # audit -----------------------------------------------------------------------------------------

    def _viewed(self, who: Principal, project_id: str, items: Sequence[Record | _Instance], kind: str) -> None:
        # A view changes nothing in the database, so its audit row is a transaction of its own,
        # committed before any image leaves.
        studies = {(item.study_uid, item.patient_id) for item in items}
        for study_uid, patient_id in sorted(studies):
            if self.audited.first((who.login, project_id, study_uid, "view")):
                self.ctx.audit.record(who, Action.VIEW, project_id=project_id, patient_id=patient_id,
                                      study_uid=study_uid, detail={"via": "dicomweb", "kind": kind,
                                                                   "again_after_hours": VIEW_AUDIT_HOURS})

    def _downloaded(self, who: Principal, project_id: str, first: _Instance, level: str, count: int, size: int,
                    series_uid: str | None, once: bool) -> None:
        if once and not self.audited.first((who.login, project_id, first.study_uid, "download")):
            return
        now = self.ctx.clock.now()
        detail: dict[str, Any] = {"via": "dicomweb", "level": level, "instances": count, "bytes": size}
        if series_uid:
            detail["series_uid"] = series_uid
        if once:
            detail["again_after_hours"] = VIEW_AUDIT_HOURS
        with transaction(self.ctx.sessions) as session:  # "last downloaded" and its audit row commit together
            session.execute(update(CachedStudy).where(CachedStudy.id == first.study_id)
                            .values(last_downloaded_by=who.login[:64], last_downloaded_at=now))
            self.ctx.audit.record(who, Action.DOWNLOAD, project_id=project_id, patient_id=first.patient_id,
                                  study_uid=first.study_uid, detail=detail, session=session)


# --- helpers ---------------------------------------------------------------------------------------


def _page(items: list[Any], query: Query) -> list[Any]:
    end = None if query.limit is None else query.offset + query.limit
    return items[query.offset:end]


def _stored_syntax(path: Path) -> str:
    try:
        with open(path, "rb") as file:
            header = parse_instance_header(file.read(64 * 1024))
    except OSError:
        return ""
    if header is not None:
        return header.transfer_syntax
    found = _read_header(path)
    meta = getattr(found, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _encapsulated(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        return False
    return UID(syntax).is_encapsulated


def _frame_numbers(text: str) -> list[int]:
    """The frame list of a URL, each frame once, in the order first asked; LimitExceeded over MAX_FRAMES."""
    parts = [part for part in text.split(",") if part.strip()]
    if len(parts) > 4 * MAX_FRAMES:  # a repeated list is deduplicated below, but not at any length
        raise LimitExceeded(f"the frame list names {len(parts)} frames; at most {MAX_FRAMES} distinct frames "
                            "are sent in one request: ask for the rest in further requests")
    try:
        numbers = list(dict.fromkeys(int(part) for part in parts))
    except ValueError:
        raise InvalidInput(f"frame list {text[:64]!r} must be numbers separated by commas, from 1") from None
    if not numbers or any(n < 1 for n in numbers):
        raise InvalidInput("frames are numbered from 1")
    if len(numbers) > MAX_FRAMES:
        raise LimitExceeded(f"{len(numbers)} distinct frames asked for; at most {MAX_FRAMES} are sent in one "
                            "request: ask for the rest in further requests")
    return numbers


def _frame_bytes(ds: Dataset, index: int, frames: int, encapsulated: bool) -> bytes:
    data = ds.PixelData
    if encapsulated:
        try:
            return bytes(get_frame(data, index, number_of_frames=frames))
        except (ValueError, IndexError, KeyError) as exc:
            raise InvalidInput(f"frame {index + 1} cannot be extracted ({type(exc).__name__})") from None
    bits = int(ds.get("BitsAllocated", 8) or 8)
    length_bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits
    if length_bits % 8:
        raise InvalidInput("frames of 1-bit images that do not end on a byte cannot be sent separately; "
                           "retrieve the whole instance")
    length = length_bits // 8
    chunk = data[index * length:(index + 1) * length]
    if len(chunk) != length:
        raise InvalidInput(f"frame {index + 1} is truncated in the stored file")
    return bytes(chunk)


def _frames(ds: Dataset, numbers: list[int], frames: int, encapsulated: bool) -> Iterator[bytes]:
    """One frame in memory at a time, however many the request names."""
    for number in numbers:
        with quiet():
            part = _frame_bytes(ds, number - 1, frames, encapsulated)
        yield part


def _accepted_types(accept: str) -> set[str]:
    """The ``type`` parameters of multipart/related media ranges in an Accept header (``*/*`` for anything)."""
    types: set[str] = set()
    for entry in accept.split(","):
        parts = [p.strip() for p in entry.split(";")]
        main = parts[0].lower()
        if main in ("*/*", "multipart/*"):
            types.add("*/*")
            continue
        if main != "multipart/related":
            continue
        params = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        types.add(params.get("type", "*/*").strip('"').lower())
    return types


def dicom_transfer_syntaxes(accept: str | None) -> frozenset[str] | None:
    """What an Accept header allows for application/dicom parts: None = anything (as stored).

    Raises NotAcceptable if it allows no application/dicom at all."""
    if not accept or not accept.strip():
        return None
    allowed: set[str] = set()
    acceptable = False
    for entry in accept.split(","):
        parts = [p.strip() for p in entry.split(";")]
        main = parts[0].lower()
        params = {k.strip().lower(): v.strip().strip('"') for k, v in (p.split("=", 1) for p in parts[1:] if "=" in p)}
        if main in ("*/*", "multipart/*") or (main == "multipart/related" and params.get("type", DICOM).lower()
                                               in (DICOM, "*/*", "application/*")):
            acceptable = True
            syntax = params.get("transfer-syntax")
            if syntax is None or syntax == "*":
                return None
            allowed.add(syntax)
        elif main == DICOM:
            raise NotAcceptable('WADO-RS answers as multipart/related; ask with Accept: multipart/related; '
                                'type="application/dicom"')
    if not acceptable:
        raise NotAcceptable('nothing acceptable: instances come as multipart/related; type="application/dicom"')
    return frozenset(allowed)


def _multipart_files(paths: list[Path], boundary: str) -> Iterator[bytes]:
    """Stream files as multipart/related parts, reading each from disk in chunks."""
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


def _multipart_bytes(parts: Iterator[bytes], content_type: str, boundary: str) -> Iterator[bytes]:
    for part in parts:
        yield (f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Length: {len(part)}\r\n\r\n").encode()
        yield part
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()

