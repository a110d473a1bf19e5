"""QLoRA / LoRA fine-tuning for prompt recovery.

Usage:
    python -m engine.train RECIPE [--key=value ...]
    python -m engine.train recipes/quickstart.py --max_steps=20 --output_dir=runs/try
    torchrun --nproc_per_node N -m engine.train recipes/v5.py

Writes into `output_dir`: config.json (the resolved config), metrics.jsonl, curves.png,
adapter/ (the final adapter, PEFT format), best/ (the adapter with the lowest validation loss)
and checkpoint/ (adapter + optimizer state, for --resume=True). Ctrl-C saves a checkpoint.

With several processes (torchrun), each rank holds the whole model and its own LoRA copy, takes
its slice of every global batch, and the adapter gradients are summed across ranks once per
optimizer step (no communication on the accumulation micro-steps). Rank 0 logs, evaluates and
saves.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import data as data_lib
from engine import templates
from engine.adapters import read_adapter, save_adapter
from engine.config import TrainConfig, apply_overrides, load_recipe
from engine.errors import EngineError, run_cli
from engine.loss import chunked_cross_entropy
from models.lora import inject_lora, lora_layers, lora_state_dict


# ---------------------------------------------------------------- distributed helpers
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each rank to its current GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """t summed over the ranks, in place. NCCL reduces only GPU tensors: a CPU one (a count, a loss
    sum) goes through this rank's GPU and back."""
    if d.world > 1:
        import torch.distributed as dist

        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params, d: Dist) -> None:
    """Sum the gradients of params over the ranks in one all-reduce of a flat buffer (as DDP's
    buckets do), not one call per tensor: the adapters are many small tensors."""
    if d.world <= 1:
        return
    by_kind: dict = {}  # one buffer per (dtype, device)
    for p in params:
        if p.grad is not None:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_kind.values():
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), d)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def barrier(d: Dist):
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------- setup
def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local}")
        return torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("device='cuda' but no GPU is visible; use --device=cpu.")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")  # torchrun: one GPU per rank
    return device


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise EngineError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {cfg.dtype!r}.")
    return getattr(torch, cfg.dtype)


def load_splits(cfg: TrainConfig, recipe: str | None):
    """(train rows, valid rows, report). Data with a split column uses it (valid and test held
    out); data without one holds out valid_fraction of its rows, chosen by seed."""
    import random

    rows, report = data_lib.load_dataset(cfg.data, cfg.data_dir, columns=cfg.columns or None,
                                         fraction=cfg.data_fraction, seed=cfg.seed, recipe=recipe)
    if rows and all(r.get("split") for r in rows):
        train = [r for r in rows if r["split"] == "train"]
        valid = [r for r in rows if r["split"] == "valid"]
    else:
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        n_valid = max(1, round(len(rows) * cfg.valid_fraction))
        held = set(order[:n_valid])
        train = [r for i, r in enumerate(rows) if i not in held]
        valid = [r for i, r in enumerate(rows) if i in held]
    if not train or not valid:
        raise EngineError(f"the data gives {len(train)} training and {len(valid)} validation rows; "
                          "both must be non-empty (add rows or change valid_fraction).")
    return train, valid, report


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to lr over warmup_steps, then linear decay to 0 at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    return cfg.lr * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


# ---------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, recipe: str | None = None, log=print):
        self.cfg, self.log = cfg, log
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg)
        self.dist = init_distributed(self.device)
        if not self.dist.main:
            self.log = lambda *a, **k: None
        self.dtype = resolve_dtype(cfg, self.device)
        self.out = Path(cfg.output_dir)

        import engine

        torch.manual_seed(cfg.seed)
        self.model, self.tok = engine.load(cfg.model, dtype=self.dtype, device=self.device,
                                           quantize=cfg.quantize)
        inject_lora(self.model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    targets=cfg.lora_targets, rslora=cfg.rslora)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        n_lora = sum(p.numel() for p in self.params)
        self.log(f"[train] {cfg.model} on {self.device} ({self.dtype}), LoRA r={cfg.lora_r} on "
                 f"{len(lora_layers(self.model))} layers: {n_lora:,} trainable parameters"
                 + (f", {self.dist.world} ranks" if self.dist.world > 1 else ""))

        self.fmt = templates.resolve_format(self.tok, cfg.prompt_format)
        train_rows, self.valid_rows, report = load_splits(cfg, recipe)
        loss_mode = "completion" if cfg.loss == "completions" else "full"
        self.train_ex = data_lib.encode_rows(self.tok, train_rows, cfg.output_type, self.fmt, loss_mode,
                                             cfg.max_seq_length, report)
        self.valid_ex = data_lib.encode_rows(self.tok, self.valid_rows, cfg.output_type, self.fmt,
                                             loss_mode, cfg.max_seq_length, report)
        self.log(f"[train] data: {report.summary()}")
        self.log(f"[train] {len(self.train_ex)} training and {len(self.valid_ex)} validation examples "
                 f"({self.fmt} format, output_type={cfg.output_type}, loss={cfg.loss})")
        if not self.train_ex or not self.valid_ex:
            raise EngineError(f"no examples left after the max_seq_length={cfg.max_seq_length} filter; "
                              "raise --max_seq_length.")
        self.global_batch = cfg.batch_size * self.dist.world
        self.batches_per_epoch = max(1, len(self.train_ex) // self.global_batch)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.999), fused=fused)
        self.step = 0
        self.best_valid = float("inf")
        self._epoch_cache: dict[int, list[list[int]]] = {}

    # ---- data order: a pure function of (seed, world size, micro-batch index) ----
    def micro_batch(self, m: int) -> list[dict]:
        epoch, i = divmod(m, self.batches_per_epoch)
        if epoch not in self._epoch_cache:
            lengths = [len(ex["input_ids"]) for ex in self.train_ex]
            self._epoch_cache = {epoch: data_lib.bucketed_batches(
                lengths, self.global_batch, seed=self.cfg.seed + epoch, drop_last=True)}
        batch = self._epoch_cache[epoch][i]
        mine = batch[self.dist.rank * self.cfg.batch_size:(self.dist.rank + 1) * self.cfg.batch_size]
        return [self.train_ex[j] for j in mine]

    def _tensors(self, batch):
        ids, labels, _ = data_lib.collate_train(batch, self.tok.pad_token_id)
        # Right padding: causal attention already hides the pads from every real token, so no
        # mask is needed (and the fused causal attention path runs).
        return ids.to(self.device), labels.to(self.device)

    def _loss_sum(self, ids, labels):
        hidden = self.model(ids, return_hidden=True)  # (B, T, C)
        return chunked_cross_entropy(hidden, self.model.lm_head.weight, labels)

    # ---- one optimizer step ----
    def train_step(self) -> tuple[float, int]:
        cfg = self.cfg
        self.model.train()
        torch.manual_seed(cfg.seed * 1_000_003 + self.step)  # dropout masks depend on the step only
        batches = [self._tensors(self.micro_batch(self.step * cfg.grad_accum + k)) for k in range(cfg.grad_accum)]
        count = torch.tensor(float(sum(int((l[:, 1:] != -100).sum()) for _, l in batches)))
        count = all_reduce_sum(count, self.dist).item()  # targets in the whole (global) step
        total = 0.0
        for ids, labels in batches:
            loss_sum, _ = self._loss_sum(ids, labels)
            (loss_sum / count).backward()
            total += loss_sum.item()
        all_reduce_grads(self.params, self.dist)  # sum over ranks: one process with the whole global batch
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg, self.total_steps)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        total = all_reduce_sum(torch.tensor(total), self.dist).item()
        tokens = sum(int(i.numel()) for i, _ in batches) * self.dist.world
        return total / max(count, 1), tokens

    # ---- evaluation ----
    @torch.no_grad()
    def valid_loss(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        order = sorted(range(len(self.valid_ex)), key=lambda i: len(self.valid_ex[i]["input_ids"]))
        for s in range(0, len(order), self.cfg.batch_size):
            ids, labels = self._tensors([self.valid_ex[i] for i in order[s:s + self.cfg.batch_size]])
            loss_sum, n = self._loss_sum(ids, labels)
            total, count = total + loss_sum.item(), count + n
        return total / max(count, 1)

    @torch.no_grad()
    def valid_metric(self) -> dict | None:
        """Greedy predictions for the first eval_metric_rows validation rows, scored with the metric."""
        from engine.metrics import score
        from engine.sampling import generate

        n = min(self.cfg.eval_metric_rows, len(self.valid_rows))
        if n <= 0:
            return None
        self.model.eval()
        rows = self.valid_rows[:n]
        prime = templates.prime_ids(self.tok, self.cfg.output_type)
        prompts = [templates.prompt_ids(self.tok, r["original_text"], r["rewritten_text"],
                                        self.cfg.output_type, self.fmt) + prime for r in rows]
        preds = []
        for s in range(0, n, self.cfg.batch_size):
            outs = generate(self.model, prompts[s:s + self.cfg.batch_size], temperature=0,
                            max_new_tokens=self.cfg.eval_max_new_tokens,
                            eos_ids=[self.tok.eos_token_id], pad_id=self.tok.pad_token_id)
            preds += [templates.parse_response(self.tok.decode(prime + o[0]), self.cfg.output_type)
                      for o in outs]
        result = score(preds, [r["rewrite_prompt"] for r in rows])
        result["example"] = {"pred": preds[0], "true": rows[0]["rewrite_prompt"]}
        return result

    def evaluate(self, metrics_file) -> float:
        vloss = self.valid_loss()
        record = {"step": self.step, "split": "valid", "loss": round(vloss, 6)}
        m = self.valid_metric()
        if m is not None:
            record.update(scs=round(m["scs"], 4), metric_model=m["model"], metric_rows=m["n"],
                          example=m["example"])
        self._write_metrics(metrics_file, record)
        self.log(f"[eval] step {self.step}: valid loss {vloss:.4f}"
                 + (f", SCS {m['scs']:.4f} ({m['model']}, {m['n']} rows)" if m else ""))
        if vloss < self.best_valid:
            self.best_valid = vloss
            save_adapter(self.model, self.out / "best", self.cfg.model)
        return vloss

    # ---- checkpoints ----
    def save_checkpoint(self):
        if not self.dist.main:
            return
        ck = self.out / "checkpoint"
        save_adapter(self.model, ck, self.cfg.model)
        tmp = ck / "trainer.pt.tmp"
        torch.save({"optimizer": self.opt.state_dict(), "step": self.step, "best_valid": self.best_valid,
                    "config": self.cfg.to_json()}, tmp)
        tmp.replace(ck / "trainer.pt")

    def load_checkpoint(self) -> bool:
        ck = self.out / "checkpoint"
        if not (ck / "trainer.pt").is_file():
            return False
        state = torch.load(ck / "trainer.pt", map_location=self.device, weights_only=False)
        _, tensors = read_adapter(ck)
        ours = lora_state_dict(self.model)
        self.model.load_state_dict({k[len("base_model.model."):]: v for k, v in tensors.items()
                                    if k[len("base_model.model."):] in ours}, strict=False)
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.best_valid = state["step"], state["best_valid"]
        return True

    def _write_metrics(self, f, record):
        if f is not None:
            f.write(json.dumps(record) + "\n")
            f.flush()

    # ---- the loop ----
    def fit(self):
        from tqdm import tqdm

        cfg, out = self.cfg, self.out
        resumed = cfg.resume and self.load_checkpoint()
        if cfg.resume and not resumed:
            self.log(f"[train] --resume: no checkpoint in {out / 'checkpoint'}; starting fresh.")
        metrics_file = None
        if self.dist.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(cfg.to_json())
            _truncate_metrics(out / "metrics.jsonl", self.step if resumed else 0)
            metrics_file = open(out / "metrics.jsonl", "a")
        if resumed:
            self.log(f"[train] resumed from step {self.step}")
        try:
            if self.step == 0 and cfg.eval_every > 0 and self.dist.main:
                self.evaluate(metrics_file)
            barrier(self.dist)
            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                       disable=not self.dist.main, dynamic_ncols=True, file=sys.stderr)
            t0, tokens_seen = time.perf_counter(), 0
            while self.step < self.total_steps:
                loss, tokens = self.train_step()
                tokens_seen += tokens
                tps = tokens_seen / (time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                self._write_metrics(metrics_file, {"step": self.step, "split": "train", "loss": round(loss, 6),
                                                   "lr": self.opt.param_groups[0]["lr"],
                                                   "tokens_per_s": round(tps, 1)})
                at_eval = cfg.eval_every > 0 and (self.step % cfg.eval_every == 0 or self.step == self.total_steps)
                if at_eval and self.dist.main:
                    self.evaluate(metrics_file)
                if at_eval or (cfg.save_every > 0 and self.step % cfg.save_every == 0):
                    self.save_checkpoint()
                barrier(self.dist)
            bar.close()
        except KeyboardInterrupt:
            self.save_checkpoint()
            self.log(f"\n[train] interrupted at step {self.step}: checkpoint saved in "
                     f"{out / 'checkpoint'}; continue with --resume=True")
            raise SystemExit(130)
        finally:
            if metrics_file is not None:
                metrics_file.close()
        self.save_checkpoint()
        if self.dist.main:
            save_adapter(self.model, out / "adapter", cfg.model)
            plot_curves(out / "metrics.jsonl", out / "curves.png")
            self.log(f"[train] done: adapter in {out / 'adapter'}, best (valid loss "
                     f"{self.best_valid:.4f}) in {out / 'best'}, curves in {out / 'curves.png'}")
        return self


def _truncate_metrics(path: Path, step: int):
    """Keep only the records up to `step` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    if step == 0:
        keep = []
    path.write_text("".join(line + "\n" for line in keep))


def plot_curves(metrics_path: Path, png_path: Path):
    """Train and validation loss against step, and the task metric if it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    valid = [(r["step"], r["loss"]) for r in records if r["split"] == "valid"]
    scs = [(r["step"], r["scs"]) for r in records if r["split"] == "valid" and "scs" in r]
    fig, axes = plt.subplots(1, 2 if scs else 1, figsize=(11 if scs else 6, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over labelled tokens)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if scs:
        ax = axes[0, 1]
        ax.plot(*zip(*scs), "o-", color="tab:green")
        model = next(r["metric_model"] for r in records if "metric_model" in r)
        ax.set_title(f"Sharpened cosine similarity\n({model})", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Config keys and defaults:\n" + TrainConfig().to_json())
        return
    recipe, overrides = argv[0], argv[1:]
    cfg = apply_overrides(load_recipe(recipe), overrides)
    Trainer(cfg, recipe=recipe).fit()


if __name__ == "__main__":
    run_cli(main)
