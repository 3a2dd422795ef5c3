"""Training: DeepSpeed pretraining of the unified LM (config, trainer, launch entry)."""

from mmgen.training.config import TrainConfig, load_train_config  # noqa: F401
