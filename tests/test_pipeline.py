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
