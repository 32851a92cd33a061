// Implements: reduce-on-plateau as a pure state machine with the semantics of
// torch.optim.lr_scheduler.ReduceLROnPlateau (checked against it by
// test/schedule.test.ts): observe a metric, count observations without improvement, and
// after more than `patience` of them multiply the lr by `factor` (floored at `minLr`,
// skipped if the change is below `eps`), then ignore `cooldown` observations.
// The state is plain JSON data (it goes into checkpoints); each call returns a new one.
// Does not own: the config's fields, defaults and validation (shared/schedule/schedules.ts,
// kind "plateau"), where metrics come from, publishing the lr.
//
// One deliberate difference: torch's `best` starts at ±inf; here it is `null` until the
// first improvement (JSON has no infinities), and a non-finite metric is always a bad
// observation (torch would make −inf the best in min mode, which no loss should be).
import type { PlateauParams } from "./schedules.ts"

export interface PlateauState {
  readonly params: PlateauParams
  /** the current lr */
  readonly lr: number
  /** the best metric so far; null before any (torch: +inf in min mode, −inf in max) */
  readonly best: number | null
  /** observations since the last improvement (torch: num_bad_epochs) */
  readonly numBad: number
  /** observations still to ignore after a reduction (torch: cooldown_counter) */
  readonly cooldownLeft: number
  /** observations so far (torch: last_epoch) */
  readonly observed: number
}

export interface PlateauStep {
  readonly state: PlateauState
  /** the lr to use from now on (= state.lr) */
  readonly lr: number
  /** whether this observation lowered the lr */
  readonly reduced: boolean
}

/** Fresh state for resolved plateau params (a resolved `kind: "plateau"` schedule will do) and a starting lr. */
export const plateauInit = (cfg: PlateauParams, lr: number): PlateauState => ({
  params: {
    mode: cfg.mode,
    factor: cfg.factor,
    patience: cfg.patience,
    threshold: cfg.threshold,
    thresholdMode: cfg.thresholdMode,
    cooldown: cfg.cooldown,
    minLr: cfg.minLr,
    eps: cfg.eps
  },
  lr,
  best: null,
  numBad: 0,
  cooldownLeft: 0,
  observed: 0
})

/** torch's is_better: relative or absolute margin beyond the best so far. */
const isBetter = (p: PlateauParams, a: number, best: number | null): boolean => {
  if (!Number.isFinite(a)) return false
  if (best === null) return true
  if (p.mode === "min") return p.thresholdMode === "rel" ? a < best * (1 - p.threshold) : a < best - p.threshold
  return p.thresholdMode === "rel" ? a > best * (p.threshold + 1) : a > best + p.threshold
}

/** Observe one metric value (e.g. a validation loss); returns the next state and lr. */
export const plateauObserve = (state: PlateauState, metric: number): PlateauStep => {
  const p = state.params
  let best = state.best
  let numBad = state.numBad + 1
  let cooldownLeft = state.cooldownLeft
  if (isBetter(p, metric, best)) {
    best = metric
    numBad = 0
  }
  if (cooldownLeft > 0) {
    cooldownLeft -= 1
    numBad = 0 // bad observations during cooldown are ignored
  }
  let lr = state.lr
  let reduced = false
  if (numBad > p.patience) {
    const next = Math.max(lr * p.factor, p.minLr)
    if (lr - next > p.eps) {
      lr = next
      reduced = true
    }
    cooldownLeft = p.cooldown
    numBad = 0
  }
  const next: PlateauState = { params: p, lr, best, numBad, cooldownLeft, observed: state.observed + 1 }
  return { state: next, lr, reduced }
}
