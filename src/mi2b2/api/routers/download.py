"""Downloads: a streamed ZIP, or a manifest and then its files in batches (the CLI's resumable folder download).

All POST: study UIDs, passphrases and keys travel in bodies, never in URLs
that proxies and access logs keep.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas.bodies import RowId
from mi2b2.api.schemas.cache import DownloadManifest
from mi2b2.services.export import batch, download

CIPHERTEXT_SHA256 = "X-Mi2b2-Ciphertext-SHA256"  # an age file the server made: the SHA-256 of what was sent
router = APIRouter(prefix="/projects/{project_id}/download", tags=["download"])


class EncryptionBody(BaseModel):
    passphrase: str | None = Field(default=None, max_length=1000)
    recipients: list[str] = Field(default_factory=list, max_length=20)


class DownloadBody(BaseModel):
    study_uids: list[str] = Field(default_factory=list, max_length=download.MAX_STUDIES)
    all: bool = False
    encryption: EncryptionBody | None = None


class ManifestBody(BaseModel):
    study_uids: list[str] = Field(default_factory=list, max_length=download.MAX_STUDIES)
    all: bool = False
    encryption: str | None = Field(default=None, description="what the client will do: 'passphrase', 'recipients' or null")


class InstanceBody(BaseModel):
    download_id: RowId
    study_uid: str = Field(max_length=64)
    sop_uid: str = Field(max_length=64)
    encryption: EncryptionBody | None = Field(
        default=None, description="required in an encrypted_only project: the file is then sent as an age file")


class FileBody(BaseModel):
    download_id: RowId
    study_uid: str = Field(max_length=64)
    sop_uid: str = Field(max_length=64)


class FilesBody(BaseModel):
    files: list[FileBody] = Field(min_length=1, max_length=batch.MAX_FILES)
    encryption: EncryptionBody | None = Field(
        default=None, description="required in an encrypted_only project: each file is then sent as an age file")


def _encryption(body: EncryptionBody | None) -> download.Encryption | None:
    return None if body is None else download.Encryption(body.passphrase, tuple(body.recipients))


@router.post("", response_class=StreamingResponse,
             responses={200: {"content": {"application/zip": {}}, "description": "the ZIP, streamed"}})
def download_zip(project_id: str, body: DownloadBody, user: CurrentUser, ctx: ContextDep) -> StreamingResponse:
    result = download.zip_download(ctx, user, project_id, body.study_uids, body.all, _encryption(body.encryption))
    headers = {
        "Content-Disposition": f'attachment; filename="{result.filename}"',
        "X-Mi2b2-Studies": str(result.studies),
        "X-Mi2b2-Files": str(result.files),
        "X-Mi2b2-Bytes": str(result.bytes),
        "Cache-Control": "no-store",
    }
    return StreamingResponse(result.chunks, media_type="application/zip", headers=headers)


@router.post("/manifest", response_model=DownloadManifest)
def download_manifest(project_id: str, body: ManifestBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return download.download_manifest(ctx, user, project_id, body.study_uids, body.all, body.encryption)


@router.post("/instance", response_class=StreamingResponse,
             responses={200: {"content": {"application/dicom": {}, "application/octet-stream": {}},
                              "description": "one cached DICOM file, or an age file of it (encrypted_only)"}})
def download_instance(project_id: str, body: InstanceBody, user: CurrentUser, ctx: ContextDep) -> StreamingResponse:
    result = download.download_instance(ctx, user, project_id, body.download_id, body.study_uid, body.sop_uid,
                                        _encryption(body.encryption))
    headers = {"Content-Length": str(result.size), "Cache-Control": "no-store"}
    if result.ciphertext_sha256 is None:
        return StreamingResponse(result.chunks, media_type="application/dicom", headers=headers)
    headers[CIPHERTEXT_SHA256] = result.ciphertext_sha256
    return StreamingResponse(result.chunks, media_type="application/octet-stream", headers=headers)


@router.post("/files", response_class=StreamingResponse,
             responses={200: {"content": {"application/x-tar": {}},
                              "description": "the files asked for, in order, as a tar stream (see services.export.batch)"}})
def download_files(project_id: str, body: FilesBody, user: CurrentUser, ctx: ContextDep) -> StreamingResponse:
    asked = [batch.FileAsked(f.download_id, f.study_uid, f.sop_uid) for f in body.files]
    result = batch.download_files(ctx, user, project_id, asked, _encryption(body.encryption))
    return StreamingResponse(result.chunks, media_type="application/x-tar", headers={"Cache-Control": "no-store"})
