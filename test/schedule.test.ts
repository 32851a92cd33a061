// Checks shared/schedule: the LR curves against torch.optim.lr_scheduler's
// (test/fixtures/optim-refs.json, made by tools/refs/optim_refs.py) and against values
// worked out by hand, reduce-on-plateau against torch's ReduceLROnPlateau, and validation.
// Run: npx vitest run test/schedule.test.ts
import { readFileSync } from "node:fs"
import * as Result from "effect/Result"
import { describe, expect, it } from "vitest"
import { plateauInit, plateauObserve } from "../shared/schedule/plateau.ts"
import type { PlateauState } from "../shared/schedule/plateau.ts"
import { initialState, lrFrom, parseState, setLr } from "../shared/schedule/state.ts"
import { lrAt, resolveSchedule, SCHEDULE_DEFAULTS } from "../shared/schedule/schedules.ts"
import type { InvalidScheduleConfig, PlateauSchedule, Schedule, ScheduleInput } from "../shared/schedule/schedules.ts"

interface Refs {
  readonly torch: string
  readonly schedules: ReadonlyArray<{ name: string; config: ScheduleInput; torch: string; lrs: number[] }>
  readonly plateau: ReadonlyArray<{
    name: string
    config: ScheduleInput
    torch: string
    losses: number[]
    lrs: number[]
  }>
}
const refs: Refs = JSON.parse(readFileSync(new URL("./fixtures/optim-refs.json", import.meta.url), "utf8"))

const ok = (input: ScheduleInput): Schedule => {
  const r = resolveSchedule(input)
  if (Result.isFailure(r)) throw new Error(r.failure.message)
  return r.success
}
const failure = (input: unknown): InvalidScheduleConfig => {
  const r = resolveSchedule(input as ScheduleInput)
  if (Result.isSuccess(r)) throw new Error(`expected a failure, got ${JSON.stringify(r.success)}`)
  return r.failure
}

/** |a−b| relative to |b| (absolute near 0) — torch computes the same curves in float64. */
const close = (a: number, b: number, tol = 1e-12) => Math.abs(a - b) <= tol * Math.max(Math.abs(b), 1e-3)

describe(`schedules vs torch.optim.lr_scheduler ${refs.torch}`, () => {
  it("the fixture covers every kind but plateau (tested below)", () => {
    const kinds = new Set(refs.schedules.map((s) => s.config.kind))
    expect([...kinds, "plateau"].sort()).toEqual(Object.keys(SCHEDULE_DEFAULTS).sort())
  })

  for (const ref of refs.schedules) {
    it(`${ref.name} = ${ref.torch}`, () => {
      const s = ok(ref.config)
      const ours = ref.lrs.map((_, k) => lrAt(s, k))
      const bad = ours.flatMap((lr, k) => (close(lr, ref.lrs[k], 1e-9) ? [] : [`k=${k}: ${lr} vs torch ${ref.lrs[k]}`]))
      expect(bad, `${ref.name}: step k = 0 is the first update (torch's last_epoch)`).toEqual([])
    })
  }
})

describe("schedules by hand", () => {
  it("constant", () => {
    const s = ok({ kind: "constant", lr: 3e-4 })
    expect([0, 1, 1_000_000].map((k) => lrAt(s, k))).toEqual([3e-4, 3e-4, 3e-4])
  })

  it("step decay multiplies by gamma every stepSize updates", () => {
    const s = ok({ kind: "step", lr: 1, stepSize: 2, gamma: 0.5 })
    expect([0, 1, 2, 3, 4, 5, 6].map((k) => lrAt(s, k))).toEqual([1, 1, 0.5, 0.5, 0.25, 0.25, 0.125])
    expect(lrAt(ok({ kind: "step", lr: 1, stepSize: 1 }), 2)).toBeCloseTo(0.01, 15) // gamma defaults to 0.1
  })

  it("exponential", () => {
    const s = ok({ kind: "exponential", lr: 2, gamma: 0.5 })
    expect([0, 1, 2, 10].map((k) => lrAt(s, k))).toEqual([2, 1, 0.5, 2 / 1024])
  })

  it("cosine with warmup: (k+1)/(W+1) ramp, peak at k = W, half way at the middle, minLr from T on", () => {
    const s = ok({ kind: "cosine", lr: 0.1, warmupSteps: 4, totalSteps: 14, minLr: 0.002 })
    expect(lrAt(s, 0)).toBeCloseTo(0.02, 15)
    expect(lrAt(s, 3)).toBeCloseTo(0.08, 15)
    expect(lrAt(s, 4)).toBe(0.1)
    expect(lrAt(s, 9)).toBeCloseTo(0.051, 15) // (lr + minLr) / 2
    expect(lrAt(s, 14)).toBe(0.002)
    // torch's CosineAnnealingLR would climb back towards lr after T_max; we hold minLr
    expect([15, 20, 1000].map((k) => lrAt(s, k))).toEqual([0.002, 0.002, 0.002])
    // without warmup the first update already gets the full lr
    expect(lrAt(ok({ kind: "cosine", lr: 0.1, totalSteps: 10 }), 0)).toBe(0.1)
  })

  it("cosine is monotone: up during warmup, down after", () => {
    const s = ok({ kind: "cosine", lr: 1, warmupSteps: 10, totalSteps: 100, minLr: 0.1 })
    const lrs = Array.from({ length: 110 }, (_, k) => lrAt(s, k))
    for (let k = 1; k <= 10; k++) expect(lrs[k]).toBeGreaterThan(lrs[k - 1])
    for (let k = 11; k < 110; k++) expect(lrs[k]).toBeLessThanOrEqual(lrs[k - 1])
    expect(Math.min(...lrs.slice(10))).toBe(0.1)
  })

  it("linear warmup then linear decay", () => {
    const s = ok({ kind: "linear", lr: 1, warmupSteps: 1, totalSteps: 5, minLr: 0.2 })
    const lrs = [0, 1, 2, 3, 4, 5, 6].map((k) => lrAt(s, k))
    ;[0.5, 1, 0.8, 0.6, 0.4, 0.2, 0.2].forEach((want, k) => expect(lrs[k]).toBeCloseTo(want, 14))
  })

  it("plateau's lrAt is its base lr (the dynamic lr is plateau.ts's state)", () => {
    expect(lrAt(ok({ kind: "plateau", lr: 0.3 }), 99)).toBe(0.3)
  })

  it("refuses a step that is not an integer >= 0", () => {
    const s = ok({ kind: "constant", lr: 1 })
    expect(() => lrAt(s, -1)).toThrow(RangeError)
    expect(() => lrAt(s, 1.5)).toThrow(RangeError)
    expect(() => lrAt(s, Number.NaN)).toThrow(RangeError)
  })
})

describe("resolveSchedule", () => {
  it("fills defaults and is JSON-serialisable", () => {
    expect(ok({ kind: "cosine", lr: 0.1, totalSteps: 100 })).toEqual({
      kind: "cosine",
      lr: 0.1,
      totalSteps: 100,
      warmupSteps: 0,
      minLr: 0
    })
    const p = ok({ kind: "plateau", lr: 0.1 })
    expect(p).toEqual({
      kind: "plateau",
      lr: 0.1,
      mode: "min",
      factor: 0.1,
      patience: 10,
      threshold: 1e-4,
      thresholdMode: "rel",
      cooldown: 0,
      minLr: 0,
      eps: 1e-8
    })
    expect(ok(JSON.parse(JSON.stringify(p)))).toEqual(p)
  })

  const bad: ReadonlyArray<readonly [unknown, string]> = [
    [{ kind: "constant" }, "lr"],
    [{ kind: "constant", lr: -1 }, "lr"],
    [{ kind: "constant", lr: Number.POSITIVE_INFINITY }, "lr"],
    [{ kind: "constant", lr: "0.1" }, "lr"],
    [{ kind: "step", lr: 0.1 }, "stepSize"],
    [{ kind: "step", lr: 0.1, stepSize: 0 }, "stepSize"],
    [{ kind: "step", lr: 0.1, stepSize: 2.5 }, "stepSize"],
    [{ kind: "step", lr: 0.1, stepSize: 2, gamma: 0 }, "gamma"],
    [{ kind: "exponential", lr: 0.1 }, "gamma"],
    [{ kind: "exponential", lr: 0.1, gamma: Number.NaN }, "gamma"],
    [{ kind: "cosine", lr: 0.1 }, "totalSteps"],
    [{ kind: "cosine", lr: 0.1, totalSteps: 10, warmupSteps: 10 }, "totalSteps"],
    [{ kind: "cosine", lr: 0.1, totalSteps: 10, warmupSteps: -1 }, "warmupSteps"],
    [{ kind: "linear", lr: 0.1, totalSteps: 10, minLr: 0.2 }, "minLr"],
    [{ kind: "linear", lr: 0.1, totalSteps: 10, min_lr: 0 }, "min_lr"],
    [{ kind: "constant", lr: 0.1, gamma: 0.5 }, "gamma"],
    [{ kind: "plateau", lr: 0.1, factor: 1 }, "factor"],
    [{ kind: "plateau", lr: 0.1, mode: "minimum" }, "mode"],
    [{ kind: "plateau", lr: 0.1, thresholdMode: "relative" }, "thresholdMode"],
    [{ kind: "plateau", lr: 0.1, patience: -1 }, "patience"],
    [{ kind: "plateau", lr: 0.1, cooldown: 0.5 }, "cooldown"],
    [{ kind: "plateau", lr: 0.1, threshold: -1e-4 }, "threshold"],
    [{ kind: "plateau", lr: 0.1, eps: Number.NaN }, "eps"],
    [{ kind: "plateau", lr: 0.1, minLr: 1 }, "minLr"],
    [{ kind: "onecycle", lr: 0.1 }, "kind"],
    [null, "kind"],
    [[], "kind"]
  ]
  for (const [input, field] of bad) {
    it(`rejects ${JSON.stringify(input)} naming ${field}`, () => {
      const e = failure(input)
      expect(e._tag).toBe("InvalidScheduleConfig")
      expect(e.field).toBe(field)
      expect(e.message).toContain(field)
    })
  }
})

describe(`reduce-on-plateau vs torch's ReduceLROnPlateau ${refs.torch}`, () => {
  for (const ref of refs.plateau) {
    it(`${ref.name}: ${ref.torch}`, () => {
      const s = ok(ref.config) as PlateauSchedule
      let state = plateauInit(s, s.lr)
      let prev = s.lr
      const lrs: number[] = []
      for (const loss of ref.losses) {
        const out = plateauObserve(state, loss)
        expect(out.lr).toBe(out.state.lr)
        expect(out.reduced).toBe(out.lr !== prev)
        prev = out.lr
        state = out.state
        lrs.push(out.lr)
      }
      expect(lrs).toEqual(ref.lrs) // same float64 arithmetic, same order: exactly equal
      expect(state.observed).toBe(ref.losses.length)
    })
  }

  it("the fixture exercises reductions, cooldown, the minLr floor and the eps cut-off", () => {
    const byName = new Map(refs.plateau.map((p) => [p.name, p]))
    const last = (name: string) => byName.get(name)!.lrs.at(-1)!
    expect(last("min_rel")).toBeLessThan(0.1 / 8)
    expect(last("min_abs_cooldown_minlr")).toBe(0.004)
    expect(last("max_rel")).toBeCloseTo(1e-8, 20) // stopped: the next cut (9e-9) is below eps 1e-8
    const eps = byName.get("max_abs_eps")!.lrs
    expect(eps.at(-1)).toBe(eps.at(-2))
  })

  it("is pure and its state survives a JSON round trip (checkpoints)", () => {
    const s = ok({ kind: "plateau", lr: 1, patience: 1, factor: 0.5, cooldown: 1 }) as PlateauSchedule
    const losses = [1, 1, 1, 1, 0.5, 0.6, 0.7, 0.8, 0.9]
    const run = (from: PlateauState, xs: number[]) => xs.reduce((st, x) => plateauObserve(st, x).state, from)
    const init = plateauInit(s, s.lr)
    const snapshot = JSON.stringify(init)
    const mid = run(init, losses.slice(0, 4))
    expect(JSON.stringify(init)).toBe(snapshot) // not mutated
    const restored: PlateauState = JSON.parse(JSON.stringify(mid))
    expect(restored).toEqual(mid)
    expect(run(restored, losses.slice(4))).toEqual(run(init, losses))
  })

  it("counts a non-finite metric as a bad observation and never as the best", () => {
    const s = ok({ kind: "plateau", lr: 1, patience: 1, factor: 0.5 }) as PlateauSchedule
    let st = plateauObserve(plateauInit(s, 1), Number.NaN).state
    expect(st.best).toBeNull()
    expect(st.numBad).toBe(1)
    st = plateauObserve(st, Number.NEGATIVE_INFINITY).state
    expect(st.best).toBeNull()
    expect(st.lr).toBe(0.5)
    expect(JSON.parse(JSON.stringify(st))).toEqual(st)
  })
})

describe("per: epoch — the schedule's clock is the data epoch", () => {
  const steps = [0, 1, 7, 999, 123_456]

  it("the seed's step schedule is Keras's 0.01 * 0.1 ** (epoch // 10), whatever the step", () => {
    const s = ok({ kind: "step", per: "epoch", lr: 0.01, gamma: 0.1, every: 10 })
    expect(s).toEqual({ kind: "step", per: "epoch", lr: 0.01, gamma: 0.1, stepSize: 10 }) // every → stepSize
    for (let epoch = 0; epoch < 50; epoch++) {
      const want = 0.01 * 0.1 ** Math.floor(epoch / 10)
      for (const step of steps) expect(lrAt(s, step, epoch)).toBe(want)
    }
  })

  it("exponential per epoch is lr·γ^epoch", () => {
    const s = ok({ kind: "exponential", per: "epoch", lr: 2, gamma: 0.5 })
    for (let epoch = 0; epoch < 20; epoch++) for (const step of steps) expect(lrAt(s, step, epoch)).toBe(2 * 0.5 ** epoch)
  })

  it("cosine per epoch counts warmupSteps and totalSteps in epochs", () => {
    const byEpoch = ok({ kind: "cosine", per: "epoch", lr: 0.1, warmupSteps: 4, totalSteps: 14, minLr: 0.002 })
    const byStep = ok({ kind: "cosine", lr: 0.1, warmupSteps: 4, totalSteps: 14, minLr: 0.002 })
    for (let epoch = 0; epoch < 30; epoch++) {
      for (const step of steps) expect(lrAt(byEpoch, step, epoch)).toBe(lrAt(byStep, epoch))
    }
    expect(lrAt(byEpoch, 10_000, 0)).toBeCloseTo(0.02, 15) // warmup: (0+1)/(4+1) at epoch 0, however many updates in
    expect(lrAt(byEpoch, 0, 4)).toBe(0.1) // peak at epoch W
    expect(lrAt(byEpoch, 0, 9)).toBeCloseTo(0.051, 15)
    expect(lrAt(byEpoch, 0, 14)).toBe(0.002)
    const linear = ok({ kind: "linear", per: "epoch", lr: 1, warmupSteps: 1, totalSteps: 5, minLr: 0.2 })
    ;[0.5, 1, 0.8, 0.6, 0.4, 0.2, 0.2].forEach((want, epoch) => expect(lrAt(linear, 99, epoch)).toBeCloseTo(want, 14))
  })

  it('per: "step" and no per are the same canonical schedule, which ignores the epoch', () => {
    const inputs: ReadonlyArray<ScheduleInput> = [
      { kind: "step", lr: 1, stepSize: 2, gamma: 0.5 },
      { kind: "exponential", lr: 2, gamma: 0.5 },
      { kind: "cosine", lr: 0.1, warmupSteps: 4, totalSteps: 14, minLr: 0.002 },
      { kind: "linear", lr: 1, warmupSteps: 1, totalSteps: 5, minLr: 0.2 }
    ]
    for (const input of inputs) {
      const plain = ok(input)
      const explicit = ok({ ...input, per: "step" } as ScheduleInput)
      expect(explicit).toEqual(plain)
      expect("per" in explicit).toBe(false)
      for (let k = 0; k < 20; k++) {
        for (const epoch of [0, 3, 50]) expect(lrAt(explicit, k, epoch)).toBe(lrAt(plain, k))
      }
    }
    expect([0, 1, 2, 3, 4].map((k) => lrAt(ok({ kind: "step", per: "step", lr: 1, every: 2, gamma: 0.5 }), k, 7))).toEqual([1, 1, 0.5, 0.5, 0.25])
  })

  it("every and stepSize are the same field; resolved schedules say stepSize", () => {
    expect(ok({ kind: "step", lr: 0.1, every: 3 })).toEqual(ok({ kind: "step", lr: 0.1, stepSize: 3 }))
    expect(ok({ kind: "step", lr: 0.1, every: 3 })).toEqual({ kind: "step", lr: 0.1, stepSize: 3, gamma: 0.1 })
  })

  const bad: ReadonlyArray<readonly [unknown, string, RegExp]> = [
    [{ kind: "step", lr: 0.1, every: 10, stepSize: 10 }, "every", /another name for stepSize/],
    [{ kind: "step", lr: 0.1, every: 0 }, "every", /integer >= 1/],
    [{ kind: "step", lr: 0.1, every: 2.5 }, "every", /integer >= 1/],
    [{ kind: "step", lr: 0.1, per: "epoch" }, "stepSize", /required/],
    [{ kind: "step", lr: 0.1, every: 10, per: "epochs" }, "per", /"step" or "epoch"/],
    [{ kind: "cosine", lr: 0.1, totalSteps: 10, per: "batch" }, "per", /"step" or "epoch"/],
    [{ kind: "exponential", lr: 0.1, gamma: 0.9, per: 1 }, "per", /"step" or "epoch"/],
    [{ kind: "cosine", lr: 0.1, totalSteps: 5, warmupSteps: 5, per: "epoch" }, "totalSteps", /> warmupSteps/],
    [{ kind: "constant", lr: 0.1, per: "epoch" }, "per", /constant has no clock/],
    [{ kind: "plateau", lr: 0.1, per: "step" }, "per", /plateau has no clock/],
    [{ kind: "exponential", lr: 0.1, gamma: 0.9, every: 2 }, "every", /not a field of exponential/]
  ]
  for (const [input, field, why] of bad) {
    it(`rejects ${JSON.stringify(input)} naming ${field}`, () => {
      const e = failure(input)
      expect(e._tag).toBe("InvalidScheduleConfig")
      expect(e.field).toBe(field)
      expect(e.message).toContain(`schedule ${field} =`)
      expect(e.message).toMatch(why)
    })
  }

  it("refuses an epoch that is not an integer >= 0", () => {
    for (const s of [ok({ kind: "step", per: "epoch", lr: 1, every: 1 }), ok({ kind: "constant", lr: 1 })]) {
      expect(() => lrAt(s, 0, -1)).toThrow(/epoch/)
      expect(() => lrAt(s, 0, 1.5)).toThrow(RangeError)
      expect(() => lrAt(s, 0, Number.NaN)).toThrow(RangeError)
    }
  })

  it("resolve is idempotent on every kind, through JSON too (checkpoints re-resolve)", () => {
    const inputs: ReadonlyArray<ScheduleInput> = [
      { kind: "constant", lr: 0.1 },
      { kind: "step", lr: 0.1, stepSize: 3 },
      { kind: "step", lr: 0.1, every: 3, per: "epoch" },
      { kind: "step", lr: 0.1, every: 3, per: "step" },
      { kind: "exponential", lr: 0.1, gamma: 0.9 },
      { kind: "exponential", lr: 0.1, gamma: 0.9, per: "epoch" },
      { kind: "cosine", lr: 0.1, totalSteps: 10 },
      { kind: "cosine", lr: 0.1, totalSteps: 10, warmupSteps: 2, per: "epoch" },
      { kind: "linear", lr: 0.1, totalSteps: 10, minLr: 0.01, per: "step" },
      { kind: "linear", lr: 0.1, totalSteps: 10, per: "epoch" },
      { kind: "plateau", lr: 0.1, patience: 2 }
    ]
    expect(new Set(inputs.map((i) => i.kind)).size).toBe(Object.keys(SCHEDULE_DEFAULTS).length)
    for (const input of inputs) {
      const once = ok(input)
      expect(ok(once)).toEqual(once)
      expect(ok(JSON.parse(JSON.stringify(once)))).toEqual(once)
      expect("every" in once).toBe(false)
      const state = parseState(JSON.parse(JSON.stringify(initialState(once))))
      expect(state?.schedule).toEqual(once)
    }
  })

  it("lrFrom passes the epoch through; a set-lr override still wins, keyed by step", () => {
    const base = initialState(ok({ kind: "step", per: "epoch", lr: 0.01, gamma: 0.1, every: 10 }))
    expect(lrFrom(base, 5, 0)).toBe(0.01)
    expect(lrFrom(base, 5, 25)).toBeCloseTo(1e-4, 18)
    expect(lrFrom(base, 5)).toBe(0.01) // epoch defaults to 0
    const held = setLr(base, 0.5, 100)
    expect(lrFrom(held, 99, 25)).toBeCloseTo(1e-4, 18) // before the override's step: the schedule
    expect(lrFrom(held, 100, 0)).toBe(0.5)
    expect(lrFrom(held, 100, 49)).toBe(0.5)
    const plateau = initialState(ok({ kind: "plateau", lr: 0.3 }))
    expect(lrFrom(plateau, 10, 10)).toBe(0.3) // plateau ignores the clock
  })
})
