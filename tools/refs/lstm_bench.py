#!/usr/bin/env python3
"""PyTorch reference timing for bench/lstm.ts: one training step of the seed's classifier.

Implements: Embedding(10000, 64) -> LSTM(64, batch_first) -> Linear(64, 64) -> ReLU ->
Linear(64, 1) -> BCEWithLogitsLoss, B=32, L=100, on the CPU, timed per step as
zero_grad + forward + backward (gradients computed; the optimizer step is EXCLUDED, as in
the tfjs rows of bench/lstm.ts, which time forward + backward + gradients read back).
Owns: nothing but this measurement. Does not own: the tfjs model (shared/models/) or the
table (bench/lstm.ts prints it).

Run (Debian's PyTorch 1.13; PyPI is not needed):
    apt-get install -y python3-torch
    /usr/bin/python3 tools/refs/lstm_bench.py [--steps N]
Prints one JSON object on stdout: {"rows": [{"run", "msPerStep", "samplesPerSec", "threads"}]}
with msPerStep the median over N timed steps (after 3 warm-up steps), one row with
torch.set_num_threads(1), one with the thread count torch picks by default, and one with
os.cpu_count() threads when that differs from both.

The batch is the one bench/lstm.ts builds: ids uniform in 1..V-1 with the first 20 of 100
positions padding (id 0). nn.LSTM has no mask: it runs all 100 steps over the padding too
(the tfjs models skip/freeze padded steps, Keras mask_zero semantics).
"""
import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

V, E, H, F = 10_000, 64, 64, 64
B, L, PAD = 32, 100, 20


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, batch_first=True)
        self.dense = nn.Linear(H, F)
        self.out = nn.Linear(F, 1)

    def forward(self, x):  # x: [B, L] int64 -> logits [B]
        _, (h, _) = self.lstm(self.embedding(x))  # h: [1, B, H], the state after step L
        return self.out(torch.relu(self.dense(h[-1]))).squeeze(1)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, V, (B, L), generator=g)
    x[:, :PAD] = 0
    y = (torch.arange(B) % 2).float()
    return x, y


def time_steps(threads, steps):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Classifier()
    loss_fn = nn.BCEWithLogitsLoss()
    x, y = batch()

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss.item()

    for _ in range(3):
        step()
    ms = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        ms.append((time.perf_counter() - t) * 1000)
    m = statistics.median(ms)
    return m, B / m * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    default_threads = torch.get_num_threads()  # before anything changes it
    plan = [("torch 1.13 CPU, 1 thread", 1), (f"torch 1.13 CPU, default threads ({default_threads})", default_threads)]
    cpus = os.cpu_count() or 1
    if cpus not in (1, default_threads):
        plan.append((f"torch 1.13 CPU, {cpus} threads (cpu_count)", cpus))
    rows = []
    for run, threads in plan:
        m, rate = time_steps(threads, args.steps)
        rows.append({"run": run, "msPerStep": m, "samplesPerSec": rate, "threads": threads})
    print(json.dumps({"rows": rows, "torch": torch.__version__, "optimizerStep": "excluded"}))


if __name__ == "__main__":
    main()
