/**
 * Implements: the LR scheduler actor.
 *
 * Owns: the schedule's live state (shared/schedule/state.ts: the schedule, plateau
 * counters, `set-lr` overrides). Answers `GetLr { step }` on `lr` (queue group `scheduler`)
 * with the LR of that step and its whole state, and publishes each new step's LR on
 * `metrics.scheduler`; listens to `ValidationLoss` (reduce-on-plateau) and to set-lr /
 * set-schedule. One mailbox: the subscriptions only enqueue; one fiber applies the pure
 * transitions of state.ts and replies. Parameter-server shard 0 sends the state it holds
 * with each request: a scheduler that just started, or that sees a new server incarnation
 * (a restart or a rollback), adopts it, so the LRs continue exactly where the checkpoint
 * left them. Run alone: `flotilla launch scheduler --job FILE`.
 */
import { Effect, Queue, Result, Scope } from "effect"
import { Bus, type BusMessage } from "../../shared/bus/Bus.ts"
import { onControl } from "../../shared/actor/control-listener.ts"
import { runHeartbeat } from "../../shared/actor/membership.ts"
import { makeReporter } from "../../shared/actor/report.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import { GetLr, ValidationLoss, type LrForStep } from "../../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, queues, subjects } from "../../shared/protocol/subjects.ts"
import { resolveSchedule, type Schedule, type ScheduleInput } from "../../shared/schedule/schedules.ts"
import { initialState, lrFrom, observeLoss, parseState, queried, setLr, setSchedule, type SchedulerState } from "../../shared/schedule/state.ts"

export interface SchedulerOptions {
  readonly job: JobConfig
  readonly id: string
}

export interface SchedulerHandle {
  lrFor(step: number): number
  readonly schedule: () => Schedule
}

type Event =
  | { readonly _tag: "LrAsked"; readonly msg: BusMessage; readonly req: GetLr }
  | { readonly _tag: "LossObserved"; readonly loss: number }
  | { readonly _tag: "LrSet"; readonly lr: number; readonly fromStep?: number }
  | { readonly _tag: "ScheduleSet"; readonly schedule: unknown }

export const runScheduler = (o: SchedulerOptions): Effect.Effect<SchedulerHandle, Error, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const s = subjects(o.job.job)
    const reject = makeReporter(bus, s, o.id)
    const resolved = resolveSchedule(o.job.schedule as unknown as ScheduleInput)
    if (Result.isFailure(resolved)) return yield* Effect.fail(new Error(`schedule: ${resolved.failure.message}`))
    let state: SchedulerState = initialState(resolved.success)
    /** the server incarnation whose state was adopted (undefined: none yet). */
    let adoptedFrom: number | undefined
    const queue = yield* Queue.unbounded<Event>()
    const offer = (e: Event) => Effect.sync(() => void Queue.offerUnsafe(queue, e))

    const handle = (e: Event): Effect.Effect<void> => {
      switch (e._tag) {
        case "LrAsked": {
          const r = e.req
          if (r.state !== undefined && r.incarnation !== undefined && r.incarnation !== adoptedFrom) {
            const adopted = parseState(r.state)
            adoptedFrom = r.incarnation
            if (adopted) {
              state = adopted
              return Effect.logInfo(`scheduler ${o.id}: adopted the state of server incarnation ${r.incarnation} (step ${adopted.announced})`).pipe(Effect.andThen(handle(e)))
            }
          }
          const fresh = r.step > state.announced
          state = queried(state, r.step)
          const reply: LrForStep = { _tag: "LrForStep", v: PROTOCOL_VERSION, step: r.step, lr: lrFrom(state, r.step, r.epoch ?? 0), schedule: state.schedule.kind, state }
          const bytes = encodeMessage(reply)
          return bus.respond(e.msg, bytes).pipe(
            Effect.andThen(fresh ? bus.publish(s.metrics("scheduler"), bytes) : Effect.void),
            Effect.ignore
          )
        }
        case "LossObserved": {
          const next = observeLoss(state, e.loss)
          state = next.state
          return next.reduced ? Effect.logInfo(`scheduler: validation loss plateaued, lr → ${next.lr}`) : Effect.void
        }
        case "LrSet":
          state = setLr(state, e.lr, e.fromStep)
          return Effect.logInfo(`scheduler ${o.id}: lr → ${e.lr}${e.fromStep === undefined ? "" : ` from step ${e.fromStep}`}`)
        case "ScheduleSet": {
          const r = setSchedule(state, e.schedule)
          if (Result.isFailure(r)) return Effect.logError(`scheduler ${o.id}: set-schedule: ${r.failure}`)
          state = r.success
          return Effect.logInfo(`scheduler ${o.id}: schedule → ${JSON.stringify(state.schedule)}`)
        }
      }
    }
    yield* Effect.forkScoped(Effect.forever(Queue.take(queue).pipe(Effect.flatMap(handle))))

    yield* bus.subscribe(
      s.lr,
      (m) => {
        const r = decodeBytes(GetLr, m.subject, m.data)
        return Result.isFailure(r) ? reject({ code: "bad-message", reason: r.failure.reason, subject: m.subject }, m).pipe(Effect.asVoid) : offer({ _tag: "LrAsked", msg: m, req: r.success })
      },
      { queue: queues.scheduler }
    )
    // listened to whatever the schedule: a set-schedule may switch to plateau later
    yield* bus.subscribe(s.metrics("evaluator"), (m) => {
      const r = decodeBytes(ValidationLoss, m.subject, m.data)
      return Result.isSuccess(r) ? offer({ _tag: "LossObserved", loss: r.success.loss }) : Effect.void
    })
    yield* onControl(s, {
      "set-lr": (c) => offer({ _tag: "LrSet", lr: c.lr, fromStep: c.fromStep }),
      "set-schedule": (c) => offer({ _tag: "ScheduleSet", schedule: c.schedule })
    }, o.id)

    yield* runHeartbeat(s, "scheduler", o.id, o.job.train.heartbeatMs)
    yield* Effect.logDebug(`scheduler ${o.id}: ${JSON.stringify(state.schedule)}`)
    return { lrFor: (step: number) => lrFrom(state, step), schedule: () => state.schedule }
  })
