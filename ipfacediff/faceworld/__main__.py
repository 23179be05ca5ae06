"""Deprecated: ``python -m ipfacediff.faceworld ...`` is ``python -m faceworld ...``."""

from faceworld.cli import main

if __name__ == "__main__":
    main(prog_name="python -m ipfacediff.faceworld")
