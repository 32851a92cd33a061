#!/usr/bin/env python3
"""Reference vectors for shared/optim and shared/schedule, made with real PyTorch.

Regenerate (Debian's PyTorch; PyPI is not needed):
    apt-get install -y python3-torch python3-numpy
    /usr/bin/python3 tools/refs/optim_refs.py            # writes test/fixtures/optim-refs.json
Checked by test/optim.test.ts and test/schedule.test.ts.

What it writes (JSON, float32 values as their shortest round-trip decimal):
  optim.init[t]            initial params of 3 tensors (sizes 7, 33, 256), float32
  optim.grads[s][t]        the gradient of tensor t at step s (5 steps, each step's scale differs,
                           tensor t's scale differs, so amsgrad's running max and eps both matter)
  optim.lrs[s]             the lr of step s (not constant)
  optim.cases[i]           {name, config: Flotilla's OptimizerInput, torch: the kwargs given to
                           torch.optim, params[s][t]: the params after step s, and for live
                           changes live: {atStep, patch}: setHyperparams(patch) before step atStep}
  schedules[i]             {name, config: Flotilla's schedule, torch: what made it, lrs[k]: the lr
                           used by update k (k = 0 is the first update)}
  plateau[i]               {name, config, lr, losses[k], lrs[k]: the lr after observing losses[k]}
"""
import json
import os
import warnings

import numpy as np
import torch

SIZES = [7, 33, 256]
STEPS = 5
LRS = [0.05, 0.03, 0.08, 0.02, 0.06]
STEP_SCALE = [1.0, 0.5, 2.0, 0.05, 0.3]  # per-step gradient scale: step 3 shrinks v (amsgrad)
TENSOR_SCALE = [1.0, 0.1, 3.0]

# SequentialLR calls scheduler.step(0) at a milestone, which torch 1.x warns about (harmless)
warnings.filterwarnings("ignore", message="The epoch parameter")

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "test", "fixtures", "optim-refs.json")


def f32(values):
    """float32 array -> list of Python floats with the shortest float32 round-trip repr."""
    return [float(np.format_float_scientific(np.float32(v), unique=True)) for v in np.asarray(values, np.float32).ravel()]


def make_inputs():
    g = torch.Generator().manual_seed(1234)
    init = [torch.randn(n, generator=g, dtype=torch.float32) for n in SIZES]
    grads = [
        [torch.randn(n, generator=g, dtype=torch.float32) * (STEP_SCALE[s] * TENSOR_SCALE[t]) for t, n in enumerate(SIZES)]
        for s in range(STEPS)
    ]
    return init, grads


# name, torch class, torch kwargs, Flotilla config (OptimizerInput). Every code path of
# shared/optim/optimizers.ts has a case (each of its loops, with and without weight decay).
CASES = [
    ("sgd_plain", torch.optim.SGD, dict(), {"kind": "sgd"}),
    ("sgd_wd", torch.optim.SGD, dict(weight_decay=0.1), {"kind": "sgd", "weightDecay": 0.1}),
    ("sgd_momentum_dampening", torch.optim.SGD, dict(momentum=0.9, dampening=0.1), {"kind": "sgd", "momentum": 0.9, "dampening": 0.1}),
    ("sgd_nesterov_wd", torch.optim.SGD, dict(momentum=0.8, nesterov=True, weight_decay=0.05),
     {"kind": "sgd", "momentum": 0.8, "nesterov": True, "weightDecay": 0.05}),
    ("adam", torch.optim.Adam, dict(), {"kind": "adam"}),
    ("adam_wd", torch.optim.Adam, dict(weight_decay=0.1), {"kind": "adam", "weightDecay": 0.1}),
    ("adam_wd_amsgrad", torch.optim.Adam, dict(betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05, amsgrad=True),
     {"kind": "adam", "beta1": 0.8, "beta2": 0.95, "eps": 1e-3, "weightDecay": 0.05, "amsgrad": True}),
    ("adamw", torch.optim.AdamW, dict(weight_decay=0.1), {"kind": "adamw", "weightDecay": 0.1}),
    ("adamw_amsgrad_default_wd", torch.optim.AdamW, dict(amsgrad=True, betas=(0.9, 0.9)),
     {"kind": "adamw", "amsgrad": True, "beta2": 0.9}),
    ("adagrad_lr_decay", torch.optim.Adagrad, dict(lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=0.01),
     {"kind": "adagrad", "lrDecay": 0.1, "initialAccumulatorValue": 0.1, "weightDecay": 0.01}),
    ("rmsprop_plain", torch.optim.RMSprop, dict(), {"kind": "rmsprop"}),
    ("rmsprop_momentum_wd", torch.optim.RMSprop, dict(momentum=0.5, weight_decay=0.05),
     {"kind": "rmsprop", "momentum": 0.5, "weightDecay": 0.05}),
    ("rmsprop_wd", torch.optim.RMSprop, dict(weight_decay=0.1, eps=1e-6), {"kind": "rmsprop", "weightDecay": 0.1, "eps": 1e-6}),
    ("rmsprop_centered_wd", torch.optim.RMSprop, dict(alpha=0.95, centered=True, weight_decay=0.05),
     {"kind": "rmsprop", "alpha": 0.95, "centered": True, "weightDecay": 0.05}),
    ("rmsprop_momentum_centered_wd", torch.optim.RMSprop, dict(alpha=0.9, momentum=0.9, centered=True, weight_decay=0.01, eps=1e-4),
     {"kind": "rmsprop", "alpha": 0.9, "momentum": 0.9, "centered": True, "weightDecay": 0.01, "eps": 1e-4}),
]


# live hyperparameter changes (Flotilla: setHyperparams): before step `atStep` (0-based) the torch
# param group gets `torch`, Flotilla's config gets `patch`; the state carries on.
LIVE = [
    ("adamw_live_change", torch.optim.AdamW, dict(weight_decay=0.05), {"kind": "adamw", "weightDecay": 0.05},
     dict(atStep=2, torch=dict(betas=(0.8, 0.99), weight_decay=0.2, eps=1e-6), patch={"beta1": 0.8, "beta2": 0.99, "weightDecay": 0.2, "eps": 1e-6})),
    ("sgd_live_change", torch.optim.SGD, dict(momentum=0.9), {"kind": "sgd", "momentum": 0.9},
     dict(atStep=3, torch=dict(momentum=0.5, weight_decay=0.1, dampening=0.2), patch={"momentum": 0.5, "weightDecay": 0.1, "dampening": 0.2})),
]


def run_case(cls, kwargs, init, grads, live=None):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, lr=LRS[0], foreach=False, **kwargs)
    out = []
    for s in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LRS[s]
            if live is not None and s == live["atStep"]:
                group.update(live["torch"])
        for p, g in zip(params, grads[s]):
            p.grad = g.clone()
        opt.step()
        out.append([f32(p.detach().numpy()) for p in params])
    return out


def lr_curve(make_sched, base_lr, n):
    """The lr each of n updates uses: read before optimizer.step(), then scheduler.step()."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = make_sched(opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def schedules():
    S = torch.optim.lr_scheduler
    out = [
        dict(name="constant", config={"kind": "constant", "lr": 0.1}, torch="ConstantLR(factor=1)",
             lrs=lr_curve(lambda o: S.ConstantLR(o, factor=1.0, total_iters=1), 0.1, 8)),
        dict(name="step", config={"kind": "step", "lr": 0.1, "stepSize": 3, "gamma": 0.5}, torch="StepLR(step_size=3, gamma=0.5)",
             lrs=lr_curve(lambda o: S.StepLR(o, step_size=3, gamma=0.5), 0.1, 13)),
        dict(name="exponential", config={"kind": "exponential", "lr": 0.2, "gamma": 0.9}, torch="ExponentialLR(gamma=0.9)",
             lrs=lr_curve(lambda o: S.ExponentialLR(o, gamma=0.9), 0.2, 20)),
        # no warmup: exactly CosineAnnealingLR over T_max = totalSteps (torch keeps going as a cosine wave
        # after T_max; Flotilla holds minLr, so the curve stops at T_max)
        dict(name="cosine_no_warmup", config={"kind": "cosine", "lr": 0.1, "warmupSteps": 0, "totalSteps": 12, "minLr": 0.001},
             torch="CosineAnnealingLR(T_max=12, eta_min=0.001)",
             lrs=lr_curve(lambda o: S.CosineAnnealingLR(o, T_max=12, eta_min=0.001), 0.1, 13)),
        # warmup W: lr·(k+1)/(W+1) for k < W (nanoGPT), = LinearLR(1/(W+1) -> W/(W+1) over W-1 iters),
        # then at k = W a cosine from lr to minLr over totalSteps - W updates
        dict(name="cosine_warmup", config={"kind": "cosine", "lr": 0.1, "warmupSteps": 4, "totalSteps": 14, "minLr": 0.002},
             torch="SequentialLR([LinearLR(1/5, 4/5, total_iters=3), CosineAnnealingLR(T_max=10, eta_min=0.002)], milestones=[4])",
             lrs=lr_curve(lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=1 / 5, end_factor=4 / 5, total_iters=3),
                                                        S.CosineAnnealingLR(o, T_max=10, eta_min=0.002)], milestones=[4]), 0.1, 15)),
        # linear decay after warmup: LinearLR(1 -> minLr/lr over totalSteps - W iters)
        dict(name="linear_warmup", config={"kind": "linear", "lr": 0.1, "warmupSteps": 3, "totalSteps": 11, "minLr": 0.01},
             torch="SequentialLR([LinearLR(1/4, 3/4, total_iters=2), LinearLR(1, 0.1, total_iters=8)], milestones=[3])",
             lrs=lr_curve(lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=1 / 4, end_factor=3 / 4, total_iters=2),
                                                        S.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=8)], milestones=[3]), 0.1, 14)),
        dict(name="linear_no_warmup", config={"kind": "linear", "lr": 0.05, "warmupSteps": 0, "totalSteps": 10, "minLr": 0},
             torch="LinearLR(1, 0, total_iters=10)",
             lrs=lr_curve(lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=10), 0.05, 14)),
    ]
    return out


LOSSES = [1.0, 0.9, 0.95, 0.92, 0.91, 0.899, 0.9, 0.9, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.7, 0.71, 0.72, 0.73,
          0.74, 0.75, 0.76, 0.77, 0.78, 0.79, 0.8, 0.81]


def plateau():
    # Flotilla field -> torch kwarg
    cases = [
        ("min_rel", dict(mode="min", factor=0.5, patience=2, threshold=1e-2, threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8), LOSSES),
        ("min_abs_cooldown_minlr", dict(mode="min", factor=0.3, patience=1, threshold=0.005, threshold_mode="abs", cooldown=2,
                                        min_lr=0.004, eps=1e-8), LOSSES),
        ("max_rel", dict(mode="max", factor=0.1, patience=1, threshold=1e-4, threshold_mode="rel", cooldown=1, min_lr=0, eps=1e-8),
         [-x for x in LOSSES]),
        ("max_abs_eps", dict(mode="max", factor=0.9, patience=0, threshold=0.0, threshold_mode="abs", cooldown=0, min_lr=0,
                             eps=0.003), [0.1 * (k % 3) for k in range(20)]),
        ("defaults", dict(), LOSSES + [0.81] * 10),
    ]
    out = []
    for name, kw, losses in cases:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
        lrs = []
        for loss in losses:
            opt.step()
            sched.step(loss)
            lrs.append(opt.param_groups[0]["lr"])
        config = {"kind": "plateau", "lr": 0.1}
        names = dict(mode="mode", factor="factor", patience="patience", threshold="threshold", threshold_mode="thresholdMode",
                     cooldown="cooldown", min_lr="minLr", eps="eps")
        for k, v in kw.items():
            config[names[k]] = v
        out.append(dict(name=name, config=config, torch=f"ReduceLROnPlateau({kw})", losses=losses, lrs=lrs))
    return out


def main():
    init, grads = make_inputs()
    cases = []
    for name, cls, kwargs, config in CASES:
        cases.append(dict(name=name, config=config, torch=f"{cls.__name__}({kwargs})", params=run_case(cls, kwargs, init, grads)))
    for name, cls, kwargs, config, live in LIVE:
        cases.append(dict(name=name, config=config, torch=f"{cls.__name__}({kwargs}) then {live['torch']} before step {live['atStep']}",
                          live=dict(atStep=live["atStep"], patch=live["patch"]), params=run_case(cls, kwargs, init, grads, live)))
    doc = dict(
        generatedBy="tools/refs/optim_refs.py",
        torch=torch.__version__,
        optim=dict(sizes=SIZES, steps=STEPS, lrs=LRS, init=[f32(p) for p in init],
                   grads=[[f32(g) for g in step] for step in grads], cases=cases),
        schedules=schedules(),
        plateau=plateau(),
    )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes), torch {torch.__version__}")


if __name__ == "__main__":
    main()
