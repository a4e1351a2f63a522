"""Layer patterns: names, prefixes at a separator, globs."""

from __future__ import annotations

import pytest

from tracin._export.layers import as_patterns, matches


def test_prefixes_stop_at_the_separator_and_globs_cross_it():
    assert matches("fc2.weight", "fc2", ".") and matches("fc2.weight", "fc2.", ".")
    assert not matches("fc20.weight", "fc2", ".")
    assert matches("params/Dense_1/kernel", "params/Dense_1/*", "/")
    assert matches("encoder.layer.11.attn.weight", "encoder.layer.11.*", ".")
    assert not matches("l2/kernel", "l2", ".")  # '/' is not the separator here


def test_a_glob_matches_the_names_below_what_it_matches():
    """A glob is a prefix too: "h.*.mlp" chooses every parameter of each block's mlp, as "fc2" chooses fc2's."""
    assert matches("h.0.mlp.bias", "h.*.mlp", ".") and matches("h.11.mlp.c_fc.weight", "h.*.mlp", ".")
    assert matches("params/Dense_3/kernel", "params/Dense_*", "/")
    assert not matches("h.0.mlpx.bias", "h.*.mlp", ".")  # the glob's last part ends at the separator


def test_patterns_must_be_non_empty_strings():
    assert as_patterns("fc", "['fc']") == ["fc"]
    for bad in ([], [""], [3], None):
        with pytest.raises(TypeError, match=r"layers must be a non-empty list of name patterns .*\['fc'\]"):
            as_patterns(bad, "['fc']")
