"""Shared script plumbing (repblend_hf.pipeline): checkpoint discovery, config files, result records."""

import json

import pytest
from transformers import HfArgumentParser

from repblend_hf.pipeline import DataArguments, last_complete_checkpoint, parse_with_config


def _checkpoint(root, step, state=True, truncated=False):
    import torch
    from safetensors.torch import save_file

    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    save_file({"pixel_values": torch.zeros(2)}, str(folder / "model.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.pt")
    if state:
        text = json.dumps({"global_step": step})
        (folder / "trainer_state.json").write_text(text[:5] if truncated else text)


def test_last_complete_checkpoint_skips_a_half_written_one(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    assert last_complete_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, state=False)  # killed before trainer_state.json was written
    _checkpoint(tmp_path, 14, truncated=True)  # killed while writing it
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    # A checkpoint whose files are truncated is skipped too (the resume would fail half-way through).
    _checkpoint(tmp_path, 16)
    optimizer = tmp_path / "checkpoint-16" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-20])
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_config_file_sits_under_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: some/dataset\nimage_size: 96\nnum_views: 0\npretrained_image_encoder: false\n")
    parser = HfArgumentParser(DataArguments)
    (args,) = parse_with_config(parser, ["--config", str(config), "--image_size", "128"])
    assert (args.dataset, args.image_size, args.num_views, args.pretrained_image_encoder) == (
        "some/dataset", 128, 0, False)
    (default,) = parse_with_config(parser, [], default_config=config)
    assert default.image_size == 96
    (none,) = parse_with_config(parser, ["--config", "none"], default_config=config)
    assert none.image_size == DataArguments().image_size
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_with_config(parser, ["--config", str(tmp_path / "absent.yaml")])


def _record(method, protocol, r_mean, **settings):
    metrics = {k: {"mean": r_mean, "std": 0.0} for k in ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")}
    return {"dataset": "d", "method": method, "pairs": 99, "protocol": protocol, "seeds": 1, "validation": metrics,
            "test": metrics, "test_selected_on_test": metrics, "diagnostics": {}, "settings": {"protocol": protocol,
                                                                                              **settings}}


def test_an_asymmetric_set_is_recorded_under_both_protocols():
    from repblend_hf.evaluation import EvaluationResult, SeedResult
    from repblend_hf.pipeline import format_table, own_protocol_record

    metrics = {k: 30.0 for k in ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")}
    seed = SeedResult(0, 4, metrics, metrics, {"gap": 0.1}, 4, metrics, [], [1.0])
    own = EvaluationResult([seed], {"protocol": "finetune_encoder", "loss": "wbce"})
    shared = {**_record("lors", "frozen_encoder", 5.0, synthetic_space="pixels", matching="asymmetric",
                        asymmetric_image_head=False, inner_logit_scale=None, use_augmented_views=True),
              "set_diagnostics": {"gap": 0.5}}
    record = own_protocol_record(shared, own)
    assert record["protocol"] == "finetune_encoder" and record["test"]["r_mean"]["mean"] == 30.0
    assert record["shared_protocol"] is shared and record["set_diagnostics"] == {"gap": 0.5}
    # The run's settings are copied; the other protocol's own settings are not.
    assert {k: record["settings"][k] for k in ("synthetic_space", "matching", "asymmetric_image_head")} == {
        "synthetic_space": "pixels", "matching": "asymmetric", "asymmetric_image_head": False}
    assert "use_augmented_views" not in record["settings"] and record["settings"]["loss"] == "wbce"
    json.dumps(record)  # results.json stays plain JSON
    table = format_table([record, {**_record("random", "frozen_encoder", 4.0), "seeds": 3}]).splitlines()
    assert len(table) == 2 + 3
    assert table[2].startswith("| lors (own protocol: fine-tuned encoder) | 99 | 30.0 | 30.0 |")  # one seed: no ±
    assert table[3].startswith("| lors (shared protocol: frozen encoder) | 99 | 5.0 | 5.0 |")
    assert table[4].startswith("| random | 99 | 4.0 ± 0.0 | 4.0 ± 0.0 |")  # a symmetric / baseline row is unchanged


def test_reference_heads_from_the_full_baseline_equal_their_own_training(tmp_path):
    """repblend-distill takes the reference model from the full-data baseline's seed 0: the same heads."""
    import torch

    from repblend_hf.features import FeatureSplit
    from repblend_hf.pipeline import evaluate_baseline, reference_diagnostics

    g = torch.Generator().manual_seed(0)

    def split(images, views=0):
        c2i = torch.arange(images).repeat_interleave(2)
        augmented = torch.randn(images, views, 12, generator=g) if views else None
        return FeatureSplit(torch.randn(images, 12, generator=g), torch.randn(2 * images, 8, generator=g), c2i,
                            augmented)

    features = {"train": split(60, views=2), "validation": split(10), "test": split(10)}
    finals = {}
    evaluate_baseline("full", features, features["train"].num_images, embed_dim=8, seeds=[0, 1],
                      on_trained=lambda seed, trained: finals.setdefault(seed, trained.final_state))
    assert set(finals) == {0, 1}
    own = reference_diagnostics(features, 4, embed_dim=8)
    reused = reference_diagnostics(features, 4, embed_dim=8, cache_dir=tmp_path, trained_state=finals[0])
    for (name, a), (_, b) in zip(own.heads.state_dict().items(), reused.heads.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert reused.real_subset == own.real_subset
    assert (tmp_path / "reference_heads.safetensors").is_file()  # the reused heads are cached like trained ones
    cached = reference_diagnostics(features, 4, embed_dim=8, cache_dir=tmp_path)
    torch.testing.assert_close(cached.heads.text_head.fc.weight, own.heads.text_head.fc.weight)
    assert not torch.equal(finals[0]["text_head.fc.weight"], finals[1]["text_head.fc.weight"])


def test_reference_heads_are_shared_between_runs_through_the_shared_cache(tmp_path, monkeypatch):
    """A run that skips the full-data baseline takes the reference heads another run trained (shared cache)."""
    import torch

    from repblend_hf import pipeline
    from repblend_hf.features import FeatureSplit

    g = torch.Generator().manual_seed(0)

    def split(images):
        return FeatureSplit(torch.randn(images, 12, generator=g), torch.randn(2 * images, 8, generator=g),
                            torch.arange(images).repeat_interleave(2))

    features = {"train": split(40), "validation": split(10), "test": split(10)}
    shared = tmp_path / "shared"
    first = pipeline.reference_diagnostics(features, 4, embed_dim=8, cache_dir=tmp_path / "run1",
                                           shared_cache_dir=shared)
    assert len(list(shared.glob("reference_heads-*-d8-s0.safetensors"))) == 1
    assert not list(shared.glob(".*tmp"))  # written through a temporary file, renamed
    trained = []
    real_train_heads = pipeline.train_heads
    monkeypatch.setattr(pipeline, "train_heads", lambda *a, **k: trained.append(1) or real_train_heads(*a, **k))
    second = pipeline.reference_diagnostics(features, 4, embed_dim=8, cache_dir=tmp_path / "run2",
                                            shared_cache_dir=shared)
    assert not trained  # loaded, not trained again
    torch.testing.assert_close(second.heads.text_head.fc.weight, first.heads.text_head.fc.weight)
    assert (tmp_path / "run2" / "reference_heads.safetensors").is_file()  # and kept with the run too
    pipeline.reference_diagnostics(features, 4, embed_dim=16, cache_dir=tmp_path / "run3", shared_cache_dir=shared)
    assert trained  # another width is other heads
    assert len(list(shared.glob("reference_heads-*.safetensors"))) == 2
