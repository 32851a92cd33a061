// Implements: learning-rate schedules as pure functions of a clock — the update index or the
// data epoch — constant, step decay, exponential, cosine with linear warmup, linear warmup
// then linear decay — over a closed, JSON-serialisable union of configs, their defaults (one
// table) and their validation (`resolveSchedule`). Reduce-on-plateau is in the union too (its
// fields and defaults live here); its dynamic part is the state machine in shared/schedule/plateau.ts.
// Does not own: publishing the LR (the scheduler actor), plateau state, optimizers, knowing
// which epoch an update belongs to (the caller passes it).
//
// Step indexing: `lrAt(s, k)` is the lr of update k, where k = 0 is the first update —
// PyTorch's `last_epoch` when `scheduler.step()` is called once after every
// `optimizer.step()`. test/schedule.test.ts checks the curves against torch
// (tools/refs/optim_refs.py):
//   step         lr·γ^⌊k/stepSize⌋                                  = StepLR(step_size, gamma)
//   exponential  lr·γ^k                                              = ExponentialLR(gamma)
//   cosine       k < W: lr·(k+1)/(W+1) (nanoGPT's warmup: never 0, peaks at k = W)
//                W ≤ k ≤ T: minLr + (lr−minLr)·(1 + cos(π(k−W)/(T−W)))/2
//                = CosineAnnealingLR(T_max = T−W, eta_min = minLr) started at k = W
//                k ≥ T: minLr (torch's CosineAnnealingLR would climb back up: we hold)
//   linear       same warmup; then lr + (minLr−lr)·(k−W)/(T−W), minLr from k = T on
//                = LinearLR(1 → minLr/lr, total_iters = T−W) started at k = W
//   plateau      lrAt gives the base lr; the current lr is plateau.ts's state.lr
// (W = warmupSteps, T = totalSteps.)
//
// The clock, `per`: step, exponential, cosine and linear take `per: "step" | "epoch"`
// (default "step"). With `per: "epoch"` the k above is the data epoch (0 = the first epoch)
// passed as `lrAt(s, step, epoch)`, and stepSize, warmupSteps and totalSteps count epochs:
// torch's schedulers stepped once per epoch, or Keras's LearningRateScheduler, e.g.
// { kind: step, per: epoch, lr: 0.01, gamma: 0.1, every: 10 } is 0.01·0.1^⌊epoch/10⌋.
// constant and plateau have no clock and refuse `per` (plateau moves on validation losses).
// `every` is another name for step's `stepSize` (Keras's wording); giving both is an error.
// Canonical form of a resolved schedule (so that resolving it again gives it back, as
// state.ts's parseState does with checkpoints): `stepSize`, never `every`; `per` only when
// it is "epoch" (absent means "step").
import * as Data from "effect/Data"
import * as Result from "effect/Result"
import { finite, nonNegative, show, type Rule } from "../config/rules.ts"
import { lrProblem } from "../protocol/limits.ts"

/** What a schedule's k counts: updates (0 = the first update) or data epochs (0 = the first epoch). */
export type ScheduleClock = "step" | "epoch"
/** The clock of a schedule without `per`. Not in SCHEDULE_DEFAULTS: a resolved schedule omits the default clock. */
export const DEFAULT_CLOCK: ScheduleClock = "step"

export interface ConstantSchedule {
  readonly kind: "constant"
  readonly lr: number
}
export interface StepSchedule {
  readonly kind: "step"
  readonly per?: ScheduleClock
  readonly lr: number
  /** updates (or epochs, per: "epoch") between two multiplications by gamma; input may say `every` */
  readonly stepSize: number
  readonly gamma: number
}
export interface ExponentialSchedule {
  readonly kind: "exponential"
  readonly per?: ScheduleClock
  readonly lr: number
  readonly gamma: number
}
/** Warmup over `warmupSteps` updates (or epochs), then decay to `minLr` at update (epoch) `totalSteps`. */
export interface WarmupDecaySchedule {
  readonly kind: "cosine" | "linear"
  readonly per?: ScheduleClock
  readonly lr: number
  readonly warmupSteps: number
  readonly totalSteps: number
  readonly minLr: number
}

/** torch.optim.lr_scheduler.ReduceLROnPlateau's knobs (min_lr → minLr, threshold_mode → thresholdMode). */
export interface PlateauParams {
  readonly mode: "min" | "max"
  readonly factor: number
  readonly patience: number
  readonly threshold: number
  readonly thresholdMode: "rel" | "abs"
  readonly cooldown: number
  readonly minLr: number
  readonly eps: number
}
export interface PlateauSchedule extends PlateauParams {
  readonly kind: "plateau"
  /** the lr before any reduction */
  readonly lr: number
}

interface ScheduleByKind {
  readonly constant: ConstantSchedule
  readonly step: StepSchedule
  readonly exponential: ExponentialSchedule
  readonly cosine: WarmupDecaySchedule
  readonly linear: WarmupDecaySchedule
  readonly plateau: PlateauSchedule
}

export type Schedule = ConstantSchedule | StepSchedule | ExponentialSchedule | WarmupDecaySchedule | PlateauSchedule
export type ScheduleKind = Schedule["kind"]

/** What a job file or `set-schedule` may say: required fields, and optional ones with defaults. */
export type ScheduleInput =
  | ConstantSchedule
  | (Omit<StepSchedule, "gamma" | "stepSize"> & { readonly gamma?: number } & (
    | { readonly stepSize: number; readonly every?: never }
    | { readonly every: number; readonly stepSize?: never }
  ))
  | ExponentialSchedule
  | (Omit<WarmupDecaySchedule, "warmupSteps" | "minLr"> & Partial<Pick<WarmupDecaySchedule, "warmupSteps" | "minLr">>)
  | ({ readonly kind: "plateau"; readonly lr: number } & Partial<PlateauParams>)

/** Optional fields' defaults, the one place they live (PyTorch's where it has them). */
export const SCHEDULE_DEFAULTS = {
  constant: {},
  step: { gamma: 0.1 }, // StepLR's default
  exponential: {},
  cosine: { warmupSteps: 0, minLr: 0 },
  linear: { warmupSteps: 0, minLr: 0 },
  plateau: {
    mode: "min", // a lower metric (loss) is better
    factor: 0.1, // lr ← max(lr·factor, minLr) on a plateau
    patience: 10, // observations without improvement tolerated before reducing
    threshold: 1e-4, // how much better counts as better
    thresholdMode: "rel", // rel: better than best·(1∓threshold); abs: best∓threshold
    cooldown: 0, // observations after a reduction during which bad ones are not counted
    minLr: 0, // floor
    eps: 1e-8 // a reduction smaller than this is skipped
  }
} as const satisfies { readonly [K in ScheduleKind]: Partial<Omit<ScheduleByKind[K], "kind">> }

/** The fields each kind has (required ones are those without a default). */
const FIELDS: { readonly [K in ScheduleKind]: ReadonlyArray<string> } = {
  constant: ["lr"],
  step: ["lr", "stepSize", "gamma"],
  exponential: ["lr", "gamma"],
  cosine: ["lr", "warmupSteps", "totalSteps", "minLr"],
  linear: ["lr", "warmupSteps", "totalSteps", "minLr"],
  plateau: ["lr", "mode", "factor", "patience", "threshold", "thresholdMode", "cooldown", "minLr", "eps"]
}

// ---------------------------------------------------------------- validation

export class InvalidScheduleConfig extends Data.TaggedError("InvalidScheduleConfig")<{
  /** the offending field, e.g. "totalSteps"; "kind" for an unknown kind */
  readonly field: string
  readonly value: unknown
  readonly message: string
}> {}

const invalid = (field: string, value: unknown, reason: string) =>
  new InvalidScheduleConfig({ field, value, message: `schedule ${field} = ${show(value)}: ${reason}` })


const count: Rule = [(v) => Number.isSafeInteger(v) && (v as number) >= 0, "must be an integer >= 0"]

/** an LR: finite, >= 0, at most MAX_LR (shared/protocol/limits.ts: what every actor holds LRs to). */
const lrRule: Rule = [(v) => lrProblem(v) === undefined, "must be a finite number in [0, 10] (MAX_LR)"]

const RULES: Record<string, Rule> = {
  lr: lrRule,
  stepSize: [(v) => Number.isSafeInteger(v) && (v as number) >= 1, "must be an integer >= 1"],
  gamma: [(v) => finite(v) && v > 0, "must be a finite number > 0"],
  warmupSteps: count,
  totalSteps: count,
  minLr: lrRule,
  mode: [(v) => v === "min" || v === "max", 'must be "min" or "max"'],
  factor: [(v) => finite(v) && v > 0 && v < 1, "must be in (0, 1)"],
  patience: count,
  threshold: nonNegative,
  thresholdMode: [(v) => v === "rel" || v === "abs", 'must be "rel" or "abs"'],
  cooldown: count,
  eps: nonNegative
}

const isKind = (k: unknown): k is ScheduleKind => typeof k === "string" && Object.hasOwn(FIELDS, k)

/** The kinds that take `per`. */
const CLOCKED: ReadonlyArray<ScheduleKind> = ["step", "exponential", "cosine", "linear"]
/** Other names an input may use for a field: alias → canonical (a resolved schedule has the canonical one). */
const ALIASES: { readonly [K in ScheduleKind]?: Readonly<Record<string, string>> } = {
  step: { every: "stepSize" }
}

/**
 * Fill the defaults into `input` and validate it: finite numbers in range, integer step
 * counts, required fields present, no unknown fields, totalSteps > warmupSteps,
 * minLr ≤ lr, `per` only on the kinds with a clock, an alias or its field but not both.
 * Returns the canonical form (see the header), so resolving a result again gives it back.
 * Total: any JSON value may be passed.
 */
export const resolveSchedule = (input: ScheduleInput): Result.Result<Schedule, InvalidScheduleConfig> => {
  const raw: unknown = input
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    return Result.fail(invalid("kind", raw, "a schedule must be an object with a kind"))
  }
  const kind = (raw as { kind?: unknown }).kind
  if (!isKind(kind)) return Result.fail(invalid("kind", kind, `must be one of ${Object.keys(FIELDS).join(", ")}`))
  const fields = FIELDS[kind]
  const aliases = ALIASES[kind] ?? {}
  const given: Record<string, unknown> = { ...(raw as Record<string, unknown>) }
  for (const field of Object.keys(given)) {
    if (field === "kind" || fields.includes(field) || Object.hasOwn(aliases, field)) continue
    if (field === "per" && !CLOCKED.includes(kind)) {
      const why = kind === "plateau" ? " (it follows validation losses)" : ""
      return Result.fail(invalid("per", given.per, `${kind} has no clock${why}: per is for ${CLOCKED.join(", ")} only`))
    }
    if (field !== "per") return Result.fail(invalid(field, given[field], `is not a field of ${kind}`))
  }
  if (given.per !== undefined && given.per !== "step" && given.per !== "epoch") {
    return Result.fail(invalid("per", given.per, 'must be "step" or "epoch"'))
  }
  if (given.per !== "epoch") delete given.per // canonical: the default clock is left out
  for (const [alias, field] of Object.entries(aliases)) {
    if (given[alias] === undefined) {
      delete given[alias]
      continue
    }
    if (given[field] !== undefined) {
      return Result.fail(invalid(alias, given[alias], `is another name for ${field}: give one of them, not both`))
    }
    const [ok, reason] = RULES[field]
    if (!ok(given[alias])) return Result.fail(invalid(alias, given[alias], reason))
    given[field] = given[alias]
    delete given[alias]
  }
  const merged: Record<string, unknown> = { kind, ...SCHEDULE_DEFAULTS[kind], ...given }
  for (const field of fields) {
    const value = merged[field]
    if (value === undefined) return Result.fail(invalid(field, value, `is required for ${kind}`))
    const [ok, reason] = RULES[field]
    if (!ok(value)) return Result.fail(invalid(field, value, reason))
  }
  const s = merged as unknown as Schedule
  if ((s.kind === "cosine" || s.kind === "linear") && s.totalSteps <= s.warmupSteps) {
    return Result.fail(invalid("totalSteps", s.totalSteps, `must be > warmupSteps (${s.warmupSteps})`))
  }
  if ((s.kind === "cosine" || s.kind === "linear" || s.kind === "plateau") && s.minLr > s.lr) {
    return Result.fail(invalid("minLr", s.minLr, `must be <= lr (${s.lr})`))
  }
  return Result.succeed(s)
}

// ---------------------------------------------------------------- the curves

/**
 * The lr of update `step` (0 = the first update), which falls in data epoch `epoch`
 * (0 = the first epoch), under a resolved schedule: a `per: "epoch"` schedule reads
 * `epoch`, every other one `step`. Both are checked (integers >= 0) whichever is read.
 */
export const lrAt = (schedule: Schedule, step: number, epoch = 0): number => {
  if (!(Number.isSafeInteger(step) && step >= 0)) throw new RangeError(`lrAt: step is an integer >= 0, got ${step}`)
  if (!(Number.isSafeInteger(epoch) && epoch >= 0)) throw new RangeError(`lrAt: epoch is an integer >= 0, got ${epoch}`)
  switch (schedule.kind) {
    case "constant":
    case "plateau":
      return schedule.lr
    case "step":
    case "exponential":
    case "cosine":
    case "linear":
      return curve(schedule, (schedule.per ?? DEFAULT_CLOCK) === "epoch" ? epoch : step)
  }
}

/** The formulas of the header, at k on the schedule's own clock. */
const curve = (schedule: StepSchedule | ExponentialSchedule | WarmupDecaySchedule, k: number): number => {
  switch (schedule.kind) {
    case "step":
      return schedule.lr * schedule.gamma ** Math.floor(k / schedule.stepSize)
    case "exponential":
      return schedule.lr * schedule.gamma ** k
    case "cosine":
    case "linear": {
      const { lr, warmupSteps: w, totalSteps: t, minLr } = schedule
      if (k < w) return (lr * (k + 1)) / (w + 1)
      if (k >= t) return minLr
      const progress = (k - w) / (t - w)
      return schedule.kind === "cosine"
        ? minLr + ((lr - minLr) * (1 + Math.cos(Math.PI * progress))) / 2
        : lr + (minLr - lr) * progress
    }
  }
}
