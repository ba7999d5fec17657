"""Configs: RepBlendConfig as a Hub artefact, run arguments with method presets, every invalid value rejected.

PEFT ``tests/test_config.py`` style: one parametrised test over every check in each ``__post_init__``, each
with the message the user sees.
"""

import json
import re

import pytest
from transformers import AutoConfig, HfArgumentParser

from repblend_hf import __version__
from repblend_hf.configuration import METHODS, SIMILARITY_KINDS, RepBlendConfig
from repblend_hf.training_args import METHOD_PRESETS, DistillationArguments, ExpertTrainingArguments

PRESET_FIELDS = ("blend_beta", "matching", "distill_loss", "similarity", "meta_gradient")
# The released hyperparameters each preset carries (issue #11): outer lrs and the inner logit scale.
RELEASED_FIELDS = ("lr_img", "lr_txt", "lr_sim", "lr_lr", "inner_logit_scale")


def _ids(cases):
    return [",".join(f"{k}={v}" for k, v in kwargs.items()) for kwargs, _ in cases]

# ----- RepBlendConfig ------------------------------------------------------------------------------------

NON_DEFAULT = dict(
    image_encoder="nfnet_l0", text_encoder="bert-base-uncased", text_pooling="cls", image_size=224,
    image_dim=2304, text_dim=768, embed_dim=2304, num_pairs=499, temperature=0.05, similarity="lowrank",
    sim_rank=20, sim_alpha=1.5, method="lors", lr_img=0.37, lr_txt=0.012, source_dataset="flickr30k",
)


def test_repblend_config_round_trip(tmp_path):
    config = RepBlendConfig(**NON_DEFAULT)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "repblend"
    assert saved["temperature"] == 0.05  # a generation key in transformers, kept because it is a declared field
    assert saved["repblend_version"] == __version__

    loaded = RepBlendConfig.from_pretrained(tmp_path)
    auto = AutoConfig.from_pretrained(tmp_path)
    assert type(auto) is RepBlendConfig
    for cfg in (loaded, auto):
        for name, value in NON_DEFAULT.items():
            assert getattr(cfg, name) == value, name
        assert cfg.repblend_version == __version__
    drop = {"_name_or_path"}  # where it was loaded from; the only difference
    assert {k: v for k, v in loaded.to_dict().items() if k not in drop} == {
        k: v for k, v in config.to_dict().items() if k not in drop}


def test_repblend_config_defaults_and_version_stamp(tmp_path):
    config = RepBlendConfig()
    assert (config.method, config.similarity, config.num_pairs) == ("repblend", "lowrank", 99)
    assert config.temperature == 0.07
    assert (config.lr_img, config.lr_txt) == (0.1, 0.1)
    assert config.repblend_version == __version__
    # A config saved by another version keeps its own stamp on load.
    RepBlendConfig(repblend_version="0.0.1").save_pretrained(tmp_path)
    assert RepBlendConfig.from_pretrained(tmp_path).repblend_version == "0.0.1"


def test_config_json_of_an_earlier_version_with_lr_img_lr_txt_loads(tmp_path):
    """The learned inner lrs were saved as ``lr_img`` / ``lr_txt`` (the outer lrs' names in the arguments)."""
    saved = RepBlendConfig(num_pairs=6, sim_rank=2).to_dict()
    del saved["inner_lr_img"], saved["inner_lr_txt"]
    saved.update(lr_img=0.37, lr_txt=0.012)
    for name in ("method", "blend_beta", "distill_loss", "meta_gradient", "branch_normalization", "syn_steps",
                 "expert_epochs", "max_start_epoch", "iterations"):
        saved.pop(name, None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = RepBlendConfig.from_pretrained(tmp_path)
    assert (config.inner_lr_img, config.inner_lr_txt) == (0.37, 0.012)
    assert (config.lr_img, config.lr_txt) == (0.37, 0.012)  # the old names still read
    assert config.blend_beta is None and config.iterations is None  # nothing recorded how it was made
    config.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (again["inner_lr_img"], again["inner_lr_txt"]) == (0.37, 0.012) and "lr_img" not in again


@pytest.mark.parametrize("method, explicit", [("repblend", {}), ("repblend", {"blend_beta": 0.0}),
                                              ("lors", {}), ("mtt_vl", {})])
def test_config_records_how_the_set_was_made(tmp_path, method, explicit):
    args = DistillationArguments(output_dir=str(tmp_path), method=method, report_to="none", use_cpu=True,
                                 syn_steps=5, **explicit)
    config = RepBlendConfig(method=method).record_distillation(args, iterations=7)
    for name in ("method", "blend_beta", "distill_loss", "meta_gradient", "branch_normalization", "syn_steps",
                 "expert_epochs", "max_start_epoch"):
        assert getattr(config, name) == getattr(args, name), name
    assert config.iterations == 7 and config.syn_steps == 5
    assert config.blend_beta == (explicit.get("blend_beta", 1.0) if method == "repblend" else 0.0)
    config.save_pretrained(tmp_path / "set")
    saved = json.loads((tmp_path / "set" / "config.json").read_text())
    assert (saved["method"], saved["blend_beta"], saved["iterations"]) == (method, config.blend_beta, 7)


@pytest.mark.parametrize("name", ["./missing_dir", "outputs/run/synthetic_set"])
def test_config_from_pretrained_of_a_missing_folder_is_an_os_error_as_before(tmp_path, monkeypatch, name):
    """A path that is no folder and no repo id never reaches the dataset-repo lookup (nor the network)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="Repo id must"):
        RepBlendConfig.from_pretrained(name)


def test_config_from_pretrained_rejects_an_unknown_repo_type(tmp_path):
    with pytest.raises(ValueError, match=re.escape("repo_type must be None, 'model' or 'dataset', got 'space'")):
        RepBlendConfig.from_pretrained(tmp_path, repo_type="space")


def test_repblend_config_from_dict_and_auto_for_model():
    config = AutoConfig.for_model("repblend", num_pairs=9, sim_rank=3)
    assert isinstance(config, RepBlendConfig) and config.num_pairs == 9
    assert RepBlendConfig.from_dict(config.to_dict()).sim_rank == 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("similarity", SIMILARITY_KINDS)
def test_repblend_config_valid_kinds(method, similarity):
    config = RepBlendConfig(method=method, similarity=similarity)
    assert (config.method, config.similarity) == (method, similarity)


@pytest.mark.parametrize("kwargs", [
    dict(similarity="full", sim_rank=0),  # the rank only matters for a low-rank similarity
    dict(similarity="none", sim_rank=1000),
    dict(num_pairs=10, sim_rank=10),  # rank == N is allowed
    dict(num_pairs=1, sim_rank=1),
])
def test_repblend_config_valid_edges(kwargs):
    RepBlendConfig(**kwargs)


REPBLEND_CONFIG_INVALID = [
    (dict(method="dm"), f"method must be one of {METHODS}, got 'dm'"),
    (dict(similarity="diag"), f"similarity must be one of {SIMILARITY_KINDS}, got 'diag'"),
    (dict(text_pooling="max"), "text_pooling must be 'cls' or 'mean', got 'max'"),
    (dict(num_pairs=0), "num_pairs must be > 0, got 0"),
    (dict(num_pairs=-5), "num_pairs must be > 0, got -5"),
    (dict(image_size=0), "image_size must be > 0, got 0"),
    (dict(image_dim=0), "image_dim, text_dim, embed_dim must be > 0, got 0, 384, 512"),
    (dict(text_dim=-1), "image_dim, text_dim, embed_dim must be > 0, got 1280, -1, 512"),
    (dict(embed_dim=0), "image_dim, text_dim, embed_dim must be > 0, got 1280, 384, 0"),
    (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
    (dict(temperature=-0.07), "temperature must be > 0, got -0.07"),
    (dict(sim_rank=0), "sim_rank must be in 1..num_pairs (99) for a low-rank similarity, got 0; "
                       "use similarity='full' for a full-rank matrix"),
    (dict(num_pairs=5, sim_rank=6), "sim_rank must be in 1..num_pairs (5) for a low-rank similarity, got 6"),
    (dict(num_pairs=5), "sim_rank must be in 1..num_pairs (5) for a low-rank similarity, got 10"),  # default rank
    (dict(sim_alpha=0.0), "sim_alpha must be > 0, got 0.0"),
    (dict(inner_lr_img=0.0), "inner_lr_img and inner_lr_txt (the learned inner learning rates η) must be > 0, got "
                             "0.0, 0.1"),
    (dict(lr_txt=-1.0), "inner_lr_img and inner_lr_txt (the learned inner learning rates η) must be > 0, got 0.1, "
                        "-1.0"),  # the earlier name is an alias
    (dict(blend_beta=-1.0), "blend_beta must be >= 0, got -1.0"),
    (dict(matching="both"), "matching must be 'symmetric' or 'asymmetric', got 'both'"),
    (dict(asymmetric_image_head=True), "asymmetric_image_head=True describes an asymmetric student; set "
                                       "matching='asymmetric' or drop it"),
    (dict(matching="asymmetric", image_dim=1280, embed_dim=512),
     "matching='asymmetric' without an image head uses the image encoder's 1280-d feature as the image embedding, "
     "so the text head outputs that width: set embed_dim=1280 (got 512), or asymmetric_image_head=True"),
]


@pytest.mark.parametrize("kwargs, message", REPBLEND_CONFIG_INVALID, ids=_ids(REPBLEND_CONFIG_INVALID))
def test_repblend_config_invalid(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RepBlendConfig(**kwargs)


def test_repblend_config_invalid_on_load(tmp_path):
    """A hand-edited config.json goes through the same checks."""
    RepBlendConfig().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "temperature": 0}))
    with pytest.raises(ValueError, match=re.escape("temperature must be > 0, got 0")):
        AutoConfig.from_pretrained(tmp_path)


# ----- DistillationArguments -----------------------------------------------------------------------------

EXPECTED_PRESETS = {
    "repblend": (1.0, "symmetric", "wbce", "lowrank", "tesla"),
    "lors": (0.0, "asymmetric", "wbce", "lowrank", "tesla"),
    "mtt_vl": (0.0, "asymmetric", "infonce", "none", "unrolled"),
}


def test_presets_cover_the_methods():
    assert set(METHOD_PRESETS) == set(EXPECTED_PRESETS)
    assert set(METHOD_PRESETS) <= set(METHODS)  # every distilled set's method is a config method
    for preset in METHOD_PRESETS.values():
        assert set(preset) == set(PRESET_FIELDS) | set(RELEASED_FIELDS)


@pytest.mark.parametrize("method", sorted(EXPECTED_PRESETS))
def test_distillation_preset_fills_fields(tmp_path, method):
    args = DistillationArguments(output_dir=str(tmp_path), method=method)
    assert tuple(getattr(args, name) for name in PRESET_FIELDS) == EXPECTED_PRESETS[method]


@pytest.mark.parametrize("method, override, expected", [
    ("repblend", dict(blend_beta=0.0), dict(blend_beta=0.0, matching="symmetric")),  # "w/o blending" ablation
    ("repblend", dict(matching="asymmetric"), dict(blend_beta=1.0, matching="asymmetric")),  # "w/o symmetric"
    ("repblend", dict(blend_beta=0.5), dict(blend_beta=0.5)),
    ("lors", dict(blend_beta=1.0), dict(blend_beta=1.0, matching="asymmetric")),  # LoRS + blending
    ("lors", dict(matching="symmetric"), dict(blend_beta=0.0, matching="symmetric")),
    ("repblend", dict(meta_gradient="unrolled"), dict(meta_gradient="unrolled", distill_loss="wbce")),
    ("repblend", dict(similarity="full"), dict(similarity="full", meta_gradient="tesla")),
    ("mtt_vl", dict(distill_loss="wbce"), dict(distill_loss="wbce", similarity="none")),
])
def test_distillation_explicit_value_overrides_preset(tmp_path, method, override, expected):
    args = DistillationArguments(output_dir=str(tmp_path), method=method, **override)
    for name, value in expected.items():
        assert getattr(args, name) == value, name
    untouched = set(PRESET_FIELDS) - set(override)
    preset = dict(zip(PRESET_FIELDS, EXPECTED_PRESETS[method]))
    assert {name: getattr(args, name) for name in untouched} == {name: preset[name] for name in untouched}


# Outer lrs and inner logit scale when none is given (the released Flickr-100 commands of each method).
EXPECTED_RELEASED = {
    # lr_lr 1: the released 1e-2 on the raw η as a step on log η at η = 0.1 (1e-2 / 0.1²)
    "repblend": (100.0, 100.0, 10.0, 1.0, None),
    "lors": (100.0, 100.0, 10.0, 1.0, None),
    "mtt_vl": (1000.0, 1000.0, 10.0, 1.0, pytest.approx(2.6592600369)),  # ln(1/0.07), not 1/0.07
}


@pytest.mark.parametrize("method", sorted(EXPECTED_RELEASED))
def test_distillation_preset_fills_released_lrs(tmp_path, method):
    args = DistillationArguments(output_dir=str(tmp_path), method=method)
    assert tuple(getattr(args, name) for name in RELEASED_FIELDS) == EXPECTED_RELEASED[method]
    assert args.syn_momentum == 0.5 and args.asymmetric_image_head is False


@pytest.mark.parametrize("method", sorted(EXPECTED_RELEASED))
@pytest.mark.parametrize("explicit", [dict(lr_img=7.0), dict(lr_txt=3.0, lr_lr=1e-4), dict(lr_sim=100.0),
                                      dict(inner_logit_scale=1 / 0.07), dict(lr_img=100.0, lr_txt=1000.0)])
def test_distillation_explicit_lrs_win_over_preset(tmp_path, method, explicit):
    args = DistillationArguments(output_dir=str(tmp_path), method=method, **explicit)
    preset = dict(zip(RELEASED_FIELDS, EXPECTED_RELEASED[method]))
    assert {k: getattr(args, k) for k in RELEASED_FIELDS} == {**preset, **explicit}


def test_distillation_released_lrs_from_the_command_line(tmp_path):
    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--method", "mtt_vl",
                                                  "--lr_img", "5", "--inner_logit_scale", "14.285714"])
    assert (args.lr_img, args.lr_txt, args.lr_lr) == (5.0, 1000.0, 1.0)
    assert args.inner_logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--method", "lors",
                                                  "--asymmetric_image_head", "true"])
    assert args.asymmetric_image_head is True and args.lr_img == 100.0
    saved = json.loads(args.to_json_string())  # the resolved values are what is written next to the outputs
    assert (saved["lr_img"], saved["lr_sim"], saved["asymmetric_image_head"]) == (100.0, 10.0, True)


def test_distillation_defaults(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path))
    assert args.method == "repblend"
    assert (args.max_steps, args.max_grad_norm, args.per_device_train_batch_size) == (3000, 0.0, 1)
    assert args.lr_scheduler_type == "constant"
    assert args.remove_unused_columns is False and args.encoder_per_step is False
    assert args.save_total_limit == 2


DISTILLATION_INVALID = [
    (dict(method="dm"), "method must be one of ['lors', 'mtt_vl', 'repblend'], got 'dm'"),
    (dict(syn_steps=0), "syn_steps must be > 0, got 0"),
    (dict(expert_epochs=0), "expert_epochs must be > 0, got 0"),
    (dict(max_start_epoch=0), "max_start_epoch must be > 0, got 0"),
    (dict(mini_batch_size=1), "mini_batch_size must be > 1, got 1"),
    (dict(lr_img=0.0), "lr_img must be > 0, got 0.0"),
    (dict(lr_txt=-1.0), "lr_txt must be > 0, got -1.0"),
    (dict(lr_sim=0.0), "lr_sim must be > 0, got 0.0"),
    (dict(lr_lr=0.0), "lr_lr must be > 0, got 0.0"),
    (dict(lr_init=0.0), "lr_init must be > 0, got 0.0"),
    (dict(lr_min=0.0), "need 0 < lr_min <= lr_init <= lr_max, got 0.0, 0.1, 10.0"),
    (dict(lr_min=0.5), "need 0 < lr_min <= lr_init <= lr_max, got 0.5, 0.1, 10.0"),
    (dict(lr_max=0.05), "need 0 < lr_min <= lr_init <= lr_max, got 0.001, 0.1, 0.05"),
    (dict(lr_grad_clip=-1.0), "lr_grad_clip must be >= 0 (0 disables), got -1.0"),
    (dict(syn_momentum=1.0), "syn_momentum must be in [0, 1), got 1.0"),
    (dict(syn_momentum=-0.1), "syn_momentum must be in [0, 1), got -0.1"),
    (dict(blend_beta=-1.0), "blend_beta must be >= 0, got -1.0; use 0 to disable blending"),
    (dict(matching="both"), "matching must be 'symmetric' or 'asymmetric', got 'both'"),
    (dict(branch_normalization="sum"), "branch_normalization must be 'separate' or 'joint', got 'sum'"),
    (dict(meta_gradient="truncated"), "meta_gradient must be 'tesla' or 'unrolled', got 'truncated'"),
    (dict(distill_loss="mse"), "distill_loss must be 'wbce' or 'infonce', got 'mse'"),
    (dict(similarity="diag"), "similarity must be 'lowrank', 'full' or 'none', got 'diag'"),
    (dict(distill_loss="infonce"),  # with the repblend preset's lowrank similarity
     "distill_loss='infonce' uses identity targets; set similarity='none' (or distill_loss='wbce')"),
    (dict(method="mtt_vl", similarity="lowrank"),
     "distill_loss='infonce' uses identity targets; set similarity='none' (or distill_loss='wbce')"),
    (dict(encoder_chunk_size=-2), "encoder_chunk_size must be -1 (auto), 0 (one call) or > 0, got -2"),
    (dict(num_eval_seeds=0), "num_eval_seeds must be > 0, got 0"),
    (dict(inner_logit_scale=0.0), "inner_logit_scale must be > 0, got 0.0; leave it unset for 1/temperature"),
    (dict(asymmetric_image_head=True),  # the repblend preset is symmetric
     "asymmetric_image_head=True adds an image head to the asymmetric student's encoder; symmetric matching always "
     "trains both heads: drop asymmetric_image_head or set matching='asymmetric'"),
]



@pytest.mark.parametrize("kwargs, message", DISTILLATION_INVALID, ids=_ids(DISTILLATION_INVALID))
def test_distillation_invalid(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DistillationArguments(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(lr_grad_clip=0.0), dict(syn_momentum=0.0), dict(encoder_chunk_size=0), dict(encoder_chunk_size=-1),
    dict(mini_batch_size=2),
    dict(lr_min=0.1, lr_init=0.1, lr_max=0.1), dict(blend_beta=0.0),
])
def test_distillation_valid_edges(tmp_path, kwargs):
    DistillationArguments(output_dir=str(tmp_path), **kwargs)


def test_distillation_parser_bool_false_and_float(tmp_path):
    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--blend_beta", "0", "--matching", "symmetric", "--encoder_per_step", "False",
    ])
    assert args.blend_beta == 0.0 and isinstance(args.blend_beta, float)
    assert args.matching == "symmetric"
    assert args.encoder_per_step is False
    assert (args.distill_loss, args.similarity, args.meta_gradient) == ("wbce", "lowrank", "tesla")  # from preset

    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--encoder_per_step",
                                                  "--method", "lors"])
    assert args.encoder_per_step is True
    assert args.blend_beta == 0.0 and args.matching == "asymmetric"

    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--encoder_per_step", "True"])
    assert args.encoder_per_step is True


def test_distillation_parser_rejects_invalid(tmp_path):
    parser = HfArgumentParser(DistillationArguments)
    with pytest.raises(ValueError, match=re.escape("blend_beta must be >= 0, got -1.0")):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--blend_beta", "-1"])


def test_distillation_to_json_string(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), method="lors", blend_beta=1.0, syn_steps=4)
    saved = json.loads(args.to_json_string())
    assert saved["method"] == "lors" and saved["blend_beta"] == 1.0 and saved["syn_steps"] == 4
    assert saved["matching"] == "asymmetric"  # the resolved preset is what gets written next to the outputs
    assert saved["encoder_per_step"] is False
    # Written arguments re-parse to the same run (argument files next to outputs can be reloaded).
    (again,) = HfArgumentParser(DistillationArguments).parse_dict(
        {k: saved[k] for k in ("output_dir", "method", *PRESET_FIELDS, "syn_steps", "lr_img", "lr_min")})
    assert tuple(getattr(again, k) for k in PRESET_FIELDS) == tuple(saved[k] for k in PRESET_FIELDS)


# ----- ExpertTrainingArguments ---------------------------------------------------------------------------


def test_expert_defaults(tmp_path):
    args = ExpertTrainingArguments(output_dir=str(tmp_path))
    assert args.optim == "sgd"
    assert args.learning_rate == 0.1
    assert args.per_device_train_batch_size == 128
    assert args.num_train_epochs == 10
    assert args.max_grad_norm == 0.0
    assert args.weight_decay == 0.0 and not args.optim_args  # plain SGD: no weight decay, no momentum
    assert args.lr_scheduler_type == "constant"
    assert args.save_strategy == "no"
    assert args.report_to in ([], ["none"], "none")
    assert args.remove_unused_columns is False
    assert (args.num_experts, args.matching, args.embed_dim, args.temperature) == (8, "symmetric", 512, 0.07)


def test_expert_parser_and_json(tmp_path):
    (args,) = HfArgumentParser(ExpertTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--matching", "asymmetric", "--num_experts", "2", "--num_train_epochs", "3",
    ])
    assert (args.matching, args.num_experts, args.num_train_epochs) == ("asymmetric", 2, 3.0)
    assert json.loads(args.to_json_string())["num_experts"] == 2


EXPERT_INVALID = [
    (dict(num_experts=0), "num_experts must be > 0, got 0"),
    (dict(matching="both"), "matching must be 'symmetric' or 'asymmetric', got 'both'"),
    (dict(embed_dim=0), "embed_dim must be > 0, got 0"),
    (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
    (dict(num_train_epochs=0), "num_train_epochs must be a whole number >= 1 (snapshots are per epoch), got 0"),
    (dict(num_train_epochs=2.5), "num_train_epochs must be a whole number >= 1 (snapshots are per epoch), got 2.5"),
    (dict(asymmetric_image_head=True),
     "asymmetric_image_head=True adds an image head to the asymmetric experts' encoder; symmetric experts always "
     "train both heads: drop asymmetric_image_head or set matching='asymmetric'"),
]


@pytest.mark.parametrize("kwargs, message", EXPERT_INVALID, ids=_ids(EXPERT_INVALID))
def test_expert_invalid(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ExpertTrainingArguments(output_dir=str(tmp_path), **kwargs)
