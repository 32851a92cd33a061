/**
 * Implements: the LR scheduler actor.
 *
 * Owns: the schedule (shared/schedule) and its live state (reduce-on-plateau counters).
 * Answers `GetLr { step }` on `lr` (queue group `scheduler`) with the LR of that step
 * and publishes each new step's LR on `metrics.scheduler`. A pure function of (schedule,
 * step) except for plateau, which listens to `ValidationLoss` on `metrics.evaluator`.
 * Run alone: `flotilla launch scheduler --job FILE`.
 */
import { Effect, Result, Scope } from "effect"
import { Bus } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { runHeartbeat } from "../../shared/actor/membership.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import { GetLr, ValidationLoss, type LrForStep } from "../../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, queues, subjects } from "../../shared/protocol/subjects.ts"
import { plateauInit, plateauObserve, type PlateauState } from "../../shared/schedule/plateau.ts"
import { lrAt, resolveSchedule, type Schedule, type ScheduleInput } from "../../shared/schedule/schedules.ts"

export interface SchedulerOptions {
  readonly job: JobConfig
  readonly id: string
}

export interface SchedulerHandle {
  lrFor(step: number): number
  readonly schedule: () => Schedule
}

export const runScheduler = (o: SchedulerOptions): Effect.Effect<SchedulerHandle, Error, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const s = subjects(o.job.job)
    const reject = makeReporter(bus, s, o.id)
    const resolved = resolveSchedule(o.job.schedule as unknown as ScheduleInput)
    if (Result.isFailure(resolved)) return yield* Effect.fail(new Error(`schedule: ${resolved.failure.message}`))
    let schedule: Schedule = resolved.success
    let plateau: PlateauState | undefined = schedule.kind === "plateau" ? plateauInit(schedule, schedule.lr) : undefined
    let announced = -1
    /** live `set-lr`s, oldest first: the newest whose fromStep <= step decides (until a set-schedule). */
    let overrides: Array<{ readonly lr: number; readonly fromStep: number }> = []

    const lrFor = (step: number) => {
      for (let i = overrides.length - 1; i >= 0; i--) if (step >= overrides[i].fromStep) return overrides[i].lr
      return plateau ? plateau.lr : lrAt(schedule, step)
    }
    const describe = () => JSON.stringify(schedule)

    yield* bus.subscribe(
      s.lr,
      (m) =>
        Effect.gen(function* () {
          const r = decodeBytes(GetLr, m.subject, m.data)
          if (Result.isFailure(r)) {
            yield* reject({ code: "bad-message", reason: r.failure.reason, subject: m.subject }, m)
            return
          }
          const reply: LrForStep = { _tag: "LrForStep", v: PROTOCOL_VERSION, step: r.success.step, lr: lrFor(r.success.step), schedule: schedule.kind }
          const bytes = encodeMessage(reply)
          yield* bus.respond(m, bytes)
          if (r.success.step > announced) {
            announced = r.success.step
            yield* bus.publish(s.metrics("scheduler"), bytes).pipe(Effect.ignore)
          }
        }),
      { queue: queues.scheduler }
    )

    // listened to whatever the schedule: a set-schedule may switch to plateau later
    yield* bus.subscribe(s.metrics("evaluator"), (m) => {
      const r = decodeBytes(ValidationLoss, m.subject, m.data)
      if (Result.isFailure(r) || !plateau) return Effect.void
      const next = plateauObserve(plateau, r.success.loss)
      plateau = next.state
      return next.reduced ? Effect.logInfo(`scheduler: validation loss plateaued, lr → ${next.lr}`) : Effect.void
    })

    yield* onControl(s, {
      "set-lr": (c) =>
        Effect.sync(() => {
          const from = c.fromStep ?? 0
          if (plateau && c.fromStep === undefined) {
            plateau = { ...plateau, lr: c.lr } // later reductions start from it
            overrides = overrides.filter((x) => x.fromStep > announced)
          } else overrides = [...overrides.filter((x) => x.fromStep < from), { lr: c.lr, fromStep: from }]
        }).pipe(Effect.andThen(Effect.logInfo(`scheduler ${o.id}: lr → ${c.lr}${c.fromStep === undefined ? "" : ` from step ${c.fromStep}`}`))),
      "set-schedule": (c) =>
        Effect.gen(function* () {
          const r = resolveSchedule(c.schedule as unknown as ScheduleInput)
          if (Result.isFailure(r)) return yield* Effect.logError(`scheduler ${o.id}: set-schedule: ${r.failure.message}`)
          schedule = r.success
          plateau = schedule.kind === "plateau" ? plateauInit(schedule, schedule.lr) : undefined
          overrides = []
          yield* Effect.logInfo(`scheduler ${o.id}: schedule → ${describe()}`)
        })
    })

    yield* runHeartbeat(s, "scheduler", o.id, o.job.train.heartbeatMs)
    yield* Effect.logDebug(`scheduler ${o.id}: ${describe()}`)
    return { lrFor, schedule: () => schedule }
  })
