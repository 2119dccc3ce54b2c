"""The glibc setting the pneumojax command starts with (pneumojax/hugepages.py): set only where
it can matter, never over the user's own value, never twice, and off on request."""

import pytest

from pneumojax import hugepages

HOST = dict(platform="linux", glibc=(2, 36), mode="madvise")


def test_set_where_it_helps_and_composes_with_other_tunables():
    assert hugepages.tunables({}, **HOST) == "glibc.malloc.hugetlb=1"
    given = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hugepages.tunables(given, **HOST) == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, host",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user's own value wins
        ({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=2"}, {}),
        ({hugepages.OPT_OUT: "0"}, {}),
        ({hugepages.OPT_OUT: "off"}, {}),
        ({hugepages.MARKER: "1"}, {}),  # already started again once
        ({}, {"platform": "darwin"}),
        ({}, {"glibc": None}),  # musl or another C library
        ({}, {"glibc": (2, 34)}),  # before the tunable existed
        ({}, {"mode": "always"}),  # the kernel gives huge pages already
        ({}, {"mode": "never"}),
        ({}, {"mode": None}),  # no transparent huge pages at all
    ],
)
def test_left_alone_where_it_cannot_help_or_is_not_wanted(environ, host):
    assert hugepages.tunables(environ, **{**HOST, **host}) is None


def test_reads_the_kernels_mode_and_the_c_library(tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(mode) == "madvise"
    mode.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(mode) == "always"
    assert hugepages.thp_mode(tmp_path / "missing") is None
    version = hugepages.glibc_version()
    assert version is None or (isinstance(version[0], int) and version >= (2, 0))
