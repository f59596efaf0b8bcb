"""Directory groups to mi2b2 roles."""

from __future__ import annotations

from mi2b2.domain.directory_roles import groups_in_claim, role_for_groups
from mi2b2.domain.principal import Role

ROLES = {
    "cn=Researchers,ou=groups,dc=example,dc=org": Role.RESEARCHER,
    "cn=auditors, ou=groups, dc=example, dc=org": Role.AUDITOR,
    "cn=admins,ou=groups,dc=example,dc=org": Role.ADMIN,
}


def test_a_mapped_group_gives_its_role_whatever_the_case_and_spacing() -> None:
    assert role_for_groups(["CN=researchers, OU=Groups,DC=example,DC=org"], ROLES) is Role.RESEARCHER
    assert role_for_groups(["cn=auditors,ou=groups,dc=example,dc=org"], ROLES) is Role.AUDITOR


def test_several_mapped_groups_give_the_strongest_role() -> None:
    groups = ["cn=researchers,ou=groups,dc=example,dc=org", "cn=admins,ou=groups,dc=example,dc=org",
              "cn=auditors,ou=groups,dc=example,dc=org"]
    assert role_for_groups(groups, ROLES) is Role.ADMIN
    assert role_for_groups(groups[::2], ROLES) is Role.AUDITOR


def test_no_mapped_group_gives_no_role() -> None:
    assert role_for_groups([], ROLES) is None
    assert role_for_groups(["cn=staff,ou=groups,dc=example,dc=org", "cn=researchers,dc=elsewhere"], ROLES) is None


def test_provider_group_names_compare_exactly() -> None:
    roles = {"mi2b2-admins": Role.ADMIN, "imaging/researchers": Role.RESEARCHER}
    assert role_for_groups(["staff", "imaging/researchers"], roles, normal=str) is Role.RESEARCHER
    assert role_for_groups(["MI2B2-ADMINS", " mi2b2-admins"], roles, normal=str) is None  # another group's name


def test_groups_are_read_from_a_claim_a_nested_claim_or_a_single_string() -> None:
    claims = {"groups": ["a", 7, "b"], "realm_access": {"roles": ["admin"]}, "role": "auditor", "odd": {"x": 1}}
    assert groups_in_claim(claims, "groups") == ["a", "b"]  # what is not a string is no group
    assert groups_in_claim(claims, "realm_access.roles") == ["admin"]
    assert groups_in_claim(claims, "role") == ["auditor"]
    assert groups_in_claim(claims, "odd") == groups_in_claim(claims, "missing.deeper") == []
    assert groups_in_claim(claims, "groups.deeper") == []
