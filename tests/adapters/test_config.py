"""MSPLoRAConfig validation, mid-group splitting and the parameter-count formula (no model needed)."""

from __future__ import annotations

import itertools
import math

import pytest

from msplora_dist import ALL_LINEAR_TARGETS, ConfigError, MSPLoRAConfig, count_params, mid_groups
from msplora_dist.adapters.config import validate_groups

# ---------------------------------------------------------------- groups


def test_groups_are_contiguous_and_balanced_for_every_G_up_to_40_layers():
    for num_layers in range(1, 41):
        for num_groups in range(1, num_layers + 1):
            groups = mid_groups(num_layers, num_groups)
            assert len(groups) == num_groups
            assert groups[0][0] == 0 and groups[-1][1] == num_layers
            for (_, end), (start, _) in itertools.pairwise(groups):
                assert end == start, (num_layers, num_groups, groups)
            sizes = [e - s for s, e in groups]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, (num_layers, num_groups, sizes)
            assert sizes == sorted(sizes, reverse=True), "larger groups first"
            validate_groups(groups, num_layers)  # the validator accepts what the splitter makes


def test_groups_32_layers_3_groups_are_11_11_10_not_the_paper_code_fractional_split():
    assert mid_groups(32, 3) == ((0, 11), (11, 22), (22, 32))


def test_groups_G1_is_one_global_group_and_G_equal_L_is_one_layer_per_group():
    assert mid_groups(7, 1) == ((0, 7),)
    assert mid_groups(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))


@pytest.mark.parametrize("num_groups", [0, 6])
def test_more_groups_than_layers_or_zero_groups_raise_config_error_naming_the_value(num_groups):
    with pytest.raises(ConfigError, match=f"num_mid_groups={num_groups}.*5 decoder layers"):
        mid_groups(5, num_groups)
    config = MSPLoRAConfig(ranks=(2, 2, 2), num_mid_groups=6)
    with pytest.raises(ConfigError, match="num_mid_groups=6"):
        config.with_groups(5)


@pytest.mark.parametrize("groups", [((0, 2), (3, 5)), ((0, 3), (2, 5)), ((0, 0), (0, 5)), ((1, 3), (3, 5))])
def test_explicit_groups_that_do_not_tile_the_layers_raise_config_error(groups):
    with pytest.raises(ConfigError, match="groups="):
        MSPLoRAConfig(ranks=(2, 2, 2), num_mid_groups=2, groups=groups)


def test_explicit_groups_must_cover_exactly_the_model_layers():
    config = MSPLoRAConfig(ranks=(2, 2, 2), num_mid_groups=2, groups=((0, 2), (2, 4)))
    assert config.with_groups(4).groups == ((0, 2), (2, 4))
    with pytest.raises(ConfigError, match="cover 4 layers; the model has 5"):
        config.with_groups(5)


def test_explicit_groups_count_must_equal_num_mid_groups():
    with pytest.raises(ConfigError, match="num_mid_groups=3"):
        MSPLoRAConfig(ranks=(2, 2, 2), num_mid_groups=3, groups=((0, 2), (2, 4)))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("ranks, level", [((-1, 2, 2), "global"), ((2, -3, 2), "mid"), ((2, 2, -1), "layer")])
def test_negative_rank_raises_config_error_naming_level_and_value(ranks, level):
    with pytest.raises(ConfigError, match=rf"the {level} rank is -\d"):
        MSPLoRAConfig(ranks=ranks)


def test_all_ranks_zero_raises_config_error():
    with pytest.raises(ConfigError, match=r"ranks=\[0, 0, 0\].*switched off"):
        MSPLoRAConfig(ranks=(0, 0, 0))
    with pytest.raises(ConfigError, match=r"ranks=\[0, 0, 0\]"):
        MSPLoRAConfig(ranks=0)


@pytest.mark.parametrize("ranks", [(64, 32), (1, 2, 3, 4), "abc", (8, 4.5, 2), (8, True, 2), (8, None, 2)])
def test_malformed_or_non_integer_ranks_raise_config_error(ranks):
    with pytest.raises(ConfigError, match="ranks="):
        MSPLoRAConfig(ranks=ranks)


def test_integral_rank_values_are_accepted_from_floats_and_strings():
    assert MSPLoRAConfig(ranks=(8.0, "4", 2)).ranks == (8, 4, 2)


@pytest.mark.parametrize("alphas, bad", [((16, 0, 16), "0.0"), ((-1, 16, 16), "-1.0"), ((16, 16, math.nan), "nan"),
                                         ((16, math.inf, 16), "inf"), ((16, "x", 16), "x")])
def test_bad_alphas_raise_config_error_naming_the_value(alphas, bad):
    with pytest.raises(ConfigError, match=rf"alphas=.*{bad}"):
        MSPLoRAConfig(ranks=(4, 4, 4), alphas=alphas)


def test_alpha_of_a_switched_off_level_is_not_checked():
    MSPLoRAConfig(ranks=(0, 0, 4), alphas=(0, 0, 8))


@pytest.mark.parametrize("dropout, bad", [(1.0, "1.0"), (-0.1, "-0.1"), ((0.0, 0.0, 1.5), "1.5"), ((0.1, math.nan, 0.1), "nan")])
def test_bad_dropout_raises_config_error_naming_the_value(dropout, bad):
    with pytest.raises(ConfigError, match=rf"dropout=.*{bad}.*expected 0 <= p < 1"):
        MSPLoRAConfig(dropout=dropout)


def test_repeated_target_modules_raise_config_error():
    with pytest.raises(ConfigError, match=r"target_modules=\['q_proj', 'v_proj', 'q_proj'\].*repeated"):
        MSPLoRAConfig(target_modules=("q_proj", "v_proj", "q_proj"))


def test_empty_target_modules_raise_config_error():
    with pytest.raises(ConfigError, match="target_modules is empty"):
        MSPLoRAConfig(target_modules=())
    with pytest.raises(ConfigError, match="target_modules is empty"):
        MSPLoRAConfig(target_modules=" , ")


def test_comma_separated_target_string_is_split():
    assert MSPLoRAConfig(target_modules="q_proj, v_proj").target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("num_groups", [0, -1, 2.0, True, "3"])
def test_num_mid_groups_must_be_a_positive_integer(num_groups):
    with pytest.raises(ConfigError, match="num_mid_groups="):
        MSPLoRAConfig(num_mid_groups=num_groups)


def test_scalar_values_apply_to_every_level():
    config = MSPLoRAConfig(ranks=8, alphas=4, dropout=0.1)
    assert config.ranks == (8, 8, 8) and config.alphas == (4.0, 4.0, 4.0) and config.dropout == (0.1, 0.1, 0.1)


# ---------------------------------------------------------------- scales and serialisation


def test_scale_is_alpha_over_r_and_alpha_over_sqrt_r_with_rslora():
    plain = MSPLoRAConfig(ranks=(64, 16, 4), alphas=(16, 8, 2))
    assert [plain.scale(i) for i in range(3)] == [16 / 64, 8 / 16, 2 / 4]
    rs = MSPLoRAConfig(ranks=(64, 16, 4), alphas=(16, 8, 2), use_rslora=True)
    assert [rs.scale(i) for i in range(3)] == [16 / 8, 8 / 4, 2 / 2]
    assert MSPLoRAConfig(ranks=(0, 0, 4)).scale(0) == 0.0


def test_config_dict_round_trip_keeps_every_field():
    config = MSPLoRAConfig(ranks=(4, 0, 2), alphas=(8, 1, 3), num_mid_groups=2, target_modules=("v_proj", "q_proj"),
                           dropout=(0.1, 0.0, 0.2), use_rslora=True).with_groups(5)
    d = config.to_dict()
    assert d["groups"] == [[0, 3], [3, 5]] and d["ranks"] == [4, 0, 2]
    assert MSPLoRAConfig(**d) == config


def test_paper_preset_is_the_llama2_7b_setting():
    config = MSPLoRAConfig.paper()
    assert config.ranks == (64, 32, 16) and config.alphas == (16.0, 16.0, 16.0)
    assert config.num_mid_groups == 3 and config.target_modules == ("q_proj", "v_proj") and config.dropout == (0.05,) * 3
    assert MSPLoRAConfig().target_modules == ALL_LINEAR_TARGETS


# ---------------------------------------------------------------- parameter counts


def test_paper_llama2_7b_count_is_11_0M_against_33_6M_for_lora_r64():
    features = {"q_proj": (4096, 4096), "v_proj": (4096, 4096)}
    report = count_params(MSPLoRAConfig.paper(), 32, features)
    assert report.total == 2 * 8192 * (64 + 3 * 32 + 32 * 16) == 11_010_048
    assert round(report.total / 1e6, 1) == 11.0
    assert report.lora_max_rank_r == 64
    assert report.lora_max_rank == 2 * 8192 * 64 * 32 == 33_554_432
    assert round(report.lora_max_rank / 1e6, 1) == 33.6
    assert report.lora_same_rank_r == 112 and report.lora_same_rank == 2 * 8192 * 112 * 32
    assert report.per_level == {"global": 2 * 8192 * 64, "mid": 2 * 8192 * 3 * 32, "layer": 2 * 8192 * 32 * 16}
    assert "11,010,048" in str(report)


@pytest.mark.parametrize("ranks, num_layers, num_groups", [((8, 4, 2), 12, 3), ((0, 3, 1), 5, 2), ((5, 0, 0), 7, 7), ((1, 2, 3), 40, 40)])
def test_count_params_equals_sum_over_targets_of_in_plus_out_times_weighted_ranks(ranks, num_layers, num_groups):
    features = {"q_proj": (64, 64), "k_proj": (64, 16), "down_proj": (172, 64)}
    config = MSPLoRAConfig(ranks=ranks, num_mid_groups=num_groups, target_modules=tuple(features))
    r_g, r_m, r_l = ranks
    expected = sum((i + o) * (r_g + num_groups * r_m + num_layers * r_l) for i, o in features.values())
    report = count_params(config, num_layers, features)
    assert report.total == expected
    for t, (i, o) in features.items():
        assert report.per_target[t] == {"global": (i + o) * r_g, "mid": (i + o) * num_groups * r_m, "layer": (i + o) * num_layers * r_l}


@pytest.mark.parametrize("targets", [5, ["q_proj", 3]])
def test_target_modules_that_are_not_names_raise_config_error(targets):
    with pytest.raises(ConfigError, match=r"target_modules=.*expected module names"):
        MSPLoRAConfig(target_modules=targets)


@pytest.mark.parametrize("groups", [[[0, "x"]], [[0, 1, 2]], [5]])
def test_malformed_explicit_groups_raise_config_error_naming_them(groups):
    with pytest.raises(ConfigError, match=r"groups=.*expected a list of \[start, end\) layer ranges"):
        MSPLoRAConfig(num_mid_groups=1, groups=groups)


def test_a_switched_off_mid_level_does_not_need_as_many_layers_as_groups():
    cfg = MSPLoRAConfig(ranks=(4, 0, 2), num_mid_groups=3).with_groups(2)
    assert cfg.groups == ((0, 1), (1, 2)) and cfg.num_mid_groups == 2
    with pytest.raises(ConfigError, match="num_mid_groups=3"):  # with the mid level on, it does
        MSPLoRAConfig(ranks=(4, 1, 2), num_mid_groups=3).with_groups(2)
