/**
 * Implements: telling a sender why its message was rejected.
 *
 * Every rejection is published on the job's `errors` subject (the dead-letter feed) and,
 * when the message was a request, sent back as the reply. The actor stays up.
 */
import { Effect } from "effect"
import type { BusMessage, BusShape } from "../bus/Bus.ts"
import { encodeMessage } from "../protocol/decode.ts"
import { rejected, type Rejected } from "../protocol/messages.ts"
import type { Subjects } from "../protocol/subjects.ts"

export type Rejection = Omit<Rejected, "_tag" | "v" | "at" | "by">
export type Reporter = (r: Rejection, replyTo?: BusMessage) => Effect.Effect<Rejected>

/** A reporter for actor `by`: publishes on `errors`, replies when the message was a request. */
export const makeReporter = (bus: BusShape, s: Subjects, by: string): Reporter => (r, replyTo) =>
  Effect.gen(function* () {
    const msg = rejected({ ...r, by })
    const bytes = encodeMessage(msg)
    yield* Effect.logWarning(`rejected ${r.code} on ${r.subject}${r.sender ? ` from ${r.sender}` : ""}: ${r.reason}`)
    yield* bus.publish(s.errors, bytes).pipe(Effect.ignore)
    if (replyTo?.reply) yield* bus.respond(replyTo, bytes).pipe(Effect.ignore)
    return msg
  })
