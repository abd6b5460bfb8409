"""``python -m conceptsmith.cli``: what the ``conceptsmith`` console script runs."""

from conceptsmith.cli import main

if __name__ == "__main__":
    main()
