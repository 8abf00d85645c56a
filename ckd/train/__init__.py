"""Student training: `train(config)` and `train_mentor(arch, dataset)` (see trainer.py)."""

from ckd.train.config import TrainConfig, load_config, save_config
from ckd.train.schedules import make_schedule
from ckd.train.trainer import evaluate, train, train_mentor

__all__ = ["TrainConfig", "evaluate", "load_config", "make_schedule",
           "save_config", "train", "train_mentor"]
