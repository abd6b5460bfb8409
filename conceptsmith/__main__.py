"""``python -m conceptsmith``: the same command line as the ``conceptsmith`` script, so that launchers that run
modules work, e.g. ``accelerate launch --multi_gpu --num_processes 2 -m conceptsmith bench shapes-smoke``."""

from conceptsmith.cli import main

if __name__ == "__main__":
    main()
