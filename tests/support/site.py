"""Site configurations for tests: a TOML file, MRN lists, a database."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mi2b2.config import SiteConfig, load_config
from support.pacs import free_port

ALLOWED_A = ["000123", "MRN-0002", "77", "PAT004", "P005"]
ALLOWED_B = ["B-1", "B-2"]


def site_head(database_url: str, dicom_port: int, dicom_extra: str = "") -> str:
    """[server], [dicom] and the first institution's department, for its [[...pacs]] blocks to follow."""
    return textwrap.dedent(f"""
        [server]
        database_url = "{database_url}"
        cache_dir = "cache"

        [dicom]
        ae_title = "MI2B2"
        port = {dicom_port}
        {dicom_extra}
    """) + general_radiology()


def general_radiology() -> str:
    """The institution 'general' and its department 'radiology': the [[...pacs]] blocks that follow are its."""
    return textwrap.dedent("""
        [[institutions]]
        id = "general"
        name = "General Hospital"

        [[institutions.departments]]
        id = "radiology"
        name = "Radiology"
    """)


def pacs_block(pacs_id: str, ae_title: str, port: int, extra: str = "", host: str = "127.0.0.1") -> str:
    """One [[institutions.departments.pacs]] entry of the first department."""
    return textwrap.dedent(f"""
        [[institutions.departments.pacs]]
        id = "{pacs_id}"
        ae_title = "{ae_title}"
        host = "{host}"
        port = {port}
    """) + textwrap.dedent(extra)


def always_window(max_concurrent: int, studies_per_minute: int | None = None) -> str:
    """A [[...pacs.windows]] entry for the PACS block above: open all day, every day, with these caps."""
    per_minute = "" if studies_per_minute is None else f"studies_per_minute = {studies_per_minute}\n"
    return textwrap.dedent(f"""
        [[institutions.departments.pacs.windows]]
        name = "always"
        days = "mon-sun"
        start = 00:00:00
        end = 00:00:00
        max_concurrent = {max_concurrent}
    """) + per_minute


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
    text = site_head(url, dicom_port or free_port(), dicom_extra) + textwrap.dedent(pacs) + textwrap.dedent(f"""
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
