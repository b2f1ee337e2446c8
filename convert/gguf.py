"""Convert a Llama-architecture GGUF to an MLX 4-bit folder, from a checkout: ``python convert/gguf.py IN.gguf OUT``.

The converter is ``mlx_intent.models.gguf`` (also ``mlx-intent models convert``); this file is its entry
point at the top of the repository, beside ``models/``.
"""

import sys
from pathlib import Path

from mlx_intent.models.gguf import GGUFError, convert_gguf

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[0])
    try:
        convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), progress=lambda msg: print(f"  {msg}", file=sys.stderr))
    except GGUFError as e:
        sys.exit(f"error: {e}")
