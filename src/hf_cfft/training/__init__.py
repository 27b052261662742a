"""What hf_cfft's trainers share (`RobustTrainer`); the methods' trainers are `hf_cfft.CfftTrainer` and
`hf_cfft.baselines.flyp.FlypTrainer`."""

from .base import LostProcessError, RobustTrainer

__all__ = ["LostProcessError", "RobustTrainer"]
