"""Copies a folder's files (not its subfolders) with its safetensors weights as float16, as package.py ships them.

python experiments/libero_spatial_small/halve.py runs/.../global_step_20/policy seed1234/policy
"""

from __future__ import annotations

import argparse
from pathlib import Path

from package import _copy_halved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a model folder (policy/, world_model/)")
    parser.add_argument("destination", type=Path, help="the folder to write")
    args = parser.parse_args()
    _copy_halved(args.source, args.destination)


if __name__ == "__main__":
    main()
