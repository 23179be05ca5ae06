"""``python -m faceworld ...``: the ``ipfacediff faceworld`` commands under that name.

python -m faceworld render sheet [--out faceworld_sheet.png] [--size 64] [--ids 0,1,1000]
python -m faceworld render clip OUT.mp4 [--ids 3,14] [--seed 1] [--frames 24] [--size 256]
       [--edit beard] [--tracks OUT.json]
python -m faceworld train|oracles|adapters ...
"""

from faceworld.cli import main

if __name__ == "__main__":
    main()
