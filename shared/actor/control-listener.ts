/**
 * Implements: how an actor hears accepted control commands — `onControl(s, handlers)`
 * subscribes to the job's `events.control` and calls the actor's hook for each
 * `ControlApplied` verb it handles; `stopRequested(s)` is a Deferred that completes on
 * `stop` (what `flotilla launch` waits on to exit cleanly).
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

/** Call `handlers[verb]` for every accepted command of this job, in the order broadcast. */
export const onControl = (s: Subjects, handlers: ControlHandlers): Effect.Effect<void, never, Bus | Scope.Scope> =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const job = s.prefix.slice("flotilla.".length)
    yield* bus
      .subscribe(s.controlApplied, (m) => {
        const r = decodeBytes(ControlApplied, m.subject, m.data)
        if (Result.isFailure(r)) return Effect.logWarning(`ignoring a bad control event: ${r.failure.message}`)
        const ev = r.success
        if (ev.job !== job) return Effect.void
        const handler = handlers[ev.verb] as ((c: unknown, e: ControlApplied) => Effect.Effect<void, unknown>) | undefined
        if (!handler) return Effect.void
        return handler(ev.command, ev).pipe(
          Effect.catchCause((c) => Effect.logError(`control ${ev.verb} (#${ev.seq} from ${ev.sender}) failed here`, c))
        )
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
