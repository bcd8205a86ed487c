"""The stage contract: selection alignment, BackboneOutput, input checks (property-based where it pays)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_backbone import BackboneOutput, align_stage_selection

STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]


def test_default_is_last_stage():
    assert align_stage_selection(None, None, STAGES) == (["stage4"], [4])


@pytest.mark.parametrize(
    ("features", "indices", "expected"),
    [
        (None, [0, 2], (["stem", "stage2"], [0, 2])),
        (None, (-1,), (["stage4"], [4])),
        (None, [-5, -1], (["stem", "stage4"], [0, 4])),
        (["stage1", "stage3"], None, (["stage1", "stage3"], [1, 3])),
        (["stage1", "stage3"], [1, -2], (["stage1", "stage3"], [1, 3])),
        (None, range(1, 3), (["stage1", "stage2"], [1, 2])),
    ],
)
def test_alignment(features, indices, expected):
    assert align_stage_selection(features, indices, STAGES) == expected


@pytest.mark.parametrize(
    ("features", "indices", "match"),
    [
        (None, [5], r"out_indices entry 5 is out of range for 5 stages; valid indices are -5\.\.4"),
        (None, [0, 5], r"out of range"),  # index 0 first must not hide the bad one (truthiness bug in peers)
        (None, [-6], r"out_indices entry -6 is out of range"),  # must not wrap around under %
        (None, [1, 1], r"selects a stage more than once"),
        (None, [1, -4], r"selects a stage more than once"),
        (None, [2, 1], r"must follow stage order \(expected \[1, 2\]\)"),
        (None, [], r"must not be empty"),
        (["stage9"], None, r"unknown stage 'stage9' in out_features; valid stage names are \['stem'"),
        (["stage2", "stage1"], None, r"must follow stage order"),
        (["stage1", "stage1"], None, r"more than once"),
        (["stage1"], [2], r"select different stages"),
        (["stage1", "stage2"], [1], r"select different stages"),
        # transformers' container rules: out_features a list, out_indices a list or tuple
        ("stage2", None, r"out_features must be a list, got str 'stage2'; e\.g\. out_features=\['stage2'\]"),
        (("stage1",), None, r"out_features must be a list, got tuple"),
        (None, 3, r"out_indices must be a list or tuple, got int 3"),
    ],
)
def test_invalid_selections_raise_value_error(features, indices, match):
    with pytest.raises(ValueError, match=match):
        align_stage_selection(features, indices, STAGES)


def test_unknown_stage_names_are_a_value_error():
    with pytest.raises(ValueError, match="stage_names must be set"):
        align_stage_selection(None, [0], None)


def test_names_ordered_by_stage_not_by_string():
    blocks = [f"blocks.{i}" for i in range(12)]
    names, indices = align_stage_selection(["blocks.3", "blocks.11"], None, blocks)
    assert (names, indices) == (["blocks.3", "blocks.11"], [3, 11])
    with pytest.raises(ValueError, match="stage order"):
        align_stage_selection(["blocks.11", "blocks.3"], None, blocks)


@pytest.mark.parametrize("bad", [[1.0], ["1"], [True]])
def test_wrong_types_raise_type_error(bad):
    with pytest.raises(TypeError, match="out_indices must contain ints"):
        align_stage_selection(None, bad, STAGES)


def test_error_names_valid_choices():
    with pytest.raises(ValueError) as info:
        align_stage_selection(None, [7], STAGES)
    assert "0: 'stem'" in str(info.value) and "4: 'stage4'" in str(info.value)


stage_lists = st.integers(1, 14).map(lambda n: [f"blocks.{i}" for i in range(n)])


@settings(max_examples=200, deadline=None)
@given(data=st.data(), stages=stage_lists)
def test_valid_selections_round_trip(data, stages):
    n = len(stages)
    chosen = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    # every index may be written positive or negative
    written = [i - n if data.draw(st.booleans()) else i for i in chosen]
    names, indices = align_stage_selection(None, written, stages)
    assert indices == chosen and names == [stages[i] for i in chosen]
    assert align_stage_selection(names, None, stages) == (names, indices)
    assert align_stage_selection(names, written, stages) == (names, indices)
    # normalised selections are fixed points: a saved config reloads to the same selection
    assert align_stage_selection(names, indices, stages) == (names, indices)


@settings(max_examples=300, deadline=None)
@given(stages=stage_lists, indices=st.lists(st.integers(-40, 40), min_size=1, max_size=6))
def test_any_index_list_is_valid_or_value_error(stages, indices):
    n = len(stages)
    positions = [i + n if i < 0 else i for i in indices]
    valid = all(0 <= p < n for p in positions) and positions == sorted(set(positions))
    if valid:
        assert align_stage_selection(None, indices, stages)[1] == positions
    else:
        with pytest.raises(ValueError):  # never IndexError
            align_stage_selection(None, indices, stages)


@settings(max_examples=200, deadline=None)
@given(stages=stage_lists, names=st.lists(st.sampled_from([f"blocks.{i}" for i in range(16)] + ["x"]), max_size=5))
def test_any_name_list_is_valid_or_value_error(stages, names):
    positions = [stages.index(n) if n in stages else None for n in names]
    valid = bool(names) and None not in positions and positions == sorted(set(positions))
    if valid:
        assert align_stage_selection(names, None, stages)[0] == names
    else:
        with pytest.raises(ValueError):
            align_stage_selection(names, None, stages)


def test_backbone_output_access():
    a, b = torch.zeros(1), torch.ones(1)
    out = BackboneOutput(feature_maps=(a, b))
    assert out.feature_maps[1] is b and out[0][0] is a and out["feature_maps"][1] is b
    assert out.hidden_states is None and len(out) == 1 and out.keys() == ["feature_maps"]
    out = BackboneOutput(feature_maps=(a,), hidden_states=(a, b))
    assert out.to_tuple() == ((a,), (a, b))
    with pytest.raises(KeyError):
        out["attentions"]
