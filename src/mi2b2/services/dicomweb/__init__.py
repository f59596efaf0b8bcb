"""DICOMweb out of a project's cache: QIDO-RS search and WADO-RS retrieve (PS3.18).

So that a DICOMweb viewer or a script (OHIF, dicomweb-client, 3D Slicer) can
read what a project already holds, with the same tokens and the same door as
the rest of mi2b2: members of the project and site admins.

Search answers from the cache index first (`records`), matching as PS3.4
C.2.2.2 says (`matching`) the parameters a request gives (`query`). Retrieve
streams the files from disk as stored (`multipart`), or as Explicit VR Little
Endian where the client asks for PS3.18's default or names it (compressed
instances decoded, `adapters.dicom.transcode`); any other transfer syntax gets
406 naming what is available (`negotiation`). Frames (native or encapsulated)
and metadata are served too; the format work with pydicom lives in
`adapters.dicom.frames` and `adapters.dicom.dicom_json`. The doors and the
audit are in `service`.
"""

from mi2b2.services.dicomweb.negotiation import NotAcceptable, dicom_transfer_syntaxes
from mi2b2.services.dicomweb.query import Query, parse_query
from mi2b2.services.dicomweb.service import DicomWeb, Retrieval, SearchResult

__all__ = ["DicomWeb", "NotAcceptable", "Query", "Retrieval", "SearchResult", "dicom_transfer_syntaxes", "parse_query"]
