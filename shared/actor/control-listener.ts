/**
 * Implements: how an actor hears accepted control commands — `onControl(s, handlers)`
 * subscribes to the job's `events.control` and calls the actor's hook for each
 * `ControlApplied` verb it handles, once per command and in the order accepted, though
 * events may be lost or repeated (`advance`, the controller's replay); `stopRequested(s)`
 * is a Deferred that completes on `stop` (what `flotilla launch` waits on to exit cleanly).
 * Does not own: validating commands (the controller did; a broadcast that fails to
 * decode is logged and ignored), what an actor does on a verb (the actor's own file).
 */
import { Deferred, Effect, Result, Scope } from "effect"
import { Bus } from "../bus/Bus.ts"
import { ControlApplied, type CommandVerb, type ControlRequestOf } from "../protocol/control.ts"
import { decodeBytes } from "../protocol/decode.ts"
import type { Subjects } from "../protocol/subjects.ts"

export type ControlHandlers = {
  readonly [V in CommandVerb]?: (command: ControlRequestOf<V>, event: ControlApplied) => Effect.Effect<void, unknown>
}

/**
 * The order in which a listener applies control events: each command once, in `seq` order,
 * although core NATS may lose or repeat them (the controller re-broadcasts its recent ones).
 * A gap waits for the repeat that fills it; one older than the controller's replay window is
 * skipped after GAP_GIVE_UP_MS. A listener that starts mid-job takes the replay's newest seq
 * as its starting point (what happened before it started is not replayed to it). Pure.
 */
export interface ControlCursor {
  epoch: number
  seq: number
  readonly pending: Map<number, { ev: ControlApplied; since: number }>
}

export const GAP_GIVE_UP_MS = 10_000

/** The events to apply now, in order, for `ev` arriving at `now` (the cursor is updated). */
export const advance = (cursor: ControlCursor | undefined, ev: ControlApplied, now: number): { cursor: ControlCursor | undefined; apply: ControlApplied[] } => {
  const epoch = ev.epoch ?? 0
  if (!cursor || cursor.epoch !== epoch) {
    if (ev.replayed === true) return { cursor: { epoch, seq: ev.latest ?? ev.seq, pending: new Map() }, apply: [] }
    cursor = { epoch, seq: ev.seq - 1, pending: new Map() }
  }
  if (ev.seq > cursor.seq && !cursor.pending.has(ev.seq)) cursor.pending.set(ev.seq, { ev, since: now })
  const apply: ControlApplied[] = []
  while (cursor.pending.size > 0) {
    const next = cursor.pending.get(cursor.seq + 1)
    if (next) {
      cursor.pending.delete(cursor.seq + 1)
      cursor.seq++
      apply.push(next.ev)
      continue
    }
    const oldest = Math.min(...cursor.pending.keys())
    if (now - cursor.pending.get(oldest)!.since < GAP_GIVE_UP_MS) break
    cursor.seq = oldest - 1 // the missing ones are beyond the replay window: go on without them
  }
  return { cursor, apply }
}

/** Call `handlers[verb]` for every accepted command of this job: once each, in the order accepted. */
export const onControl = (s: Subjects, handlers: ControlHandlers): Effect.Effect<void, never, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const job = s.prefix.slice("flotilla.".length)
    // only this subscription's fiber touches it (a subscription's handlers run one at a time)
    let cursor: ControlCursor | undefined
    yield* bus
      .subscribe(s.controlApplied, (m) => {
        const r = decodeBytes(ControlApplied, m.subject, m.data)
        if (Result.isFailure(r)) return Effect.logWarning(`ignoring a bad control event: ${r.failure.message}`)
        if (r.success.job !== job) return Effect.void
        const step = advance(cursor, r.success, Date.now())
        cursor = step.cursor
        return Effect.forEach(step.apply, (ev) => {
          const handler = handlers[ev.verb] as ((c: unknown, e: ControlApplied) => Effect.Effect<void, unknown>) | undefined
          if (!handler) return Effect.void
          return handler(ev.command, ev).pipe(
            Effect.catchCause((c) => Effect.logError(`control ${ev.verb} (#${ev.seq} from ${ev.sender}) failed here`, c))
          )
        }, { discard: true })
      })
      .pipe(Effect.orDie)
  })

/** Completes with the `stop` event when the job is told to stop. */
export const stopRequested = (s: Subjects): Effect.Effect<Deferred.Deferred<ControlApplied>, never, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const stopped = yield* Deferred.make<ControlApplied>()
    yield* onControl(s, { stop: (_, ev) => Deferred.succeed(stopped, ev) })
    return stopped
  })
