"""Training metrics: an explicit FLOP formula for the DiT, MFU, and the writers.

FLOPs are counted, not measured: every matmul of one DiT forward at ``2 m n k`` (projections,
SRA over its allowed query-key pairs only, cross-attentions, FFN, embeddings and head), times
3 for forward + backward (rematerialised recomputation is not counted, the usual MFU
convention). The frozen encoders are not counted: they are not what is trained.

Writers: JSONL (``WORKDIR/metrics.jsonl``, one object per logged step), TensorBoard event
files (``WORKDIR/tensorboard/``, through tensorboardX when installed) and a progress bar when
stderr is a terminal.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Mapping

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.models.audio_windows import window_size

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_TFLOPS = {
    "h200": 989.0, "h100": 989.0, "a100": 312.0, "l4": 121.0,
    "tpu v6": 918.0, "tpu v5p": 459.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v4": 275.0,
}


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name, value in PEAK_TFLOPS.items():
        if name in kind:
            return value
    return None


def dit_forward_flops(cfg, *, batch: int, gen_frames: int, ref_frames: int, grid: tuple,
                      text_len: int, motion: bool, audio: bool, ref_audio: bool = False) -> float:
    """Matmul FLOPs of one DiT forward (``cfg``: DiTConfig) over a batch."""
    d, ffn, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    hw = grid[0] * grid[1]
    t = hw + (1 if motion else 0)
    n_gen, n_ref = gen_frames * t, ref_frames * t
    n = n_gen + n_ref
    _, ph, pw = cfg.patch_size
    patch = ph * pw

    layout = SRALayout(ref_frames=ref_frames, gen_frames=gen_frames, tokens_per_frame=t,
                       ref_window=cfg.ref_window, gen_window=cfg.gen_window)
    per_layer = 8 * n * d * d                       # q, k, v, o of self-attention
    per_layer += 4 * layout.allowed_pairs() * d     # QK^T and PV over allowed pairs
    per_layer += 4 * n * d * ffn                    # FFN in and out
    n_text = gen_frames * hw                        # GEN video tokens see the text
    per_layer += 4 * n_text * d * d + 4 * text_len * d * d + 4 * n_text * text_len * d
    if audio and cfg.audio_dim:
        w = window_size(cfg.audio_context)
        audio_tokens = n_gen + (n_ref if ref_audio else 0)
        audio_frames = gen_frames + (ref_frames if ref_audio else 0)
        per_layer += 4 * audio_tokens * d * d + 4 * audio_frames * w * d * d
        per_layer += 4 * audio_tokens * w * d
    outside = 2 * (gen_frames + ref_frames) * hw * patch * cfg.in_channels * d   # patch embed
    outside += 2 * gen_frames * hw * d * patch * cfg.out_channels               # proj_out
    outside += 2 * (gen_frames + ref_frames) * (cfg.freq_dim * d + d * d + 6 * d * d)  # time
    outside += 2 * text_len * (cfg.text_dim * d + d * d)                        # text embedder
    return float(batch) * (layers * per_layer + outside)


def dit_train_flops(cfg, **shape) -> float:
    """Forward + backward: 3x the forward's matmul FLOPs."""
    return 3.0 * dit_forward_flops(cfg, **shape)


def throughput(step_flops: float, seconds: float, examples: int, num_devices: int,
               peak_tflops_per_device: float | None) -> dict[str, float]:
    """examples/s, achieved TFLOP/s per device, and MFU (when the peak is known)."""
    out = {"examples_per_s": examples / seconds,
           "tflops_per_device": step_flops / seconds / num_devices / 1e12}
    if peak_tflops_per_device:
        out["mfu"] = out["tflops_per_device"] / peak_tflops_per_device
    return out


class MetricsWriter:
    """JSONL + TensorBoard + a progress bar; only process 0 writes."""

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 progress_bar: bool = True, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v)))
                 for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if math.isfinite(float(v)):
                    self.tb.add_scalar(f"train/{k}", float(v), step)
            self.tb.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{float(values.get('loss', float('nan'))):.4f}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log_line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
