"""Push an already-trained model folder to the Hugging Face Hub (the same as ``python -m hf_cfft.release.push``).

python recipes/push_to_hub.py --model_dir outputs/world_cfft --repo_id you/clip-cfft-world
"""

from hf_cfft.release.push import PushArguments, main

__all__ = ["PushArguments", "main"]

if __name__ == "__main__":
    main()
