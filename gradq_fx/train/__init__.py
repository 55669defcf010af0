"""`python -m gradq_fx train`: train timm models on Fashion-MNIST (or image folders) in fp32,
bf16, or INT8 with gradq.

    from gradq_fx.train import train
    result = train({"precision": "gradq", "epochs": 10})  # or a TrainConfig, or parsed args

Modules: `settings` (TrainConfig, precisions), `data` (IDX reader, image folders,
augmentation), `model` (timm models, compilation), `schedule` (optimiser, warm-up + cosine),
`checkpoint`, `plot` (curves.png), `distributed` (torchrun / DDP), `loop` (the Trainer).
"""

from gradq_fx.train.loop import Trainer, train
from gradq_fx.train.settings import PRECISIONS, TrainConfig

__all__ = ["PRECISIONS", "TrainConfig", "Trainer", "train"]
