/**
 * Implements: the LR scheduler's whole live state as plain JSON — the schedule in force,
 * reduce-on-plateau counters, the live `set-lr` overrides, the newest step announced — and
 * the pure transitions the scheduler actor applies to it (an LR query, a validation loss,
 * set-lr, set-schedule). It travels in every `LrForStep` reply; shard 0 checkpoints the
 * newest copy, so a restarted scheduler or a rolled-back job resumes with the exact LRs
 * (plateau reductions and live changes included). `lrFrom(state, step, epoch)` is also what a
 * parameter server computes when no scheduler answers: the same LR, not the job file's.
 * `epoch` (the data epoch update `step` falls in) only matters to a `per: "epoch"` schedule;
 * set-lr overrides and plateau stay keyed by step.
 * Does not own: schedule formulas and validation (schedules.ts), plateau's arithmetic (plateau.ts).
 */
import { Result } from "effect"
import { plateauInit, plateauObserve, type PlateauState } from "./plateau.ts"
import { lrAt, resolveSchedule, type Schedule, type ScheduleInput } from "./schedules.ts"
import { lrProblem, MAX_LR } from "../protocol/limits.ts"

export interface SchedulerState {
  readonly schedule: Schedule
  readonly plateau?: PlateauState
  /** live `set-lr`s, oldest first: the newest whose fromStep <= step decides (until a set-schedule). */
  readonly overrides: ReadonlyArray<{ readonly lr: number; readonly fromStep: number }>
  /** the newest step an LR was asked for. */
  readonly announced: number
}

export const initialState = (schedule: Schedule): SchedulerState => ({
  schedule,
  plateau: schedule.kind === "plateau" ? plateauInit(schedule, schedule.lr) : undefined,
  overrides: [],
  announced: -1
})

/**
 * The LR of update `step` in data epoch `epoch`: the newest override from it on, else
 * plateau's, else the schedule's — held at MAX_LR (a growing schedule, gamma > 1, stops there).
 */
export const lrFrom = (s: SchedulerState, step: number, epoch = 0): number => {
  for (let i = s.overrides.length - 1; i >= 0; i--) if (step >= s.overrides[i].fromStep) return Math.min(MAX_LR, s.overrides[i].lr)
  return Math.min(MAX_LR, s.plateau ? s.plateau.lr : lrAt(s.schedule, step, epoch))
}

/** An LR query for `step`: the state remembers the newest step asked for. */
export const queried = (s: SchedulerState, step: number): SchedulerState => (step > s.announced ? { ...s, announced: step } : s)

export const observeLoss = (s: SchedulerState, loss: number): { state: SchedulerState; reduced: boolean; lr?: number } => {
  if (!s.plateau) return { state: s, reduced: false }
  const next = plateauObserve(s.plateau, loss)
  return { state: { ...s, plateau: next.state }, reduced: next.reduced, lr: next.lr }
}

export const setLr = (s: SchedulerState, lr: number, fromStep: number | undefined): SchedulerState => {
  if (s.plateau && fromStep === undefined) {
    // later reductions start from it
    return { ...s, plateau: { ...s.plateau, lr }, overrides: s.overrides.filter((x) => x.fromStep > s.announced) }
  }
  const from = fromStep ?? 0
  return { ...s, overrides: [...s.overrides.filter((x) => x.fromStep < from), { lr, fromStep: from }] }
}

export const setSchedule = (s: SchedulerState, input: unknown): Result.Result<SchedulerState, string> => {
  const r = resolveSchedule(input as ScheduleInput)
  if (Result.isFailure(r)) return Result.fail(r.failure.message)
  return Result.succeed({ ...initialState(r.success), announced: s.announced })
}

/** A state that came over the wire or out of a checkpoint: checked by re-resolving its schedule. */
export const parseState = (x: unknown): SchedulerState | undefined => {
  if (typeof x !== "object" || x === null) return undefined
  const o = x as Partial<SchedulerState>
  const sched = resolveSchedule(o.schedule as ScheduleInput)
  if (Result.isFailure(sched) || !Array.isArray(o.overrides) || typeof o.announced !== "number") return undefined
  if (!o.overrides.every((v) => lrProblem(v?.lr) === undefined && Number.isInteger(v.fromStep))) return undefined
  if (o.plateau !== undefined && lrProblem((o.plateau as { lr?: unknown }).lr) !== undefined) return undefined
  return { schedule: sched.success, plateau: o.plateau, overrides: o.overrides, announced: o.announced }
}
