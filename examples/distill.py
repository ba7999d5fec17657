"""Distil an image-text dataset into a few synthetic pairs with RepBlend (or LoRS / MTT-VL).

    accelerate launch examples/distill.py                                   # embedded default, offline
    accelerate launch examples/distill.py --config examples/configs/flickr30k_100.yaml
    accelerate launch examples/distill.py --max_steps 200 --output_dir outputs/quick
    accelerate launch examples/distill.py --resume_from_checkpoint latest   # after an interruption
    accelerate launch examples/distill.py --hub_dataset_id you/fashion-scenes-repblend-99

The same command as the installed ``repblend-distill`` (``repblend_hf/commands/distill.py``, where the stages,
the arguments and the outputs are described; ``--help`` lists every argument). A ``--config`` YAML sits under the
command line; with none, the embedded default's ``examples/configs/fashion_scenes_99.yaml`` is used. For the
stages as library calls, read :func:`repblend_hf.commands.distill.distill`.
"""

from repblend_hf.commands.distill import SetArguments, distill, main

__all__ = ["SetArguments", "distill", "main"]  # what earlier code imported from this script

if __name__ == "__main__":
    main()
