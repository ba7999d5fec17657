"""Expert trajectories: safetensors round trip, lazy sampling, segment bounds, resumable writer."""

import json
import logging

import pytest
import torch
from safetensors import safe_open

from repblend_hf.trajectories import (
    TRAJECTORIES_FORMAT_VERSION,
    ExpertTrajectories,
    expert_filename,
)
from repblend_hf.trajectory_writer import TrajectoryWriter

T = 4
SIZES = {"image": 6, "text": 3}


def _metadata(**extra):
    return {"branch_sizes": dict(SIZES), "num_epochs": T, "image_encoder": "test_enc", "embed_dim": 8, **extra}


def _expert(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {b: torch.randn(T + 1, n, generator=g) for b, n in SIZES.items()}


def _trajectories(count: int = 3, **extra) -> ExpertTrajectories:
    traj = ExpertTrajectories(_metadata(**extra))
    for e in range(count):
        traj.add_expert(_expert(e))
    return traj


def test_save_load_round_trip_exact(tmp_path):
    traj = _trajectories()
    traj.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "expert_000.safetensors", "expert_001.safetensors", "expert_002.safetensors", "trajectories.json"]
    loaded = ExpertTrajectories.load(tmp_path)
    assert len(loaded) == 3 and loaded.num_epochs == T and loaded.branches == ("image", "text")
    assert loaded.branch_sizes == SIZES and loaded.metadata == traj.metadata
    for e in range(3):
        expected = _expert(e)
        got = loaded.expert_snapshots(e)
        assert set(got) == set(expected)
        for b in SIZES:
            assert torch.equal(got[b], expected[b])


def test_metadata_json_and_file_layout(tmp_path):
    _trajectories(1, dataset="fashion-scenes").save(tmp_path)
    meta = json.loads((tmp_path / "trajectories.json").read_text())
    assert meta["format_version"] == TRAJECTORIES_FORMAT_VERSION
    assert meta["branch_sizes"] == SIZES and meta["num_epochs"] == T
    assert meta["dataset"] == "fashion-scenes" and meta["embed_dim"] == 8
    with safe_open(str(tmp_path / expert_filename(0)), framework="pt") as f:
        assert sorted(f.keys()) == ["image", "text"]
        assert f.get_slice("image").get_shape() == [T + 1, 6]
        assert f.metadata()["num_epochs"] == str(T)


def test_lazy_snapshots_are_the_right_rows(tmp_path):
    _trajectories().save(tmp_path)
    loaded = ExpertTrajectories.load(tmp_path)
    for e, epoch in [(0, 0), (1, 3), (2, T)]:
        snap = loaded.snapshot(e, epoch)
        for b in SIZES:
            assert torch.equal(snap[b], _expert(e)[b][epoch])
    with pytest.raises(ValueError, match=r"outside the stored snapshots 0..4"):
        loaded.snapshot(0, T + 1)
    with pytest.raises(KeyError, match=r"no expert 7"):
        loaded.snapshot(7, 0)


@pytest.mark.parametrize("from_disk", [False, True])
def test_sample_segment_returns_matching_snapshots_within_bounds(tmp_path, from_disk):
    traj = _trajectories()
    if from_disk:
        traj.save(tmp_path)
        traj = ExpertTrajectories.load(tmp_path)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        seg = traj.sample_segment(expert_epochs=2, max_start_epoch=2, generator=g)
        assert seg.start_epoch in (0, 1) and seg.target_epoch == seg.start_epoch + 2
        for b in SIZES:
            assert torch.equal(seg.start_params[b], _expert(seg.expert_index)[b][seg.start_epoch])
            assert torch.equal(seg.target_params[b], _expert(seg.expert_index)[b][seg.target_epoch])
        seen.add((seg.expert_index, seg.start_epoch))
    assert seen == {(e, s) for e in range(3) for s in range(2)}


def test_a_copy_on_a_device_samples_the_same_segments_and_is_chosen_only_where_it_fits(tmp_path):
    traj = _trajectories()
    traj.save(tmp_path)
    lazy = ExpertTrajectories.load(tmp_path)
    assert lazy.nbytes == 3 * (T + 1) * (6 + 3) * 4
    held = lazy.to("cpu")  # every snapshot read into memory; the lazy original is unchanged
    assert held is not lazy and held.metadata == lazy.metadata and held.expert_indices == lazy.expert_indices
    for _ in range(5):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a, b = lazy.sample_segment(1, 3, generator=g1), held.sample_segment(1, 3, generator=g2)
        assert (a.expert_index, a.start_epoch) == (b.expert_index, b.start_epoch)
        assert all(torch.equal(a.start_params[k], b.start_params[k]) and
                   torch.equal(a.target_params[k], b.target_params[k]) for k in SIZES)
    # A copy can be saved again, wherever its tensors live.
    held.save(tmp_path / "again")
    assert torch.equal(ExpertTrajectories.load(tmp_path / "again").expert_snapshots(2)["image"], _expert(2)["image"])
    # The rule: a CPU keeps the lazy files; an accelerator gets a copy when all snapshots take at most a quarter of
    # its free memory ("meta" stands in for a GPU here: no data, the same decision).
    assert lazy.on_device_if_fits("cpu") is lazy
    assert lazy.on_device_if_fits("meta", free_bytes=4 * lazy.nbytes - 1) is lazy
    moved = lazy.on_device_if_fits("meta", free_bytes=4 * lazy.nbytes)
    assert moved is not lazy and all(t.device.type == "meta" for t in moved.expert_snapshots(0).values())


def test_sample_segment_reproducible_and_validated():
    traj = _trajectories()
    a = traj.sample_segment(1, 3, generator=torch.Generator().manual_seed(5))
    b = traj.sample_segment(1, 3, generator=torch.Generator().manual_seed(5))
    assert (a.expert_index, a.start_epoch) == (b.expert_index, b.start_epoch)
    # The largest valid setting: start up to T - expert_epochs.
    traj.sample_segment(expert_epochs=2, max_start_epoch=T - 1)
    with pytest.raises(ValueError, match=r"lower max_start_epoch or expert_epochs .* <= 4"):
        traj.sample_segment(expert_epochs=2, max_start_epoch=T)
    with pytest.raises(ValueError, match="expert_epochs must be an int >= 1, got 0"):
        traj.sample_segment(expert_epochs=0, max_start_epoch=1)
    with pytest.raises(ValueError, match="hold no expert"):
        ExpertTrajectories(_metadata()).sample_segment(1, 1)


def test_writer_is_resumable_and_incomplete_expert_leaves_no_file(tmp_path):
    writer = TrajectoryWriter(tmp_path, _metadata(num_experts=3))
    for epoch in range(T + 1):
        path = writer.record(0, epoch, {b: t[epoch] for b, t in _expert(0).items()})
        assert (path is None) == (epoch < T)
    for epoch in range(2):  # expert 1 is "killed" after two snapshots
        writer.record(1, epoch, {b: t[epoch] for b, t in _expert(1).items()})
    assert writer.pending == {1: 2}
    assert ExpertTrajectories.completed_experts(tmp_path) == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert_000.safetensors", "trajectories.json"]
    del writer

    resumed = TrajectoryWriter(tmp_path, _metadata(num_experts=3))
    assert resumed.completed == [0]
    with pytest.raises(ValueError, match="already complete"):
        resumed.record(0, 0, {b: t[0] for b, t in _expert(0).items()})
    for e in (1, 2):
        for epoch in range(T + 1):
            resumed.record(e, epoch, {b: t[epoch] for b, t in _expert(e).items()})
    loaded = ExpertTrajectories.load(tmp_path)
    assert loaded.expert_indices == [0, 1, 2]
    for e in range(3):
        for b in SIZES:
            assert torch.equal(loaded.expert_snapshots(e)[b], _expert(e)[b])


def test_writer_validation(tmp_path):
    writer = TrajectoryWriter(tmp_path, _metadata())
    snap = {b: t[0] for b, t in _expert(0).items()}
    with pytest.raises(ValueError, match="got epoch 1 but expected epoch 0"):
        writer.record(0, 1, snap)
    with pytest.raises(ValueError, match=r"branches \['image'\]"):
        writer.record(0, 0, {"image": snap["image"]})
    with pytest.raises(ValueError, match="flat vector of 3 parameters"):
        writer.record(0, 0, {"image": snap["image"], "text": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"other settings \(embed_dim: 8 there, 16 now\)"):
        TrajectoryWriter(tmp_path, _metadata(embed_dim=16))
    # num_experts may change when resuming to add experts
    TrajectoryWriter(tmp_path, _metadata(num_experts=10))


def test_experts_of_the_old_epoch_definition_are_refused_with_the_reason(tmp_path):
    # Trajectories written before an epoch meant one pass over the (image, caption) pairs have no
    # epoch_definition; reusing them would match segments ~5x shorter than the settings say.
    TrajectoryWriter(tmp_path, _metadata())
    with pytest.raises(ValueError, match=r"old epoch definition.*Delete that directory"):
        TrajectoryWriter(tmp_path, _metadata(epoch_definition="caption_pairs"))


def test_load_warns_about_missing_experts_and_rejects_foreign_files(tmp_path, caplog):
    _trajectories(2, num_experts=4).save(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert len(ExpertTrajectories.load(tmp_path)) == 2
    assert "2 of the 4 planned experts" in caplog.text
    other = ExpertTrajectories({"branch_sizes": {"image": 5, "text": 3}, "num_epochs": T})
    other.add_expert({"image": torch.zeros(T + 1, 5), "text": torch.zeros(T + 1, 3)}, expert_index=7)
    other.save(tmp_path / "other")
    (tmp_path / "other" / expert_filename(7)).rename(tmp_path / expert_filename(7))
    with pytest.raises(ValueError, match="belongs to other trajectories"):
        ExpertTrajectories.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an expert trajectories directory"):
        ExpertTrajectories.load(tmp_path / "missing")


def test_check_compatible_messages():
    traj = _trajectories(1)
    traj.check_compatible({"image": 6, "text": 3})
    with pytest.raises(ValueError, match=r"branch 'image' of the expert trajectories has 6 parameters but the "
                                         r"model's has 7: .*another encoder or embed_dim .*image_encoder='test_enc'"):
        traj.check_compatible({"image": 7, "text": 3})
    with pytest.raises(ValueError, match=r"store branches \['image', 'text'\] but the model matches "
                                         r"\['image_encoder', 'text'\]"):
        traj.check_compatible({"image_encoder": 6, "text": 3})


def test_branch_names_are_free_and_shapes_checked():
    traj = ExpertTrajectories({"branch_sizes": {"image_encoder": 4, "text": 2}, "num_epochs": 1})
    idx = traj.add_expert({"image_encoder": torch.zeros(2, 4), "text": torch.ones(2, 2)})
    assert idx == 0 and traj.branches == ("image_encoder", "text")
    with pytest.raises(ValueError, match=r"shape \(3, 4\) but num_epochs=1"):
        traj.add_expert({"image_encoder": torch.zeros(3, 4), "text": torch.ones(2, 2)})


@pytest.mark.parametrize(
    "metadata, match",
    [
        ({"num_epochs": 2}, "needs 'branch_sizes'"),
        ({"branch_sizes": {"image": 0}, "num_epochs": 2}, "needs 'branch_sizes'"),
        ({"branch_sizes": {"image": 3}}, "needs 'num_epochs'"),
        ({"branch_sizes": {"image": 3}, "num_epochs": 2, "path": object()}, "must be JSON-serialisable"),
        ({"branch_sizes": {"image": 3}, "num_epochs": 2, "format_version": 99}, "upgrade repblend_hf"),
    ],
)
def test_invalid_metadata(metadata, match):
    with pytest.raises(ValueError, match=match):
        ExpertTrajectories(metadata)
