"""Build a generated split once with ``Dataset.from_generator`` and reuse it from the ``datasets`` cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import datasets


def build_cached_split(
    generator: Callable[..., Iterator[dict]],
    gen_kwargs: dict,
    features: datasets.Features,
    cache_dir: str | None,
    split: str,
) -> datasets.Dataset:
    """Build one split with ``Dataset.from_generator`` once, then reuse it from the datasets cache.

    ``generator`` must be a module-level function (hashed by reference) and ``gen_kwargs`` must
    carry a version string. Our own FileNotFoundError / ValueError raised while generating (missing
    Fashion-MNIST, missing image file) come out as they are, not wrapped in datasets' generic
    DatasetGenerationError.
    """
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, gen_kwargs=gen_kwargs, cache_dir=cache_dir, split=datasets.NamedSplit(split)
        )
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, (FileNotFoundError, ValueError)):
            raise err.__cause__ from None
        raise
