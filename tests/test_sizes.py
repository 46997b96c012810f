"""Image size parsing/validation and the training buckets."""

from __future__ import annotations

import pytest

from newbie_core.sampling.sizes import (TRAINING_BUCKETS, image_tokens, latent_shape, parse_size,
                                        preset_names, round_up_size, size_name, validate_size)

# spec §5.4, landscape half in generation order (the other 25 are the transposes)
SPEC_LANDSCAPE = [
    (2048, 512), (2000, 512), (1984, 512), (1984, 528), (1936, 528), (1920, 528), (1808, 576),
    (1792, 576), (1744, 592), (1728, 592), (1616, 640), (1600, 640), (1552, 656), (1488, 704),
    (1472, 704), (1424, 720), (1360, 768), (1344, 768), (1296, 784), (1232, 832), (1232, 848),
    (1216, 848), (1168, 896), (1152, 896), (1088, 960), (1024, 1024)]


def test_training_buckets_match_spec():
    assert len(TRAINING_BUCKETS) == 51 and len(set(TRAINING_BUCKETS)) == 51
    assert list(TRAINING_BUCKETS[:26]) == SPEC_LANDSCAPE
    assert set(TRAINING_BUCKETS[26:]) == {(h, w) for w, h in SPEC_LANDSCAPE[:-1]}
    for w, h in TRAINING_BUCKETS:
        assert w % 16 == 0 and h % 16 == 0 and (w // 16) * (h // 16) <= 4096
        assert max(w, h) / min(w, h) <= 4 and (w // 32) % 2 == 0 and (h // 32) % 2 == 0
    assert (1024, 1536) not in TRAINING_BUCKETS  # the ComfyUI template size is 6144 tokens


def test_preset_names_round_trip_through_parse_size():
    names = preset_names()
    assert names[0] == "1024x1024 (1:1)" and len(names) == 51
    assert "2048x512 (4:1)" in names and "512x2048 (1:4)" in names
    assert "2000x512 (3.91:1)" in names and "1152x896 (9:7)" in names
    assert {parse_size(n) for n in names} == set(TRAINING_BUCKETS)
    assert size_name(1024, 1536) == "1024x1536 (2:3)"


@pytest.mark.parametrize("text, wh", [
    ("1024x1536", (1024, 1536)), (" 896 X 1152 ", (896, 1152)),
    ("1024×1024", (1024, 1024)), ("832*1216 (13:19)", (832, 1216))])
def test_parse_size_is_width_first(text, wh):
    assert parse_size(text) == wh


@pytest.mark.parametrize("bad", ["1024", "1024x", "x1024", "1024x1536x2", "big"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size(bad)


def test_validate_size_message_names_nearest_sizes_and_round_up_option():
    assert validate_size(1024, 1536) == (1024, 1536)
    with pytest.raises(ValueError) as err:
        validate_size(1000, 1530)
    msg = str(err.value)
    assert "992x1520" in msg and "1008x1536" in msg and "--round-up" in msg and "round-up option" not in msg
    assert validate_size(1000, 1530, round_up=True) == (1008, 1536)
    assert round_up_size(1, 16) == (16, 16)
    for bad in [(0, 1024), (-16, 16), (1024.0, 1024), (True, 16)]:
        with pytest.raises(ValueError, match="positive integer"):
            validate_size(*bad)


def test_latent_shape_and_tokens():
    assert latent_shape(1024, 1536) == (16, 192, 128)
    assert image_tokens(1024, 1024) == 4096 and image_tokens(1024, 1536) == 6144
    with pytest.raises(ValueError):
        latent_shape(1020, 1024)
