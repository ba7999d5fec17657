"""Coreset baselines: random, herding and k-center selection of real pairs."""

import pytest
import torch
import torch.nn.functional as F

from repblend_hf.coresets import CORESET_METHODS, pair_representations, select_coreset
from repblend_hf.features import FeatureSplit


def make_split(num_images=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 6, (num_images,), generator=g)
    c2i = torch.arange(num_images).repeat_interleave(counts)
    return FeatureSplit(torch.randn(num_images, 12, generator=g), torch.randn(c2i.numel(), 8, generator=g), c2i)


@pytest.mark.parametrize("method", sorted(CORESET_METHODS))
def test_selection_sizes_distinct_images_and_valid_pairs(method):
    split = make_split()
    selection = select_coreset(method, split, 10, seed=1)
    assert len(selection) == 10 and selection.method == method
    assert selection.image_indices.unique().numel() == 10
    assert torch.equal(split.caption_to_image[selection.caption_indices], selection.image_indices)
    image, text = selection.pairs(split)
    assert torch.equal(image, split.image_features[selection.image_indices])
    assert torch.equal(text, split.caption_features[selection.caption_indices])
    # all images can be selected
    assert select_coreset(method, split, split.num_images).image_indices.sort().values.tolist() == list(range(40))


@pytest.mark.parametrize("method", ["herding", "kcenter"])
def test_herding_and_kcenter_are_deterministic_and_take_first_captions(method):
    split = make_split()
    a, b = select_coreset(method, split, 8, seed=0), select_coreset(method, split, 8, seed=5)
    assert torch.equal(a.image_indices, b.image_indices) and torch.equal(a.caption_indices, b.caption_indices)
    first = split.caption_offsets()[:-1]
    assert torch.equal(a.caption_indices, first[a.image_indices])
    # a prefix of a longer selection (greedy)
    assert torch.equal(select_coreset(method, split, 12).image_indices[:8], a.image_indices)


def test_random_is_seeded():
    split = make_split()
    a, b, c = (select_coreset("random", split, 8, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.image_indices, b.image_indices) and torch.equal(a.caption_indices, b.caption_indices)
    assert not torch.equal(a.image_indices, c.image_indices)


def test_pair_representations_are_normalised_image_and_mean_caption():
    split = make_split()
    x = pair_representations(split)
    assert x.shape == (40, 20)
    i = 3
    captions = split.caption_features[split.caption_to_image == i]
    assert torch.allclose(x[i, :12], F.normalize(split.image_features[i], dim=0))
    assert torch.allclose(x[i, 12:], F.normalize(captions.mean(0), dim=0), atol=1e-6)


def test_herding_matches_a_brute_force_greedy_mean_match():
    split = make_split(num_images=15)
    x = pair_representations(split).double()
    mean, chosen = x.mean(0), []
    for _ in range(6):
        best = min((i for i in range(15) if i not in chosen),
                   key=lambda i: (x[chosen + [i]].mean(0) - mean).norm().item())
        chosen.append(best)
    assert select_coreset("herding", split, 6).image_indices.tolist() == chosen


def test_kcenter_matches_a_brute_force_farthest_point_traversal():
    split = make_split(num_images=15)
    x = pair_representations(split).double()
    chosen = [int((x - x.mean(0)).norm(dim=1).argmin())]
    for _ in range(5):
        dist = torch.cdist(x, x[chosen]).min(1).values
        dist[chosen] = -1
        chosen.append(int(dist.argmax()))
    assert select_coreset("kcenter", split, 6).image_indices.tolist() == chosen


def test_errors():
    split = make_split()
    with pytest.raises(ValueError, match=r"^unknown coreset method 'forgetting'; valid methods: 'random', 'herding', "
                                         r"'kcenter'$"):
        select_coreset("forgetting", split, 5)
    for bad in (0, -1, 41):
        with pytest.raises(ValueError, match=rf"^num_pairs must be between 1 and the number of images \(40\), "
                                             rf"got {bad}$"):
            select_coreset("random", split, bad)
    no_caption = FeatureSplit(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"1 image\(s\) have no caption \(first: image 1\)"):
        select_coreset("herding", no_caption, 2)
