// Checks shared/optim: every optimizer against PyTorch's own numbers
// (test/fixtures/optim-refs.json, made by tools/refs/optim_refs.py), that the comparison
// would catch a slightly wrong implementation, validation naming the field, live
// hyperparameter changes keeping the state, clipping and non-finite detection.
// Run: npx vitest run test/optim.test.ts
import { readFileSync } from "node:fs"
import * as Result from "effect/Result"
import { describe, expect, it } from "vitest"
import { clipByGlobalNorm, findNonFinite, globalNorm } from "../shared/optim/clip.ts"
import {
  makeOptimizer,
  OPTIMIZER_DEFAULTS,
  resolveOptimizer,
  setHyperparams
} from "../shared/optim/optimizers.ts"
import type { InvalidOptimizerConfig, OptimizerInput, OptimizerPatch } from "../shared/optim/optimizers.ts"

interface RefCase {
  readonly name: string
  readonly config: OptimizerInput
  readonly torch: string
  readonly live?: { readonly atStep: number; readonly patch: OptimizerPatch }
  readonly params: number[][][] // [step][tensor][element]
}
interface Refs {
  readonly torch: string
  readonly optim: {
    readonly sizes: number[]
    readonly steps: number
    readonly lrs: number[]
    readonly init: number[][]
    readonly grads: number[][][]
    readonly cases: RefCase[]
  }
}

const refs: Refs = JSON.parse(readFileSync(new URL("./fixtures/optim-refs.json", import.meta.url), "utf8"))
const { optim } = refs

/** max|a−b| / max|b| over one tensor: the error in units of the tensor's scale. */
const relErr = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let num = 0
  let den = 1e-6
  for (let i = 0; i < b.length; i++) {
    num = Math.max(num, Math.abs(a[i] - b[i]))
    den = Math.max(den, Math.abs(b[i]))
  }
  return num / den
}

const TOL = 1e-6

const ok = <A>(r: Result.Result<A, InvalidOptimizerConfig>): A => {
  if (Result.isFailure(r)) throw new Error(r.failure.message)
  return r.success
}
const failure = <A>(r: Result.Result<A, InvalidOptimizerConfig>): InvalidOptimizerConfig => {
  if (Result.isSuccess(r)) throw new Error(`expected a failure, got ${JSON.stringify(r.success)}`)
  return r.failure
}

interface Perturb {
  readonly lrScale?: number
  readonly stepShift?: number
}

/** Replays a reference case; returns the worst relErr over all steps and tensors. */
const replay = (c: RefCase, perturb: Perturb = {}): number => {
  let config = ok(resolveOptimizer(c.config))
  let opt = makeOptimizer(config)
  const params = optim.init.map((p) => Float32Array.from(p))
  // the fixture holds float32 values as short decimals: round them back to float32 exactly
  const expected = c.params.map((step) => step.map((p) => Float32Array.from(p)))
  const slots = params.map((p) => opt.initState(p.length))
  let worst = 0
  for (let s = 0; s < optim.steps; s++) {
    if (c.live !== undefined && s === c.live.atStep) {
      config = ok(setHyperparams(config, c.live.patch))
      opt = makeOptimizer(config)
    }
    const lr = optim.lrs[s] * (perturb.lrScale ?? 1)
    const step = s + 1 + (perturb.stepShift ?? 0)
    params.forEach((p, t) => opt.update(p, Float32Array.from(optim.grads[s][t]), slots[t], lr, step))
    params.forEach((p, t) => {
      worst = Math.max(worst, relErr(p, expected[s][t]))
    })
  }
  return worst
}

describe(`optimizers vs torch.optim ${refs.torch} (tools/refs/optim_refs.py)`, () => {
  it("the fixture covers every kind and the settings that matter", () => {
    const kinds = new Set(optim.cases.map((c) => c.config.kind))
    expect([...kinds].sort()).toEqual(Object.keys(OPTIMIZER_DEFAULTS).sort())
    expect(optim.sizes).toEqual([7, 33, 256])
    expect(new Set(optim.lrs).size).toBeGreaterThan(1)
  })

  for (const c of optim.cases) {
    describe(c.name, () => {
      it(`matches ${c.torch} to ${TOL} relative after every step`, () => {
        const err = replay(c)
        const hint = `${c.name}: the update differs from torch.optim; compare with its docs' pseudo-code`
        expect(err, hint).toBeLessThan(TOL)
      })

      it("moves the params far more than the tolerance, and a slightly wrong optimizer fails", () => {
        const last = c.params[optim.steps - 1]
        const moved = Math.min(...last.map((p, t) => relErr(p, optim.init[t])))
        expect(moved).toBeGreaterThan(100 * TOL)
        // a 0.1% error in the step size is caught, and so is an off-by-one step count where
        // the step matters (Adam's bias correction, Adagrad's lr decay, SGD's first momentum
        // step with dampening)
        expect(replay(c, { lrScale: 1.001 })).toBeGreaterThan(TOL)
        if (c.config.kind !== "rmsprop" && (c.config.kind !== "sgd" || c.name === "sgd_momentum_dampening")) {
          expect(replay(c, { stepShift: 1 })).toBeGreaterThan(TOL)
        }
      })
    })
  }

  it("a 1% change of any hyperparameter a case sets is caught", () => {
    const missed: string[] = []
    for (const c of optim.cases) {
      if (c.live !== undefined) continue
      for (const [field, value] of Object.entries(c.config)) {
        if (typeof value !== "number" || value === 0) continue
        const nudged = { ...c, config: { ...c.config, [field]: value * 1.01 } as OptimizerInput }
        if (replay(nudged) <= TOL) missed.push(`${c.name}.${field}`)
      }
    }
    expect(missed).toEqual([])
  })
})

describe("resolveOptimizer", () => {
  it("fills PyTorch's defaults", () => {
    expect(ok(resolveOptimizer({ kind: "adamw" }))).toEqual({
      kind: "adamw",
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weightDecay: 0.01,
      amsgrad: false
    })
    expect(ok(resolveOptimizer({ kind: "adam" }))).toMatchObject({ weightDecay: 0 })
    expect(ok(resolveOptimizer({ kind: "sgd", momentum: 0.9 }))).toEqual({
      kind: "sgd",
      momentum: 0.9,
      dampening: 0,
      nesterov: false,
      weightDecay: 0
    })
    expect(ok(resolveOptimizer({ kind: "adagrad" }))).toMatchObject({
      eps: 1e-10,
      lrDecay: 0,
      initialAccumulatorValue: 0
    })
    expect(ok(resolveOptimizer({ kind: "rmsprop" }))).toMatchObject({ alpha: 0.99, eps: 1e-8, centered: false })
  })

  it("is JSON-serialisable and idempotent", () => {
    const c = ok(resolveOptimizer({ kind: "rmsprop", momentum: 0.5, centered: true }))
    expect(ok(resolveOptimizer(JSON.parse(JSON.stringify(c))))).toEqual(c)
  })

  const bad: ReadonlyArray<readonly [unknown, string]> = [
    [{ kind: "adam", beta1: 1 }, "beta1"],
    [{ kind: "adam", beta2: -0.1 }, "beta2"],
    [{ kind: "adamw", eps: 0 }, "eps"],
    [{ kind: "adam", weightDecay: Number.NaN }, "weightDecay"],
    [{ kind: "adam", weightDecay: Number.POSITIVE_INFINITY }, "weightDecay"],
    [{ kind: "adam", amsgrad: "yes" }, "amsgrad"],
    [{ kind: "adam", beta1: "0.9" }, "beta1"],
    [{ kind: "sgd", momentum: -0.5 }, "momentum"],
    [{ kind: "sgd", dampening: 1.5 }, "dampening"],
    [{ kind: "sgd", nesterov: true }, "nesterov"],
    [{ kind: "sgd", nesterov: true, momentum: 0.9, dampening: 0.1 }, "nesterov"],
    [{ kind: "sgd", weight_decay: 0.1 }, "weight_decay"],
    [{ kind: "sgd", beta1: 0.9 }, "beta1"],
    [{ kind: "adagrad", lrDecay: -1 }, "lrDecay"],
    [{ kind: "adagrad", initialAccumulatorValue: -0.1 }, "initialAccumulatorValue"],
    [{ kind: "rmsprop", alpha: 1 }, "alpha"],
    [{ kind: "rmsprop", centered: 1 }, "centered"],
    [{ kind: "lamb" }, "kind"],
    [{}, "kind"],
    [null, "kind"],
    ["adam", "kind"]
  ]
  for (const [input, field] of bad) {
    it(`rejects ${JSON.stringify(input)} naming ${field}`, () => {
      const e = failure(resolveOptimizer(input as OptimizerInput))
      expect(e._tag).toBe("InvalidOptimizerConfig")
      expect(e.field).toBe(field)
      expect(e.message).toContain(field)
    })
  }

  it("accepts Nesterov with momentum and no dampening", () => {
    expect(ok(resolveOptimizer({ kind: "sgd", nesterov: true, momentum: 0.9 })).kind).toBe("sgd")
  })
})

describe("makeOptimizer", () => {
  it("names the slots as PyTorch's state does", () => {
    const names = (input: OptimizerInput) => makeOptimizer(ok(resolveOptimizer(input))).slotNames
    expect(names({ kind: "sgd" })).toEqual([])
    expect(names({ kind: "sgd", momentum: 0.9 })).toEqual(["momentum_buffer"])
    expect(names({ kind: "adam" })).toEqual(["exp_avg", "exp_avg_sq"])
    expect(names({ kind: "adamw", amsgrad: true })).toEqual(["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
    expect(names({ kind: "adagrad" })).toEqual(["sum"])
    const rms = names({ kind: "rmsprop", momentum: 0.9, centered: true })
    expect(rms).toEqual(["square_avg", "momentum_buffer", "grad_avg"])
  })

  it("initialises Adagrad's sum to initialAccumulatorValue and the rest to 0", () => {
    const slots = makeOptimizer(ok(resolveOptimizer({ kind: "adagrad", initialAccumulatorValue: 0.25 }))).initState(3)
    expect([...slots.sum]).toEqual([0.25, 0.25, 0.25])
    expect([...makeOptimizer(ok(resolveOptimizer({ kind: "adam" }))).initState(2).exp_avg]).toEqual([0, 0])
  })

  it("refuses mismatched sizes, missing slots, a bad lr or a 0-based step", () => {
    const opt = makeOptimizer(ok(resolveOptimizer({ kind: "adam" })))
    const p = new Float32Array(4)
    const slots = opt.initState(4)
    expect(() => opt.update(p, new Float32Array(3), slots, 0.1, 1)).toThrow(RangeError)
    expect(() => opt.update(p, new Float32Array(4), { exp_avg: slots.exp_avg }, 0.1, 1)).toThrow(/exp_avg_sq/)
    expect(() => opt.update(p, new Float32Array(4), opt.initState(5), 0.1, 1)).toThrow(RangeError)
    expect(() => opt.update(p, new Float32Array(4), slots, Number.NaN, 1)).toThrow(/lr/)
    expect(() => opt.update(p, new Float32Array(4), slots, 0.1, 0)).toThrow(/1-based/)
  })

  it("throws the validation error for a config that was not resolved", () => {
    const bad = { kind: "adam", beta1: 1.5, beta2: 0.999, eps: 1e-8, weightDecay: 0, amsgrad: false } as const
    expect(() => makeOptimizer(bad)).toThrow(/beta1/)
  })

  it("does not modify the gradient", () => {
    for (const c of optim.cases) {
      const opt = makeOptimizer(ok(resolveOptimizer(c.config)))
      const grad = Float32Array.from(optim.grads[0][1])
      opt.update(Float32Array.from(optim.init[1]), grad, opt.initState(grad.length), 0.1, 1)
      expect(grad).toEqual(Float32Array.from(optim.grads[0][1]))
    }
  })
})

describe("setHyperparams", () => {
  it("changes values and keeps the slots (replayed against torch in the live cases above)", () => {
    expect(optim.cases.filter((c) => c.live !== undefined).length).toBeGreaterThanOrEqual(2)
    const config = ok(resolveOptimizer({ kind: "adam", amsgrad: true }))
    const next = ok(setHyperparams(config, { beta1: 0.5, weightDecay: 0.1 }))
    expect(next).toEqual({ ...config, beta1: 0.5, weightDecay: 0.1 })
    expect(makeOptimizer(next).slotNames).toEqual(makeOptimizer(config).slotNames)
  })

  it("continuing with the same slots differs from restarting them (the state is used)", () => {
    const c = optim.cases.find((x) => x.name === "adamw_live_change")!
    expect(replay(c)).toBeLessThan(TOL)
    const fresh = { ...c, live: undefined, config: { ...c.config, ...c.live!.patch } as OptimizerInput }
    expect(replay(fresh)).toBeGreaterThan(TOL)
  })

  const refused: ReadonlyArray<readonly [OptimizerInput, OptimizerPatch, string]> = [
    [{ kind: "adam" }, { beta2: 1.5 }, "beta2"],
    [{ kind: "adam" }, { amsgrad: true }, "amsgrad"],
    [{ kind: "adam" }, { kind: "adamw" } as OptimizerPatch, "kind"],
    [{ kind: "sgd" }, { momentum: 0.9 }, "momentum"],
    [{ kind: "sgd", momentum: 0.9 }, { momentum: 0 }, "momentum"],
    [{ kind: "sgd", momentum: 0.9, nesterov: true }, { dampening: 0.1 }, "nesterov"],
    [{ kind: "rmsprop" }, { centered: true }, "centered"],
    [{ kind: "adagrad" }, { beta1: 0.9 } as OptimizerPatch, "beta1"],
    [{ kind: "adagrad" }, null as unknown as OptimizerPatch, "patch"]
  ]
  for (const [input, patch, field] of refused) {
    it(`refuses ${JSON.stringify(patch)} on ${input.kind} naming ${field}`, () => {
      const e = failure(setHyperparams(ok(resolveOptimizer(input)), patch))
      expect(e.field).toBe(field)
    })
  }
})

describe("clipping", () => {
  it("globalNorm spans all tensors", () => {
    expect(globalNorm([Float32Array.of(3, 4), Float32Array.of(12), new Float32Array(0)])).toBe(13)
    expect(globalNorm([])).toBe(0)
  })

  it("globalNorm accumulates in float64 (no overflow, no drift)", () => {
    expect(globalNorm([Float32Array.of(3e30, 4e30)]) / 5e30).toBeCloseTo(1, 6)
    const n = 1 << 20
    const x = Math.fround(1e-3)
    // a float32 running sum would be off by ~1e-3 here
    expect(Math.abs(globalNorm([new Float32Array(n).fill(x)]) / (Math.sqrt(n) * x) - 1)).toBeLessThan(1e-9)
  })

  it("scales by maxNorm / (norm + 1e-6) when over the limit, as clip_grad_norm_", () => {
    const a = Float32Array.of(3, 4)
    const b = Float32Array.of(12)
    const { norm, scale } = clipByGlobalNorm([a, b], 1)
    expect(norm).toBe(13)
    expect(scale).toBe(1 / (13 + 1e-6))
    expect([...a]).toEqual([Math.fround(3 * scale), Math.fround(4 * scale)])
    expect(b[0]).toBe(Math.fround(12 * scale))
    expect(globalNorm([a, b])).toBeCloseTo(1, 5)
  })

  it("leaves gradients under the limit alone", () => {
    const a = Float32Array.of(0.3, 0.4)
    expect(clipByGlobalNorm([a], 1)).toEqual({ norm: Math.hypot(Math.fround(0.3), Math.fround(0.4)), scale: 1 })
    expect([...a]).toEqual([Math.fround(0.3), Math.fround(0.4)])
    expect(clipByGlobalNorm(new Set([a]), Number.POSITIVE_INFINITY).scale).toBe(1)
  })

  it("leaves non-finite gradients alone and reports the norm", () => {
    const a = Float32Array.of(1, Number.NaN)
    const r = clipByGlobalNorm([a], 1)
    expect(r.norm).toBeNaN()
    expect(r.scale).toBe(1)
    expect(a[0]).toBe(1)
    expect(clipByGlobalNorm([Float32Array.of(Number.POSITIVE_INFINITY)], 1).norm).toBe(Number.POSITIVE_INFINITY)
  })

  it("refuses a maxNorm that is not > 0", () => {
    expect(() => clipByGlobalNorm([], 0)).toThrow(RangeError)
    expect(() => clipByGlobalNorm([], Number.NaN)).toThrow(RangeError)
  })
})

describe("findNonFinite", () => {
  it("is undefined when everything is finite", () => {
    expect(findNonFinite(new Map([["a", Float32Array.of(1, -2, 3.4e38)], ["b", new Float32Array(0)]]))).toBeUndefined()
  })

  it("names the first offending tensor (in map order) and index", () => {
    const grads = new Map([
      ["w0", new Float32Array(100)],
      ["w1", new Float32Array(100)],
      ["w2", Float32Array.of(Number.NaN)]
    ])
    grads.get("w1")![37] = Number.NEGATIVE_INFINITY
    grads.get("w1")![80] = Number.NaN
    expect(findNonFinite(grads)).toEqual({ name: "w1", index: 37, value: Number.NEGATIVE_INFINITY })
    grads.get("w1")![37] = 0
    expect(findNonFinite(grads)).toMatchObject({ name: "w1", index: 80 })
    grads.get("w1")![80] = 0
    expect(findNonFinite(grads)).toMatchObject({ name: "w2", index: 0 })
    grads.set("w2", Float32Array.of(0, Number.POSITIVE_INFINITY))
    expect(findNonFinite(grads)).toEqual({ name: "w2", index: 1, value: Number.POSITIVE_INFINITY })
  })
})
