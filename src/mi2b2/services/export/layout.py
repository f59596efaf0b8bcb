"""Where each file of a download goes: readable names, keyed (obfuscated) names, the manifest and README.

Pure functions shared by the server (ZIP downloads) and the client (folder
downloads, ``mi2b2 decrypt``, the viewer): the same study always lands at the
same readable path, whichever way it was downloaded.

Readable layout::

    <PatientID>/<StudyDate>_<Accession or short UID>/<SeriesNumber>_<Modality>/<NNNN>.dcm

Encrypted layout (names keyed with a random per-download HMAC key that lives
only inside the encrypted manifest)::

    README.txt                  how to decrypt with the standard age tool; no patient data
    identity.age                passphrase downloads only: the download's age key, scrypt-encrypted
    manifest.age                keyed name -> readable path, SHA-256, size, UIDs, and the HMAC key
    <study-hmac16>/<series-hmac16>/<NNNN>.dcm.age
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mi2b2.adapters.crypto.age_files import keyed_name
from mi2b2.errors import InvalidInput, PermanentError

FORMAT = "mi2b2-download/1"
README = "README.txt"
MANIFEST = "manifest.age"
IDENTITY = "identity.age"
ENCRYPTED_SUFFIX = ".dcm.age"
PLAIN_SUFFIX = ".dcm"
BATCH_ERROR_SUFFIX = ".error"  # a member of a batch of files that could not be sent: why
BATCH_SHA256_SUFFIX = ".sha256"  # after each file a server encrypted: the SHA-256 of its ciphertext
MAX_NAME = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Names Windows refuses whatever the extension: a researcher may unzip there.
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


@dataclass(frozen=True)
class StudyInfo:
    study_uid: str
    patient_id: str
    study_date: str
    accession: str


@dataclass(frozen=True)
class SeriesInfo:
    series_uid: str
    series_number: int | None
    modality: str


@dataclass(frozen=True)
class InstanceInfo:
    study_uid: str
    series_uid: str
    sop_uid: str
    instance_number: int | None
    size: int
    cache_path: str = ""  # where the server reads it; empty on the client


@dataclass(frozen=True)
class PlannedFile:
    """One file of a download, in download order."""

    study_uid: str
    series_uid: str
    sop_uid: str
    path: str  # readable, '/'-separated
    number: str  # the zero-padded position in its series: the file name in both layouts
    size: int
    cache_path: str = ""


def safe_name(text: str, fallback: str) -> str:
    """A folder or file name every common file system accepts, never '.', '..' or empty."""
    name = _UNSAFE.sub("_", text.strip()).strip("._")[:MAX_NAME]
    if not name:
        return fallback
    if name.split(".")[0].upper() in _RESERVED:
        return "_" + name
    return name


def short_uid(uid: str) -> str:
    """The tail of a UID: its most specific digits, enough to tell studies of one day apart."""
    return uid.replace(".", "")[-10:] or "0"


def plan_paths(studies: Sequence[StudyInfo], series: dict[str, SeriesInfo],
               instances: Iterable[InstanceInfo]) -> list[PlannedFile]:
    """Readable paths for every instance, ordered by study, series, then InstanceNumber and SOP UID.

    Two studies (or series) that would share a folder name get their short UID
    appended, so no file ever overwrites another."""
    by_series: dict[str, list[InstanceInfo]] = defaultdict(list)
    series_of_study: dict[str, list[str]] = defaultdict(list)
    for instance in instances:
        if instance.series_uid not in by_series:
            series_of_study[instance.study_uid].append(instance.series_uid)
        by_series[instance.series_uid].append(instance)

    study_names = _unique({
        s.study_uid: (safe_name(s.patient_id, "unknown-patient"),
                      f"{safe_name(s.study_date, 'nodate')}_{safe_name(s.accession, '') or short_uid(s.study_uid)}")
        for s in studies
    })
    planned: list[PlannedFile] = []
    for study in sorted(studies, key=lambda s: (study_names[s.study_uid], s.study_uid)):
        series_names = _unique({
            uid: (study_names[study.study_uid], _series_label(series.get(uid), uid))
            for uid in series_of_study[study.study_uid]
        })
        for series_uid in sorted(series_of_study[study.study_uid], key=lambda u: (series_names[u], u)):
            members = sorted(by_series[series_uid], key=_instance_order)
            width = max(4, len(str(len(members))))
            for position, instance in enumerate(members, start=1):
                number = f"{position:0{width}d}"
                planned.append(PlannedFile(
                    study.study_uid, series_uid, instance.sop_uid,
                    f"{series_names[series_uid]}/{number}{PLAIN_SUFFIX}", number, instance.size, instance.cache_path,
                ))
    return planned


def _series_label(info: SeriesInfo | None, uid: str) -> str:
    number = f"{info.series_number:03d}" if info is not None and info.series_number is not None else "000"
    modality = safe_name(info.modality, "OT") if info is not None else "OT"
    return f"{number}_{modality}"


def _instance_order(instance: InstanceInfo) -> tuple[bool, int, str]:
    return (instance.instance_number is None, instance.instance_number or 0, instance.sop_uid)


def _unique(names: dict[str, tuple[str, str]]) -> dict[str, str]:
    """uid -> 'parent/name', appending the short UID (then a counter) where two UIDs would share a name."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for uid, key in names.items():
        groups[key].append(uid)
    result: dict[str, str] = {}
    taken: set[str] = {f"{parent}/{name}".lower() for (parent, name), uids in groups.items() if len(uids) == 1}
    for (parent, name), uids in groups.items():
        if len(uids) == 1:
            result[uids[0]] = f"{parent}/{name}"
            continue
        for uid in sorted(uids):
            candidate, counter = f"{parent}/{name}_{short_uid(uid)}", 1
            while candidate.lower() in taken:  # lower(): case-insensitive file systems
                counter += 1
                candidate = f"{parent}/{name}_{short_uid(uid)}-{counter}"
            taken.add(candidate.lower())
            result[uid] = candidate
    return result


def keyed_paths(key: bytes, files: Sequence[PlannedFile]) -> list[str]:
    """``<study-hmac16>/<series-hmac16>/<NNNN>.dcm.age`` for each file; the order stays in NNNN."""
    seen: dict[str, str] = {}
    paths = []
    for file in files:
        study = keyed_name(key, "study", file.study_uid)
        series = keyed_name(key, "series", file.series_uid)
        for name, uid in ((study, "s:" + file.study_uid), (f"{study}/{series}", "r:" + file.series_uid)):
            if seen.setdefault(name, uid) != uid:  # 64-bit names: astronomically rare, but never silent
                raise PermanentError("two folders of this download got the same keyed name; download again")
        paths.append(f"{study}/{series}/{file.number}{ENCRYPTED_SUFFIX}")
    return paths


# the manifest ----------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # as stored: the keyed name
    readable: str
    sha256: str
    size: int
    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass
class Manifest:
    project: str
    mode: str  # "passphrase" or "recipients"
    name_key: bytes
    recipients: list[str]  # public keys, so a resumed download encrypts to the same ones
    created_at: str
    files: list[ManifestEntry]

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT, "project": self.project, "mode": self.mode, "name_key": self.name_key.hex(),
            "recipients": self.recipients, "created_at": self.created_at, "files": [asdict(f) for f in self.files],
        }
        return json.dumps(body, indent=1, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            body: dict[str, Any] = json.loads(data)
            if body.get("format") != FORMAT:
                raise InvalidInput(f"manifest.age is of format {body.get('format')!r}; this mi2b2 reads {FORMAT!r}")
            return cls(project=str(body["project"]), mode=str(body["mode"]), name_key=bytes.fromhex(body["name_key"]),
                       recipients=[str(r) for r in body.get("recipients", [])], created_at=str(body["created_at"]),
                       files=[ManifestEntry(**entry) for entry in body["files"]])
        except (ValueError, KeyError, TypeError):
            raise InvalidInput("manifest.age decrypted but does not hold an mi2b2 manifest; "
                               "is this folder an mi2b2 download?") from None


def readme_text(mode: str, files: int, created_at: str) -> str:
    """Plain text beside the encrypted files: how to open them without mi2b2. No patient data."""
    if mode == "passphrase":
        keys = (
            "This download was encrypted with a passphrase. The passphrase opens identity.age, the\n"
            "download's own age key; that key opens every other file (the passphrase's slow key\n"
            "derivation runs once, not once per image).\n\n"
            "  age -d -o key.txt identity.age          # asks for the passphrase\n"
            "  age -d -i key.txt -o manifest.json manifest.age\n"
            "  age -d -i key.txt -o image.dcm <study>/<series>/0001.dcm.age\n\n"
            "key.txt opens everything here: keep it as safe as the images, delete it when done.\n"
        )
        identity = "key.txt"
    else:
        keys = (
            "This download was encrypted to the public keys its requester gave (age or SSH keys).\n"
            "Open it with the matching private key:\n\n"
            "  age -d -i ~/.ssh/id_ed25519 -o manifest.json manifest.age     # or -i your-age-key.txt\n"
            "  age -d -i ~/.ssh/id_ed25519 -o image.dcm <study>/<series>/0001.dcm.age\n"
        )
        identity = "KEYFILE"
    return (
        "mi2b2 encrypted download\n"
        "========================\n\n"
        f"Created {created_at}, {files} images. Every file ending in .age is encrypted with age\n"
        "(https://age-encryption.org, format age-encryption.org/v1); any age tool opens it.\n\n"
        + keys +
        "\nFolder and file names are keyed hashes that reveal nothing; the order of images in a\n"
        "series is kept (0001, 0002, ...). manifest.age maps each name back to a readable path\n"
        "<patient>/<study>/<series>/<number>.dcm with its SHA-256 and size.\n\n"
        "With mi2b2 installed, restore the readable tree in one step (checked before anything is written):\n\n"
        "  mi2b2 decrypt THIS_FOLDER_OR_ZIP --to OUTPUT_FOLDER "
        + ("--passphrase\n" if mode == "passphrase" else f"--identity {identity}\n")
        + "\nOr view it without writing any decrypted file: mi2b2 view THIS_FOLDER_OR_ZIP\n\n"
        "Decrypted images identify patients: store them only where your IRB protocol allows.\n"
    )
