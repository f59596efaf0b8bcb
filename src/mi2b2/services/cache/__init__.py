"""The project cache: what is in it, how full it is, deleting from it, and checking it.

One module per role: `index` (the one path that files placed instances in the
index), `reads` (usage, listings, a study's detail), `deletion` (removing
studies, files and index together) and `fsck` (comparing index and disk, and
repairing). Retrieval into the cache is governed elsewhere; reading images is
decided in `services.data_access`.
"""

from mi2b2.services.cache.deletion import DeleteReport, delete_studies, remove_studies
from mi2b2.services.cache.fsck import AggregateMismatch, FsckReport, SizeMismatch, fsck
from mi2b2.services.cache.index import Arrival, Placement, index_instance, index_instances
from mi2b2.services.cache.reads import (
    CachedStudyView,
    SeriesView,
    StudyDetail,
    Usage,
    cache_store,
    list_studies,
    project_usage,
    require_member,
    study_detail,
    usage_in,
)

__all__ = [
    "AggregateMismatch",
    "Arrival",
    "CachedStudyView",
    "DeleteReport",
    "FsckReport",
    "Placement",
    "SeriesView",
    "SizeMismatch",
    "StudyDetail",
    "Usage",
    "cache_store",
    "delete_studies",
    "fsck",
    "index_instance",
    "index_instances",
    "list_studies",
    "project_usage",
    "remove_studies",
    "require_member",
    "study_detail",
    "usage_in",
]
