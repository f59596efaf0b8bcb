from __future__ import annotations

import os
import textwrap
from datetime import UTC, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from mi2b2.config import OidcConfig, load_config, parse_size
from mi2b2.domain.windows import GovernanceWindow, limits_at
from mi2b2.errors import ConfigError
from support.site import write_site


def test_the_test_site_is_valid(tmp_path: Path) -> None:
    config = load_config(write_site(tmp_path))
    assert [p.id for p in config.projects] == ["alpha", "beta"]
    assert config.projects[0].quota == 10 * 2**30
    assert config.database_url().startswith("sqlite:////")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('port = 11113', 'port = 70000'), r"institutions\['general'\].departments\['radiology'\].pacs\['main'\].port"),
        (('quota = "10 GiB"', 'quota = "lots"'), r"projects\['alpha'\].quota: 'lots' is not a size"),
        (('expires = 2099-12-31', 'expires = "soon"'), r"projects\['alpha'\].expires"),
        (('institutions = ["general"]', 'institutions = ["nowhere"]'), "names institution 'nowhere'"),
        (('ae_title = "PACS"', 'ae_title = "A_VERY_LONG_AE_TITLE_INDEED"'), "is not an AE title"),
        (('cache_dir = "cache"', 'cache_dir = "cache"\ncolour = "blue"'), r"server.colour: unknown setting"),
        (('[dicom]', '[dicom\n'), "is not valid TOML"),
        (('mrn_file = "alpha.mrns"', 'mrn_file = "missing.mrns"'), "missing.mrns does not exist"),
        (('ae_title = "MI2B2"', 'ae_title = "MI2B2"\ntls_cert = "c.pem"'), r"now a \[dicom.tls\] table"),
        (('ae_title = "MI2B2"', 'ae_title = "MI2B2"\ntls = { cert_file = "r.pem", key_file = "r.key" }'),
         "require_client_cert = true needs ca_file"),
        (('port = 11113', 'port = 11113\ntls = { ca_file = "ca.pem", cert_file = "c.pem" }'),
         r"pacs\['main'\].tls: .*set both cert_file and key_file"),
        (('port = 11113', 'port = 11113\ntls = { ca_file = "nowhere/ca.pem" }'),
         r"pacs\['main'\].tls.ca_file: .*nowhere/ca.pem does not exist; fix the path"),
        (('port = 11113', 'port = 11113\ntls = { ca_file = "alpha.mrns" }'),
         r"pacs\['main'\].tls.ca_file: .*alpha.mrns does not hold PEM certificate"),
        (('ae_title = "MI2B2"', 'ae_title = "MI2B2"\nproxy_protocol_from = ["balancer.example.org"]'),
         r"dicom.proxy_protocol_from.*'balancer.example.org' is not an IP address or network; .*10.0.0.10"),
    ],
    ids=["port", "quota", "expiry", "institution-ref", "ae-title", "unknown-key", "toml-syntax", "mrn-file",
         "old-dicom-tls-keys", "receiver-tls-without-ca", "pacs-tls-half-pair", "pacs-tls-missing-ca", "pacs-tls-not-pem",
         "proxy-protocol-not-an-address"],
)
def test_bad_config_gets_one_clear_message(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = write_site(tmp_path)
    path.write_text(path.read_text().replace(*change, 1))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_proxy_protocol_from_is_a_list_of_networks(tmp_path: Path) -> None:
    path = write_site(tmp_path)
    assert load_config(path).dicom.proxy_protocol_from == []  # the default: no PROXY protocol
    path.write_text(path.read_text().replace('ae_title = "MI2B2"',
                                             'ae_title = "MI2B2"\nproxy_protocol_from = ["10.0.0.5", "10.1.0.7/24"]', 1))
    assert load_config(path).dicom.proxy_protocol_from == ["10.0.0.5/32", "10.1.0.0/24"]


def test_dicom_tls_files_are_checked_when_the_configuration_loads(tmp_path: Path) -> None:
    path = write_site(tmp_path, extra=textwrap.dedent("""
        [[destinations]]
        id = "research"
        ae_title = "RESEARCH"
        host = "127.0.0.1"
        port = 11119
        tls = { ca_file = "ca.pem", cert_file = "client.pem", key_file = "client.key" }
    """))
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (tmp_path / "client.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (tmp_path / "client.key").write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=r"destinations\['research'\].tls.key_file: .* encrypted with a passphrase"):
        load_config(path)
    (tmp_path / "client.key").write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
    (tmp_path / "client.key").chmod(0)
    if os.access(tmp_path / "client.key", os.R_OK):  # running as root: permissions do not stop reading
        (tmp_path / "client.key").unlink()
        match = "client.key does not exist"
    else:
        match = "cannot read .*client.key .* make it readable"
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    (tmp_path / "client.key").unlink(missing_ok=True)
    (tmp_path / "client.key").write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
    config = load_config(path)
    assert config.destinations[0].tls is not None and config.destinations[0].tls.ca_file == Path("ca.pem")

    # The old switch: false still means plain DICOM, true asks for the settings.
    path.write_text(path.read_text().replace('tls = { ca_file = "ca.pem", cert_file = "client.pem", '
                                             'key_file = "client.key" }', "tls = false"))
    assert load_config(path).destinations[0].tls is None
    path.write_text(path.read_text().replace("tls = false", "tls = true"))
    with pytest.raises(ConfigError, match=r"replace tls = true with a table, e.g. tls = \{ ca_file"):
        load_config(path)


def test_garbage_allow_list_names_the_file_and_line(tmp_path: Path) -> None:
    path = write_site(tmp_path)
    (tmp_path / "alpha.mrns").write_text("*\n")
    with pytest.raises(ConfigError, match=r"alpha.mrns: no usable MRNs: line 1 '\*' contains a wildcard"):
        load_config(path)


def test_empty_allow_list_is_refused(tmp_path: Path) -> None:
    path = write_site(tmp_path)
    (tmp_path / "alpha.mrns").write_text("\n \n")
    with pytest.raises(ConfigError, match="no MRNs found"):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; create it or pass --config"):
        load_config(tmp_path / "nope.toml")


def test_plain_http_only_on_loopback(tmp_path: Path) -> None:
    path = write_site(tmp_path)
    path.write_text(path.read_text().replace("[server]", '[server]\nhttp_host = "0.0.0.0"'))
    with pytest.raises(ConfigError, match="plain HTTP is only allowed on 127.0.0.1"):
        load_config(path)


@pytest.mark.parametrize(("text", "size"), [("500 GiB", 500 * 2**30), ("2 TB", 2 * 10**12), ("1.5 MiB", 1572864), (42, 42)])
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_windows_from_config_wrap_midnight(tmp_path: Path) -> None:
    config = load_config(write_site(tmp_path, pacs_blocks="""
        [[institutions.departments.pacs]]
        id = "main"
        ae_title = "PACS"
        host = "127.0.0.1"
        port = 11113
        timezone = "America/New_York"
        [[institutions.departments.pacs.windows]]
        name = "weeknights"
        days = "mon-fri"
        start = 19:00:00
        end = 07:00:00
        max_concurrent = 4
        studies_per_minute = 10
        [[institutions.departments.pacs.windows]]
        name = "weekend"
        days = ["sat", "sun"]
        max_concurrent = 8
        [[institutions.departments.pacs.windows]]
        name = "clinical day"
        days = "mon-fri"
        start = 07:00:00
        end = 19:00:00
        closed = true
    """))
    pacs = config.all_pacs()[0]
    windows = [w.to_domain() for w in pacs.windows]
    zone = ZoneInfo(pacs.timezone)
    # Saturday 03:00 New York: Friday night's window still runs (it started on a weekday).
    saturday_early = datetime(2026, 1, 10, 3, 0, tzinfo=zone).astimezone(UTC)
    assert limits_at(windows, saturday_early, zone, 2).window == "weeknights"
    assert limits_at(windows, datetime(2026, 1, 10, 12, 0, tzinfo=zone), zone, 2).max_concurrent == 8
    tuesday_noon = limits_at(windows, datetime(2026, 1, 6, 12, 0, tzinfo=zone), zone, 2)
    assert tuesday_noon.closed and tuesday_noon.window == "clinical day"
    # Monday 03:00 is in no window (Sunday's whole-day window ends at midnight): closed.
    monday_early = limits_at(windows, datetime(2026, 1, 5, 3, 0, tzinfo=zone), zone, 2)
    assert monday_early.closed and monday_early.window == "outside all windows"


def test_no_windows_means_default_cap_and_no_window_match_means_closed() -> None:
    now = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)
    assert limits_at([], now, ZoneInfo("UTC"), 3).max_concurrent == 3
    night_only = [GovernanceWindow("night", frozenset(range(7)), time(20), time(6))]
    assert limits_at(night_only, now, ZoneInfo("UTC"), 3).closed


# --- allow-lists per institution ---------------------------------------------------------

BETA_LIST = 'mrn_files = { general = "beta.mrns" }'


def _config_error(tmp_path: Path, replacements: list[tuple[str, str]], files: dict[str, str] | None = None) -> str:
    path = write_site(tmp_path)
    text = path.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    for name, content in (files or {}).items():
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return str(raised.value)


def test_a_plain_list_for_a_project_of_two_institutions_is_refused_with_the_fix(tmp_path: Path) -> None:
    message = _config_error(tmp_path, [(BETA_LIST, 'mrn_file = "beta.mrns"')])
    assert "project 'beta'" in message and "beta.mrns" in message
    assert "ambiguous" in message and "mrn_files" in message and "institution column" in message


def test_a_csv_naming_an_unknown_institution_is_refused(tmp_path: Path) -> None:
    message = _config_error(tmp_path, [(BETA_LIST, 'mrn_file = "beta.csv"')],
                            {"beta.csv": "institution,mrn\ngeneral,B-1\nnorthside,B-2\n"})
    assert "beta.csv: line 3: unknown institution 'northside'; configured institutions: childrens, general" in message


def test_a_csv_row_whose_issuer_differs_from_the_institutions_is_refused(tmp_path: Path) -> None:
    message = _config_error(
        tmp_path,
        [(BETA_LIST, 'mrn_file = "beta.csv"'), ('name = "General Hospital"', 'name = "General Hospital"\nissuer = "GEN"')],
        {"beta.csv": "institution,mrn,issuer\ngeneral,B-1,GEN\nchildrens,B-2,\ngeneral,B-3,KIDS\n"},
    )
    assert "line 4: issuer 'KIDS' differs from institution 'general'" in message


@pytest.mark.parametrize(("replacements", "expected"), [
    ([(BETA_LIST, 'mrn_files = { general = "beta.mrns", lakeside = "beta.mrns" }')],
     "mrn_files names institution 'lakeside', which is not configured"),
    ([('mrn_file = "alpha.mrns"', 'mrn_file = "alpha.mrns"\nmrn_files = { general = "alpha.mrns" }')],
     "either as mrn_file"),
    ([('name = "General Hospital"', 'name = "General Hospital"\nissuer = "SAME"'),
      ('name = "Children\'s Hospital"', 'name = "Children\'s Hospital"\nissuer = "SAME"')],
     "both name issuer 'SAME'"),
    ([('name = "General Hospital"', 'name = "General Hospital"\nissuer = "A*"')], "issuer 'A*' contains a wildcard"),
    ([('name = "General Hospital"', 'name = "General Hospital"\nmrn_format = { digits = 6, strip_leading_zeros = true }')],
     "either digits"),
    ([('name = "General Hospital"', 'name = "General Hospital"\nmrn_format = { digits = 6 }')],
     "alpha.mrns: line 2: 'MRN-0002' is not a number"),
], ids=["mrn-files-unknown", "both-forms", "shared-issuer", "issuer-wildcard", "zeros-both-ways", "list-off-format"])
def test_allow_list_settings_that_cannot_be_applied_are_refused(
    tmp_path: Path, replacements: list[tuple[str, str]], expected: str
) -> None:
    assert expected in _config_error(tmp_path, replacements)


def test_each_institution_reads_its_list_in_its_own_format(tmp_path: Path) -> None:
    path = write_site(tmp_path, allowed_a=["000123", "00-77"])
    text = path.read_text().replace(
        'name = "General Hospital"', 'name = "General Hospital"\nmrn_format = { digits = 6, remove = "-" }', 1)
    path.write_text(text.replace(BETA_LIST, 'mrn_file = "beta.csv"'))
    (tmp_path / "beta.csv").write_text("institution,mrn\ngeneral,123\nchildrens,000123\nchildrens,123\n")
    config = load_config(path)
    alpha, beta = config.projects
    assert config.allow_list(alpha) == [("general", "000123"), ("general", "000077")]
    assert config.allow_list(beta) == [("general", "000123"), ("childrens", "000123"), ("childrens", "123")]


def test_an_oidc_issuer_is_https_or_on_this_host_and_scopes_ask_for_openid() -> None:
    base = {"client_id": "mi2b2", "client_secret_file": "secret", "roles": {"g": "researcher"}}
    assert OidcConfig.model_validate(base | {"issuer": "http://127.0.0.1:9000"}).scopes == ["openid", "profile"]
    assert OidcConfig.model_validate(base | {"issuer": "http://localhost:9000/realms/x"})
    for issuer in ("http://login.example.org", "ftp://login.example.org", "https://login.example.org/?a=1", "login"):
        with pytest.raises(ValueError, match="issuer"):
            OidcConfig.model_validate(base | {"issuer": issuer})
    with pytest.raises(ValueError, match='must include "openid"'):
        OidcConfig.model_validate(base | {"issuer": "https://login.example.org", "scopes": ["profile"]})
    with pytest.raises(ValueError, match="not a valid login"):
        OidcConfig.model_validate(base | {"issuer": "https://login.example.org", "local_logins": ["no way"]})
