// Implements: the optimizers the parameter server applies — SGD (momentum, dampening,
// Nesterov, L2 weight decay), Adam / AdamW (one implementation; amsgrad), Adagrad (lr
// decay) and RMSprop (momentum, centered) — as plain loops over Float32Array, following
// the pseudo-code of the torch.optim docs exactly (test/optim.test.ts checks them against
// vectors from real PyTorch, made by tools/refs/optim_refs.py). Also: the configs as a
// closed, JSON-serialisable union with PyTorch's defaults in one table, their validation
// (`resolveOptimizer`), and live hyperparameter changes that keep the state
// (`setHyperparams`).
// Does not own: the learning rate (shared/schedule), gradient clipping
// (shared/optim/clip.ts), aggregation of gradients, or how slots are checkpointed.
//
// Shapes: every function here works on one flat tensor of N elements; `param`, `grad` and
// every slot are Float32Array(N). One `update` is one pass over the N elements, with no
// allocation; arithmetic is in float64 registers, stored back as float32.
// Slots carry PyTorch's state names (exp_avg, exp_avg_sq, max_exp_avg_sq,
// momentum_buffer, sum, square_avg, grad_avg) so a checkpoint reads like a torch state_dict.
// Validation returns a Result (effect/Result); inside Effect code use
// `yield* Effect.fromResult(resolveOptimizer(input))` (a Result is not yieldable itself).
import * as Data from "effect/Data"
import * as Result from "effect/Result"
import { finite, nonNegative, positive, show, type Rule } from "../config/rules.ts"

// ---------------------------------------------------------------- configs

export interface SgdConfig {
  readonly kind: "sgd"
  readonly momentum: number
  readonly dampening: number
  readonly nesterov: boolean
  readonly weightDecay: number
}

/** Adam adds `weightDecay * param` to the gradient (L2); AdamW decays the param itself. */
export interface AdamConfig {
  readonly kind: "adam" | "adamw"
  readonly beta1: number
  readonly beta2: number
  readonly eps: number
  readonly weightDecay: number
  readonly amsgrad: boolean
}

export interface AdagradConfig {
  readonly kind: "adagrad"
  readonly lrDecay: number
  readonly eps: number
  readonly weightDecay: number
  readonly initialAccumulatorValue: number
}

export interface RmspropConfig {
  readonly kind: "rmsprop"
  readonly alpha: number
  readonly eps: number
  readonly momentum: number
  readonly centered: boolean
  readonly weightDecay: number
}

export type OptimizerConfig = SgdConfig | AdamConfig | AdagradConfig | RmspropConfig
export type OptimizerKind = OptimizerConfig["kind"]

interface ConfigByKind {
  readonly sgd: SgdConfig
  readonly adam: AdamConfig
  readonly adamw: AdamConfig
  readonly adagrad: AdagradConfig
  readonly rmsprop: RmspropConfig
}
type Fields<K extends OptimizerKind> = Omit<ConfigByKind[K], "kind">

/** What a job file or control message may say: the kind, and any fields to override. */
export type OptimizerInput = { [K in OptimizerKind]: { readonly kind: K } & Partial<Fields<K>> }[OptimizerKind]

/** A live change: any fields of the current kind (the kind itself cannot change). */
export type OptimizerPatch = { [K in OptimizerKind]: Partial<Fields<K>> }[OptimizerKind]

/** PyTorch's defaults (torch.optim, 2.x), the one place they live. lr is not here: it
 * comes from the schedule on every update. */
export const OPTIMIZER_DEFAULTS: { readonly [K in OptimizerKind]: Fields<K> } = {
  sgd: {
    momentum: 0, // 0 = plain SGD, no momentum_buffer slot
    dampening: 0, // momentum buffer takes (1 - dampening) of the gradient
    nesterov: false, // needs momentum > 0 and dampening 0
    weightDecay: 0 // L2: grad += weightDecay * param
  },
  adam: {
    beta1: 0.9, // decay of the first moment (exp_avg)
    beta2: 0.999, // decay of the second moment (exp_avg_sq)
    eps: 1e-8, // added to sqrt(v̂), outside the root
    weightDecay: 0, // L2: grad += weightDecay * param
    amsgrad: false // use the running max of exp_avg_sq (max_exp_avg_sq slot)
  },
  adamw: {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weightDecay: 1e-2, // decoupled: param *= 1 - lr * weightDecay
    amsgrad: false
  },
  adagrad: {
    lrDecay: 0, // lr_t = lr / (1 + (t - 1) * lrDecay)
    eps: 1e-10, // added to sqrt(sum)
    weightDecay: 0, // L2
    initialAccumulatorValue: 0 // starting value of the `sum` slot
  },
  rmsprop: {
    alpha: 0.99, // decay of square_avg
    eps: 1e-8, // added to sqrt(square_avg) (or of the centered variance)
    momentum: 0, // 0 = no momentum_buffer slot
    centered: false, // subtract grad_avg² (grad_avg slot)
    weightDecay: 0 // L2
  }
}

// ---------------------------------------------------------------- validation

export class InvalidOptimizerConfig extends Data.TaggedError("InvalidOptimizerConfig")<{
  /** the offending field, e.g. "beta2"; "kind" for an unknown kind */
  readonly field: string
  readonly value: unknown
  readonly message: string
}> {}

const invalid = (field: string, value: unknown, reason: string) =>
  new InvalidOptimizerConfig({ field, value, message: `optimizer ${field} = ${show(value)}: ${reason}` })


const unitInterval: Rule = [(v) => finite(v) && v >= 0 && v < 1, "must be in [0, 1)"]
const closedUnit: Rule = [(v) => finite(v) && v >= 0 && v <= 1, "must be in [0, 1]"]
const bool: Rule = [(v) => typeof v === "boolean", "must be true or false"]

/** One rule per field name: a field means the same thing in every kind that has it. */
const RULES: Record<string, Rule> = {
  momentum: unitInterval,
  dampening: closedUnit,
  nesterov: bool,
  weightDecay: nonNegative,
  beta1: unitInterval,
  beta2: unitInterval,
  eps: positive,
  amsgrad: bool,
  lrDecay: nonNegative,
  initialAccumulatorValue: nonNegative,
  alpha: unitInterval,
  centered: bool
}

const isKind = (k: unknown): k is OptimizerKind => typeof k === "string" && Object.hasOwn(OPTIMIZER_DEFAULTS, k)

const checkFields = (
  config: Record<string, unknown>,
  kind: OptimizerKind
): Result.Result<OptimizerConfig, InvalidOptimizerConfig> => {
  for (const [field, value] of Object.entries(config)) {
    if (field === "kind") continue
    const rule = Object.hasOwn(OPTIMIZER_DEFAULTS[kind], field) ? RULES[field] : undefined
    if (rule === undefined) return Result.fail(invalid(field, value, `is not a field of ${kind}`))
    if (!rule[0](value)) return Result.fail(invalid(field, value, rule[1]))
  }
  const c = config as unknown as OptimizerConfig
  if (c.kind === "sgd" && c.nesterov && (c.momentum <= 0 || c.dampening !== 0)) {
    return Result.fail(invalid("nesterov", true, "needs momentum > 0 and dampening = 0 (as in PyTorch)"))
  }
  return Result.succeed(c)
}

/**
 * Fill PyTorch's defaults into `input` and validate every field (finite numbers, ranges,
 * no unknown fields, Nesterov's requirements). Total: any JSON value may be passed.
 */
export const resolveOptimizer = (
  input: OptimizerInput
): Result.Result<OptimizerConfig, InvalidOptimizerConfig> => {
  const raw: unknown = input
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    return Result.fail(invalid("kind", raw, "an optimizer config must be an object with a kind"))
  }
  const kind = (raw as { kind?: unknown }).kind
  if (!isKind(kind)) {
    return Result.fail(invalid("kind", kind, `must be one of ${Object.keys(OPTIMIZER_DEFAULTS).join(", ")}`))
  }
  return checkFields({ kind, ...OPTIMIZER_DEFAULTS[kind], ...(raw as object) }, kind)
}

/**
 * A live hyperparameter change (betas, eps, weight decay, momentum value, ...): validates
 * the merged config and refuses any change of kind or of the state layout (momentum to
 * or from 0, amsgrad, centered), so the slots already held stay valid. Make a new
 * optimizer from the returned config; pass it the same slots.
 */
export const setHyperparams = (
  config: OptimizerConfig,
  patch: OptimizerPatch
): Result.Result<OptimizerConfig, InvalidOptimizerConfig> => {
  const raw = patch as Record<string, unknown>
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    return Result.fail(invalid("patch", raw, "a hyperparameter patch must be an object of fields"))
  }
  if ("kind" in raw && raw.kind !== config.kind) {
    return Result.fail(invalid("kind", raw.kind, `cannot change a live optimizer's kind (is ${config.kind})`))
  }
  const merged = checkFields({ ...config, ...raw, kind: config.kind }, config.kind)
  if (Result.isFailure(merged)) return merged
  const before = slotNamesOf(config)
  const after = slotNamesOf(merged.success)
  if (before.join() !== after.join()) {
    const field = ["momentum", "amsgrad", "centered"].find((f) => f in raw) ?? "kind"
    return Result.fail(
      invalid(field, raw[field], `changes the optimizer state (slots ${before} -> ${after}); restart from a checkpoint`)
    )
  }
  return merged
}

// ---------------------------------------------------------------- the optimizers

/** Named state tensors of one param tensor, each Float32Array(N). */
export type OptimizerSlots = Record<string, Float32Array>

export interface Optimizer {
  readonly config: OptimizerConfig
  /** the slots `initState` makes and `update` needs, in a fixed order */
  readonly slotNames: string[]
  /** fresh state for a tensor of `size` elements */
  initState(size: number): OptimizerSlots
  /**
   * Apply one step in place to `param` (and the slots); `grad` is read only.
   * `step` is the 1-based count of updates this param has had including this one
   * (Adam's bias correction, Adagrad's lr decay, SGD's first momentum step).
   */
  update(param: Float32Array, grad: Float32Array, slots: OptimizerSlots, lr: number, step: number): void
}

type Update = Optimizer["update"]

const slotNamesOf = (c: OptimizerConfig): string[] => {
  switch (c.kind) {
    case "sgd":
      return c.momentum > 0 ? ["momentum_buffer"] : []
    case "adam":
    case "adamw":
      return c.amsgrad ? ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] : ["exp_avg", "exp_avg_sq"]
    case "adagrad":
      return ["sum"]
    case "rmsprop":
      return ["square_avg", ...(c.momentum > 0 ? ["momentum_buffer"] : []), ...(c.centered ? ["grad_avg"] : [])]
  }
}

type F32 = Float32Array

// The loops below take every constant as an argument and have no branch inside: V8 runs
// a loop with even one never-taken branch about 2x slower, so variants (amsgrad,
// centered, momentum) are separate loops, and SGD's options are folded into coefficients.

/**
 * torch.optim.SGD:
 *   g ← g + λθ;  if μ≠0: b ← (t=1 ? g : μb + (1−τ)g);  g ← nesterov ? g + μb : b;  θ ← θ − γg
 * The first momentum step copies the gradient (PyTorch's empty buffer), so `step` matters
 * when dampening ≠ 0.
 */
const sgd = (c: SgdConfig): Update => {
  const { weightDecay: wd, momentum: mu, dampening, nesterov } = c
  if (mu === 0) return (param, grad, _slots, lr) => sgdLoop(param, grad, lr, wd)
  return (param, grad, slots, lr, step) => {
    const first = step === 1
    // b = bufK·b + gK·g;  d = dG·g + dB·b  (exact: the unused terms are 0·x and 1·x)
    const bufK = first ? 0 : mu
    const gK = first ? 1 : 1 - dampening
    sgdMomentumLoop(param, grad, slots.momentum_buffer, lr, wd, bufK, gK, nesterov ? 1 : 0, nesterov ? mu : 1)
  }
}

const sgdLoop = (param: F32, grad: F32, lr: number, wd: number): void => {
  for (let i = 0; i < param.length; i++) {
    const p = param[i]
    param[i] = p - lr * (grad[i] + wd * p)
  }
}

const sgdMomentumLoop = (param: F32, grad: F32, buf: F32, lr: number, wd: number, bufK: number, gK: number,
  dG: number, dB: number): void => {
  for (let i = 0; i < param.length; i++) {
    const p = param[i]
    const g = grad[i] + wd * p
    const b = bufK * buf[i] + gK * g
    buf[i] = b
    param[i] = p - lr * (dG * g + dB * b)
  }
}

/**
 * torch.optim.Adam / AdamW (one implementation; `decoupled` is the only difference):
 *   Adam: g ← g + λθ      AdamW: θ ← θ(1 − γλ)
 *   m ← β1 m + (1−β1) g;   v ← β2 v + (1−β2) g²;   amsgrad: v_max ← max(v_max, v), use v_max
 *   θ ← θ − γ/(1−β1^t) · m / (√v / √(1−β2^t) + ε)
 */
const adamFamily =
  (decoupled: boolean) =>
  (c: AdamConfig): Update =>
  (param, grad, slots, lr, step) => {
    const l2 = decoupled ? 0 : c.weightDecay
    const decay = decoupled ? 1 - lr * c.weightDecay : 1
    const stepSize = lr / (1 - c.beta1 ** step)
    const bc2Sqrt = Math.sqrt(1 - c.beta2 ** step)
    const { exp_avg: m, exp_avg_sq: v } = slots
    if (c.amsgrad) {
      adamAmsgradLoop(param, grad, m, v, slots.max_exp_avg_sq, c.beta1, c.beta2, c.eps, l2, decay, stepSize, bc2Sqrt)
    } else {
      adamLoop(param, grad, m, v, c.beta1, c.beta2, c.eps, l2, decay, stepSize, bc2Sqrt)
    }
  }

const adam = adamFamily(false)
const adamw = adamFamily(true)

const adamLoop = (param: F32, grad: F32, m: F32, v: F32, b1: number, b2: number, eps: number, l2: number,
  decay: number, stepSize: number, bc2Sqrt: number): void => {
  const k1 = 1 - b1
  const k2 = 1 - b2
  for (let i = 0; i < param.length; i++) {
    const p = param[i]
    const g = grad[i] + l2 * p
    const mi = b1 * m[i] + k1 * g
    const vi = b2 * v[i] + k2 * g * g
    m[i] = mi
    v[i] = vi
    param[i] = p * decay - (stepSize * mi) / (Math.sqrt(vi) / bc2Sqrt + eps)
  }
}

const adamAmsgradLoop = (param: F32, grad: F32, m: F32, v: F32, vMax: F32, b1: number, b2: number, eps: number,
  l2: number, decay: number, stepSize: number, bc2Sqrt: number): void => {
  const k1 = 1 - b1
  const k2 = 1 - b2
  for (let i = 0; i < param.length; i++) {
    const p = param[i]
    const g = grad[i] + l2 * p
    const mi = b1 * m[i] + k1 * g
    m[i] = mi
    v[i] = b2 * v[i] + k2 * g * g
    const vm = Math.max(vMax[i], v[i]) // of the stored float32 values, as torch.maximum
    vMax[i] = vm
    param[i] = p * decay - (stepSize * mi) / (Math.sqrt(vm) / bc2Sqrt + eps)
  }
}

/**
 * torch.optim.Adagrad:
 *   γ̃ ← γ / (1 + (t−1)η);  g ← g + λθ;  s ← s + g²;  θ ← θ − γ̃ g / (√s + ε)
 */
const adagrad =
  (c: AdagradConfig): Update =>
  (param, grad, slots, lr, step) =>
    adagradLoop(param, grad, slots.sum, lr / (1 + (step - 1) * c.lrDecay), c.weightDecay, c.eps)

const adagradLoop = (param: F32, grad: F32, sum: F32, clr: number, wd: number, eps: number): void => {
  for (let i = 0; i < param.length; i++) {
    const p = param[i]
    const g = grad[i] + wd * p
    const s = sum[i] + g * g
    sum[i] = s
    param[i] = p - (clr * g) / (Math.sqrt(s) + eps)
  }
}

/**
 * torch.optim.RMSprop:
 *   g ← g + λθ;  v ← αv + (1−α)g²;  centered: ḡ ← αḡ + (1−α)g, ṽ = v − ḡ²  else ṽ = v
 *   momentum: b ← μb + g/(√ṽ + ε), θ ← θ − γb    else θ ← θ − γ g/(√ṽ + ε)
 * The four variants (momentum or not × centered or not) are four loops.
 */
const rmsprop = (c: RmspropConfig): Update => {
  const { alpha: a, eps, weightDecay: wd, momentum: mu, centered } = c
  if (mu === 0) {
    return centered
      ? (param, grad, slots, lr) => rmspropCenteredLoop(param, grad, slots.square_avg, slots.grad_avg, a, eps, wd, lr)
      : (param, grad, slots, lr) => rmspropLoop(param, grad, slots.square_avg, a, eps, wd, lr)
  }
  return centered
    ? (param, grad, slots, lr) => {
        const { square_avg: sq, grad_avg: gAvg, momentum_buffer: buf } = slots
        rmspropCenteredMomentumLoop(param, grad, sq, gAvg, buf, a, eps, wd, mu, lr)
      }
    : (param, grad, slots, lr) =>
        rmspropMomentumLoop(param, grad, slots.square_avg, slots.momentum_buffer, a, eps, wd, mu, lr)
}

const rmspropLoop = (param: F32, grad: F32, sq: F32, a: number, eps: number, wd: number, lr: number): void => {
  const k = 1 - a
  for (let i = 0; i < param.length; i++) {
    const p = param[i]
    const g = grad[i] + wd * p
    const v = a * sq[i] + k * g * g
    sq[i] = v
    param[i] = p - (lr * g) / (Math.sqrt(v) + eps)
  }
}

const rmspropMomentumLoop = (param: F32, grad: F32, sq: F32, buf: F32, a: number, eps: number, wd: number,
  mu: number, lr: number): void => {
  const k = 1 - a
  for (let i = 0; i < param.length; i++) {
    const p = param[i]
    const g = grad[i] + wd * p
    const v = a * sq[i] + k * g * g
    sq[i] = v
    const b = mu * buf[i] + g / (Math.sqrt(v) + eps)
    buf[i] = b
    param[i] = p - lr * b
  }
}

const rmspropCenteredLoop = (param: F32, grad: F32, sq: F32, gAvg: F32, a: number, eps: number, wd: number,
  lr: number): void => {
  const k = 1 - a
  for (let i = 0; i < param.length; i++) {
    const p = param[i]
    const g = grad[i] + wd * p
    const v = a * sq[i] + k * g * g
    const ga = a * gAvg[i] + k * g
    sq[i] = v
    gAvg[i] = ga
    param[i] = p - (lr * g) / (Math.sqrt(v - ga * ga) + eps)
  }
}

const rmspropCenteredMomentumLoop = (param: F32, grad: F32, sq: F32, gAvg: F32, buf: F32, a: number, eps: number,
  wd: number, mu: number, lr: number): void => {
  const k = 1 - a
  for (let i = 0; i < param.length; i++) {
    const p = param[i]
    const g = grad[i] + wd * p
    const v = a * sq[i] + k * g * g
    const ga = a * gAvg[i] + k * g
    sq[i] = v
    gAvg[i] = ga
    const b = mu * buf[i] + g / (Math.sqrt(v - ga * ga) + eps)
    buf[i] = b
    param[i] = p - lr * b
  }
}

const updateFor = (c: OptimizerConfig): Update => {
  switch (c.kind) {
    case "sgd":
      return sgd(c)
    case "adam":
      return adam(c)
    case "adamw":
      return adamw(c)
    case "adagrad":
      return adagrad(c)
    case "rmsprop":
      return rmsprop(c)
  }
}

/**
 * The optimizer for a resolved config (from `resolveOptimizer` / `setHyperparams`; an
 * invalid one throws its InvalidOptimizerConfig). Its update checks sizes, lr and step
 * once per tensor and throws a RangeError (a bug in the caller, not a data error) when
 * they are wrong.
 */
export const makeOptimizer = (resolved: OptimizerConfig): Optimizer => {
  const checked = resolveOptimizer(resolved)
  if (Result.isFailure(checked)) throw checked.failure
  const config = checked.success
  const slotNames = slotNamesOf(config)
  const apply = updateFor(config)
  const fill = config.kind === "adagrad" ? config.initialAccumulatorValue : 0
  return {
    config,
    slotNames,
    initState(size) {
      const slots: OptimizerSlots = {}
      for (const name of slotNames) slots[name] = new Float32Array(size)
      if (fill !== 0) slots.sum.fill(fill)
      return slots
    },
    update(param, grad, slots, lr, step) {
      const n = param.length
      if (grad.length !== n) throw new RangeError(`optimizer: grad has ${grad.length} elements, param ${n}`)
      for (const name of slotNames) {
        const s = slots[name]
        if (s === undefined || s.length !== n) {
          const what = s ? `${s.length} long` : "missing"
          throw new RangeError(`optimizer ${config.kind}: slot ${name} is ${what}, param has ${n}`)
        }
      }
      if (!(lr >= 0 && Number.isFinite(lr))) throw new RangeError(`optimizer: lr must be finite and >= 0, got ${lr}`)
      if (!(Number.isInteger(step) && step >= 1)) throw new RangeError(`optimizer: step is 1-based, got ${step}`)
      apply(param, grad, slots, lr, step)
    }
  }
}
