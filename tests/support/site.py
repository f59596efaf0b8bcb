"""Site configurations for tests: a TOML file, MRN lists, a database."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mi2b2.config import SiteConfig, load_config
from support.pacs import free_port

ALLOWED_A = ["000123", "MRN-0002", "77", "PAT004", "P005"]
ALLOWED_B = ["B-1", "B-2"]


def pacs_block(pacs_id: str, ae_title: str, port: int, extra: str = "") -> str:
    """One [[institutions.departments.pacs]] entry of the first department."""
    return textwrap.dedent(f"""
        [[institutions.departments.pacs]]
        id = "{pacs_id}"
        ae_title = "{ae_title}"
        host = "127.0.0.1"
        port = {port}
    """) + textwrap.dedent(extra)


def write_site(
    folder: Path,
    pacs_blocks: str | None = None,
    database_url: str | None = None,
    extra: str = "",
    allowed_a: list[str] | None = None,
    expired_b: bool = True,
    dicom_port: int | None = None,
    dicom_extra: str = "",
) -> Path:
    """Two institutions, project 'alpha' (alice, bob) and project 'beta' (carol, IRB expired)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpha.mrns").write_text("\n".join(allowed_a or ALLOWED_A) + "\n")
    (folder / "beta.mrns").write_text("\n".join(ALLOWED_B) + "\n")
    pacs = pacs_blocks or pacs_block("main", "PACS", 11113)
    url = database_url or f"sqlite:///{folder / 'mi2b2.db'}"
    text = textwrap.dedent(f"""
        [server]
        database_url = "{url}"
        cache_dir = "cache"

        [dicom]
        ae_title = "MI2B2"
        port = {dicom_port or free_port()}
        {dicom_extra}

        [[institutions]]
        id = "general"
        name = "General Hospital"

        [[institutions.departments]]
        id = "radiology"
        name = "Radiology"
    """) + textwrap.dedent(pacs) + textwrap.dedent(f"""
        [[institutions]]
        id = "childrens"
        name = "Children's Hospital"

        [[projects]]
        id = "alpha"
        title = "Brain MRI cohort"
        irb = "2026P000123"
        expires = 2099-12-31
        mrn_file = "alpha.mrns"
        quota = "10 GiB"
        institutions = ["general"]
        max_studies_per_patient = 20
        members = [{{ login = "alice", role = "lead" }}, {{ login = "bob" }}]

        [[projects]]
        id = "beta"
        title = "Expired protocol"
        irb = "2019P000999"
        expires = {"2020-01-31" if expired_b else "2099-12-31"}
        mrn_files = {{ general = "beta.mrns" }}
        quota = "1 GiB"
        institutions = ["general", "childrens"]
        members = [{{ login = "carol" }}, {{ login = "alice" }}]
    """) + extra
    path = folder / "mi2b2.toml"
    path.write_text(text)
    return path


def load_site(folder: Path, **kwargs: object) -> SiteConfig:
    return load_config(write_site(folder, **kwargs))  # type: ignore[arg-type]
