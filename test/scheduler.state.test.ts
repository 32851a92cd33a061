// Checks: the scheduler's live state survives a restart. Its state (schedule, plateau
// counters, set-lr overrides) rides in every LrForStep; shard 0 keeps the newest and sends
// it back with GetLr. A scheduler that just started, or that sees a new server incarnation
// (a restart, a rollback), adopts it — so the LRs continue as they were, set-lr included —
// and a request without state (another shard, an old client) changes nothing.
// In-process bus: the real scheduler actor, no NATS needed for this contract.
import { describe, expect, it } from "@effect/vitest"
import { Effect, Result } from "effect"
import { runScheduler } from "../actors/scheduler/scheduler.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { InProcessBus } from "../shared/bus/inprocess.ts"
import { resolveJob } from "../shared/config/job.ts"
import { decodeBytes, encodeMessage } from "../shared/protocol/decode.ts"
import { LrForStep } from "../shared/protocol/messages.ts"
import { PROTOCOL_VERSION, subjects } from "../shared/protocol/subjects.ts"
import { initialState, lrFrom, setLr } from "../shared/schedule/state.ts"
import { resolveSchedule } from "../shared/schedule/schedules.ts"

const job = resolveJob({ job: "sched-state", schedule: { kind: "constant", lr: 0.01 } })

const ask = (step: number, incarnation?: number, state?: unknown) =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const m = yield* bus.request(subjects(job.job).lr, encodeMessage({ _tag: "GetLr", v: PROTOCOL_VERSION, step, incarnation, state }))
    return Result.getOrThrow(decodeBytes(LrForStep, m.subject, m.data))
  })

describe("scheduler state across restarts", () => {
  it.live("a fresh scheduler adopts the state shard 0 holds; a later request without state keeps it", () =>
    Effect.gen(function* () {
      yield* runScheduler({ job, id: "scheduler-0" })
      // what shard 0 checkpointed: a live `set-lr 0.5 --from-step 10` the old scheduler had
      const held = setLr({ ...initialState(Result.getOrThrow(resolveSchedule({ kind: "constant", lr: 0.01 }))), announced: 9 }, 0.5, 10)
      expect(lrFrom(held, 12)).toBe(0.5)
      const first = yield* ask(12, 1_000, held)
      expect(first.lr).toBe(0.5)
      expect((first.state as { overrides: unknown[] }).overrides).toHaveLength(1)
      // a shard without state, or the same incarnation again: nothing is adopted again
      expect((yield* ask(5)).lr).toBe(0.01)
      expect((yield* ask(13, 1_000, initialState(Result.getOrThrow(resolveSchedule({ kind: "constant", lr: 0.01 }))))).lr).toBe(0.5)
      // a new incarnation (the server restarted from an older checkpoint, before the set-lr)
      const older = initialState(Result.getOrThrow(resolveSchedule({ kind: "constant", lr: 0.01 })))
      expect((yield* ask(12, 2_000, older)).lr).toBe(0.01)
    }).pipe(Effect.scoped, Effect.provide(InProcessBus.layer())))
})
