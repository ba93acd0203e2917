"""Ray Train + DeepSpeed training: `pretrain(config)` and the pieces fine-tuning reuses."""

from llmos_ray.train.trainer import TrainResult, pretrain

__all__ = ["pretrain", "TrainResult"]
