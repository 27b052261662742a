"""Push an already-trained model folder to the Hugging Face Hub (the same as ``python -m hf_cfft.release.push``).

python recipes/push_to_hub.py --model_dir outputs/world_cfft --repo_id you/clip-cfft-world
"""

import hf_cfft_help  # noqa: F401  (first: --help from its cache, before the library loads)

# isort: split
from hf_cfft.release.push import PushArguments, main

__all__ = ["PushArguments", "main"]

if __name__ == "__main__":
    main()
