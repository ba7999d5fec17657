"""The command line, inside the package (TRL's ``trl/scripts``): ``repblend-distill`` and ``repblend-evaluate``.

Each command is a module with a ``main(argv)`` that returns its results (for tests and benchmarks) and a ``cli()``
that the console script calls. Every way of starting one runs the same code::

    repblend-distill --max_steps 200                                   # the console script (setup.cfg)
    accelerate launch -m repblend_hf.commands.distill --max_steps 200  # several processes
    accelerate launch examples/distill.py --max_steps 200              # the example script on top
"""

__all__: list[str] = []  # the commands are the submodules distill and evaluate
