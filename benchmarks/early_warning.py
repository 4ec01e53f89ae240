"""Do covshift's alerts come before a training run diverges? And stay quiet when it does not?

A small pre-LN transformer (2 layers, width 64, 4 heads) learns next-token
prediction on synthetic sequences (each token the sum of the two before it,
mod 32). With Adam, warmed up linearly over 100 steps, it trains at a stable peak
learning rate; at a high one its loss diverges once the rate has grown. For each seed and learning rate the script trains with
``attach(model, optimizer=opt, every=1, on_alert=...)`` and reports the step of
the first alert, the step the loss diverges (first step where the loss is
non-finite or above twice its running minimum, after 20 steps), the lead time,
and the alert episodes of the stable runs. A second case kills ReLU units with a
high SGD rate in an MLP regression and checks the dead-channel alert (and its
silence at a low rate).

    .venv/bin/python benchmarks/early_warning.py --seeds 5 --steps 200
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import covshift

VOCAB, WIDTH, LENGTH, BATCH = 32, 64, 24, 32
#: Steps of linear learning-rate warm-up: an unstable peak rate is reached only later in training.
WARMUP_STEPS = 100


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.randn(LENGTH, WIDTH) * 0.02)
        self.blocks = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True, norm_first=True), 2,
            enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(LENGTH), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position
        return self.head(self.norm(self.blocks(h, mask=self.causal, is_causal=True)))


def batches(seed: int, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        seq = torch.zeros(BATCH, LENGTH + 1, dtype=torch.long)
        seq[:, :2] = torch.randint(0, VOCAB, (BATCH, 2), generator=gen)
        for t in range(2, LENGTH + 1):
            seq[:, t] = (seq[:, t - 1] + seq[:, t - 2]) % VOCAB
        out.append(seq)
    return out


def diverged_at(losses: list[float], after: int = 20) -> int | None:
    """The first step (after ``after``) whose loss is non-finite or above twice the running minimum."""
    best = math.inf
    for step, loss in enumerate(losses):
        if step >= after and (not math.isfinite(loss) or loss > 2 * best):
            return step
        best = min(best, loss)
    return None


def train(seed: int, lr: float, steps: int) -> tuple[list[float], list]:
    torch.manual_seed(seed)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    alerts: list = []
    losses: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with covshift.attach(model, optimizer=opt, every=1, on_alert=alerts.append):
            for seq in batches(seed, steps):
                logits = model(seq[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
                losses.append(float(loss))
                if not math.isfinite(losses[-1]):
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                warmup.step()
    return losses, alerts


def dead_relu(seed: int, lr: float, steps: int) -> tuple[float, list]:
    """An MLP regression whose second ReLU's units die at a high SGD rate: the most of layer 4's input
    channels dead at any recorded step, and the alerts."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    alerts: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with covshift.attach(model, optimizer=opt, every=1, on_alert=alerts.append) as tracker:
            for _ in range(steps):
                x = torch.randn(64, 16, generator=gen)
                opt.zero_grad()
                F.mse_loss(model(x), 10 * x[:, :1] + 5).backward()
                opt.step()
    stats = tracker.run.stats("train", layers="4")
    dead = (stats["zero_frac"] >= 0.99).groupby(stats["step"]).mean()
    return float(dead.max()), alerts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--stable-lr", type=float, default=1e-2)
    parser.add_argument("--unstable-lr", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"pre-LN transformer, 2 layers, width {WIDTH}, Adam; {args.steps} steps; torch {torch.__version__}")
    print(f"{'lr':>8} {'seed':>4} {'diverges':>9} {'first alert':>12} {'lead':>5} {'episodes':>9}  first alerts")
    warned = 0
    for lr in (args.unstable_lr, args.stable_lr):
        for seed in range(args.seeds):
            losses, alerts = train(seed, lr, args.steps)
            diverged = diverged_at(losses)
            first = alerts[0].step if alerts else None
            lead = diverged - first if diverged is not None and first is not None else None
            warned += lr == args.unstable_lr and lead is not None and lead > 0
            shown = "; ".join(f"{a.step} {a.layer} {a.kind}" for a in alerts[:3])
            print(f"{lr:>8g} {seed:>4} {str(diverged):>9} {str(first):>12} {str(lead):>5} {len(alerts):>9}  {shown}")
    print(f"unstable runs warned before divergence: {warned} of {args.seeds}")
    print("MLP regression, SGD, 100 steps: layer 4 reads the second ReLU")
    for lr in (0.05, 0.002):
        for seed in range(args.seeds):
            fraction, alerts = dead_relu(seed, lr, 100)
            dead = [a for a in alerts if a.kind == "dead"]
            print(f"  lr {lr:g}, seed {seed}: at most {fraction:.0%} of layer 4's input channels dead; "
                  f"dead alerts: {', '.join(f'step {a.step} layer {a.layer}' for a in dead) or 'none'}")


if __name__ == "__main__":
    main()
