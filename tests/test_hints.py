"""Error hints that send a newcomer the right way: did-you-mean prefers the keys of the section the
user is in, a model size given as --preset points to model.preset, missing default data says how
to build it."""

import pytest

from configs import ConfigError, resolve_config


@pytest.mark.parametrize("overrides,hint", [
    ({"ranks": 8}, "(did you mean optimizer.rank?)"),  # an optimizer key, not the section `train`
    ({"betta": 0.9}, "(did you mean optimizer.beta?)"),
    ({"trian": {"steps": 3}}, "(did you mean train.steps? train is a section)"),  # a mapping: a section
    ({"trainn": 3}, "(did you mean train? train is a section)"),
    ({"train": {"stpes": 3}}, "(did you mean train.steps?)"),
    ({"model": {"n_layers": 2}}, "(did you mean model.n_layer?)"),
])
def test_did_you_mean_prefers_the_section_the_key_is_in(overrides, hint):
    with pytest.raises(ConfigError) as caught:
        resolve_config("mfsgd", overrides)
    assert hint in str(caught.value)


def test_a_model_size_given_as_preset_points_to_model_preset():
    with pytest.raises(ConfigError) as caught:
        resolve_config("mfsgd", {}, preset="cpu-tiny")
    assert str(caught.value).endswith("""cpu-tiny is a model size: --config '{"model": {"preset": "cpu-tiny"}}'""")
    with pytest.raises(ConfigError) as caught:
        resolve_config("mfsgd", {}, preset="nonsense")
    assert "model size" not in str(caught.value)


@pytest.mark.parametrize("pattern,hint", [
    ("data/shakespeare/train_*.bin", "build the embedded default corpus with `make data`"),
    ("data/fineweb10B/fineweb_train_*.bin", "python -m data.fineweb download --num-shards 8"),
    ("/elsewhere/*.bin", None),
])
def test_missing_shards_say_how_to_get_the_project_s_corpora(tmp_path, pattern, hint):
    from data.shards import ShardError, find_shards

    with pytest.raises(ShardError) as caught:
        find_shards(str(tmp_path / pattern.lstrip("/")))
    message = str(caught.value)
    assert message.startswith("no shards match") and "\n" not in message
    assert (hint in message) if hint else message.endswith(".bin")


def test_a_nested_optimizer_mapping_given_in_part_warns_that_the_paper_harness_differs():
    """The paper harness merges --config shallowly: {"group_params": {"rank": 16}} replaces GaLore's
    whole group_params there, so the same command would train another run; a full mapping does not warn."""
    from configs import partial_nested_overrides

    (line,) = partial_nested_overrides("galore", {"group_params": {"rank": 16}})
    assert "\n" not in line and "proj_type \"std\", scale 0.25, update_proj_gap 75" in line
    assert "update_proj_gap 200" in line and "Give every group_params key" in line
    assert partial_nested_overrides("galore", {"optimizer": {"group_params": {"rank": 8}}}) == [line]  # as a section
    full = {"rank": 16, "update_proj_gap": 150, "scale": 0.25, "proj_type": "std"}
    assert partial_nested_overrides("galore", {"lr": 0.008, "group_params": full}) == []
    assert partial_nested_overrides("mfsgd", {"rank": 16, "lr": 0.0009}) == []
