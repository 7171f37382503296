"""Where training metrics go: one stdout line per logged iteration, TensorBoard when installed
and asked for, W&B / SwanLab when installed and asked for, and a JSON-lines file. Only global
rank 0 writes (the values are reduced over all ranks before they get here)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def flops_per_token(cfg, seq_length: int) -> float:
    """6 N + 12 L h s: N = the weights every token multiplies (no input embedding, with the
    output layer), the second term the attention scores and values (h = heads x head dim)."""
    n = cfg.num_params(include_embedding=False) + cfg.vocab_size * cfg.hidden_size
    attn_width = cfg.num_attention_heads * cfg.head_dim
    return 6.0 * n + 12.0 * cfg.num_layers * attn_width * seq_length


class MetricsLogger:
    def __init__(self, *, enabled: bool, tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, wandb_name: Optional[str] = None,
                 swanlab_project: Optional[str] = None, json_path: Optional[str] = None,
                 config: Optional[dict] = None):
        self.enabled = enabled
        self.tb = self.wandb = self.swanlab = None
        self.json = None
        if not enabled:
            return
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)
            except ImportError:
                log.warning("--tensorboard-dir given but tensorboard is not installed; "
                            "not writing TensorBoard logs")
        if wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, name=wandb_name, config=config)
            except ImportError:
                log.warning("--wandb-project given but wandb is not installed")
        if swanlab_project:
            try:
                import swanlab
                swanlab.init(project=swanlab_project, config=config)
                self.swanlab = swanlab
            except ImportError:
                log.warning("--swanlab-project given but swanlab is not installed")
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            self.json = open(json_path, "a", buffering=1)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {f"{prefix}{k}": v for k, v in values.items()
                 if isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        if self.swanlab is not None:
            self.swanlab.log(clean, step=step)

    def record(self, obj: dict) -> None:
        if self.enabled and self.json is not None:
            self.json.write(json.dumps(obj) + "\n")

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.json is not None:
            self.json.close()


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
