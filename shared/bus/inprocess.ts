// Implements: `InProcessBus` — the Bus inside one process, for the single-process embedded
// default (`npm start`) and for tests: NATS subject rules and wildcards, queue groups,
// request/reply through inbox subjects, no-responders, timeouts (Effect's clock, so a
// test clock drives them), max payload (data + encoded headers, as nats-server counts).
// Does not own: anything across processes (shared/bus/nats.ts), the semantics contract
// (shared/bus/Bus.ts), handler scheduling (runSubscription in Bus.ts).
//
// Hot path: one copy of the data per publish (so a sender reusing its buffer cannot
// corrupt receivers; all receivers of one message share that copy), routes cached per
// subject until the subscription set changes, replies to requests bypass routing.
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import type * as Scope from "effect/Scope"
import {
  Bus,
  BusArgumentError,
  BusConnectionError,
  BusTimeoutError,
  DEFAULT_IN_PROCESS_MAX_PAYLOAD,
  DEFAULT_REQUEST_TIMEOUT_MS,
  EMPTY_HEADERS,
  MaxPayloadExceededError,
  NoRespondersError,
  runSubscription
} from "./Bus.ts"
import type { BusError, BusMessage, BusShape, Headers, Subscription } from "./Bus.ts"
import { publishSubjectProblem, subjectMatches, subscribeSubjectProblem } from "./subject-match.ts"

export interface InProcessBusOptions {
  /** Largest message (data + encoded headers) in bytes; default 1 MiB like nats-server. */
  readonly maxPayload?: number
}

interface Sub {
  readonly pattern: string
  readonly queue: string | undefined
  readonly deliver: (m: BusMessage) => void
}

interface Group {
  readonly members: Array<Sub>
  next: number // round-robin cursor
}

interface Route {
  readonly plain: Array<Sub>
  readonly groups: Array<Group>
}

const ROUTE_CACHE_LIMIT = 10_000
const INBOX_ROOT = "_INBOX."

const make = (options: InProcessBusOptions = {}): Effect.Effect<BusShape, never, Scope.Scope> =>
  Effect.gen(function*() {
    const maxPayload = options.maxPayload ?? DEFAULT_IN_PROCESS_MAX_PAYLOAD
    const subs = new Set<Sub>()
    const routes = new Map<string, Route>()
    const pendingReplies = new Map<string, (m: BusMessage) => void>()
    const inboxPrefix = `${INBOX_ROOT}${Math.random().toString(36).slice(2, 12)}.`
    let nextInbox = 0
    let closed = false
    yield* Effect.addFinalizer(() => Effect.sync(() => {
      closed = true
    }))

    const routeFor = (subject: string): Route => {
      let route = routes.get(subject)
      if (route !== undefined) return route
      const plain: Array<Sub> = []
      const byQueue = new Map<string, Group>()
      for (const s of subs) {
        if (!subjectMatches(s.pattern, subject)) continue
        if (s.queue === undefined) plain.push(s)
        else {
          const g = byQueue.get(s.queue)
          if (g === undefined) byQueue.set(s.queue, { members: [s], next: 0 })
          else g.members.push(s)
        }
      }
      route = { plain, groups: [...byQueue.values()] }
      if (routes.size >= ROUTE_CACHE_LIMIT) routes.clear()
      routes.set(subject, route)
      return route
    }

    /** Delivers to every matching subscription; returns how many received it. */
    const deliver = (m: BusMessage): number => {
      if (m.subject.startsWith(inboxPrefix)) {
        const waiting = pendingReplies.get(m.subject)
        if (waiting !== undefined) {
          waiting(m)
          return 1
        }
      }
      const route = routeFor(m.subject)
      for (let i = 0; i < route.plain.length; i++) route.plain[i].deliver(m)
      for (let i = 0; i < route.groups.length; i++) {
        const g = route.groups[i]
        const member = g.members[g.next % g.members.length]
        g.next = (g.next + 1) % g.members.length
        member.deliver(m)
      }
      return route.plain.length + route.groups.length
    }

    /** Validates and copies; returns the message to deliver or the error to fail with. */
    const prepare = (
      subject: string,
      data: Uint8Array,
      headers: Headers | undefined,
      reply: string | undefined
    ): BusMessage | BusArgumentError | MaxPayloadExceededError | BusConnectionError => {
      if (closed) return new BusConnectionError({ subject, message: "in-process bus is closed" })
      const subjectProblem = publishSubjectProblem(subject)
      if (subjectProblem !== undefined) {
        return new BusArgumentError({ subject, message: `invalid subject '${subject}': ${subjectProblem}` })
      }
      if (reply !== undefined) {
        const replyProblem = publishSubjectProblem(reply)
        if (replyProblem !== undefined) {
          return new BusArgumentError({ subject, message: `invalid reply subject '${reply}': ${replyProblem}` })
        }
      }
      let h: Headers = EMPTY_HEADERS
      let size = data.byteLength
      if (headers !== undefined) {
        const prepared = prepareHeaders(subject, headers)
        if (prepared instanceof BusArgumentError) return prepared
        h = prepared.headers
        size += prepared.encodedSize
      }
      if (size > maxPayload) {
        return new MaxPayloadExceededError({
          subject,
          size,
          maxPayload,
          message: `message of ${size} bytes exceeds max payload ${maxPayload} on '${subject}'`
        })
      }
      const copy = new Uint8Array(data) // the one copy
      return reply === undefined ? { subject, data: copy, headers: h } : { subject, data: copy, headers: h, reply }
    }

    const isError = (x: unknown): x is BusArgumentError | MaxPayloadExceededError | BusConnectionError =>
      x instanceof BusArgumentError || x instanceof MaxPayloadExceededError || x instanceof BusConnectionError

    const publish: BusShape["publish"] = (subject, data, opts) =>
      Effect.suspend(() => {
        const m = prepare(subject, data, opts?.headers, opts?.reply)
        if (isError(m)) return Effect.fail(m)
        deliver(m)
        return Effect.void
      })

    const subscribe: BusShape["subscribe"] = (pattern, handler, opts) =>
      Effect.suspend((): Effect.Effect<Subscription, BusError, Scope.Scope> => {
        const problem = subscribeSubjectProblem(pattern)
        if (problem !== undefined) {
          return Effect.fail(
            new BusArgumentError({ subject: pattern, message: `invalid subscription '${pattern}': ${problem}` })
          )
        }
        const queue = opts?.queue
        if (queue !== undefined && (queue.length === 0 || /\s/.test(queue))) {
          return Effect.fail(new BusArgumentError({ subject: pattern, message: `invalid queue group '${queue}'` }))
        }
        if (closed) return Effect.fail(new BusConnectionError({ subject: pattern, message: "in-process bus is closed" }))
        return runSubscription(pattern, handler, (deliverTo) =>
          Effect.sync(() => {
            const s: Sub = { pattern, queue, deliver: deliverTo }
            subs.add(s)
            routes.clear()
            return Effect.sync(() => {
              subs.delete(s)
              routes.clear()
            })
          }), opts?.limits)
      })

    const request: BusShape["request"] = (subject, data, opts) =>
      Effect.suspend((): Effect.Effect<BusMessage, BusError> => {
        const timeoutMs = opts?.timeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS
        const inbox = `${inboxPrefix}${nextInbox++}`
        const m = prepare(subject, data, opts?.headers, inbox)
        if (isError(m)) return Effect.fail(m)
        const awaitReply = Effect.callback<BusMessage, NoRespondersError>((resume) => {
          pendingReplies.set(inbox, (reply) => {
            pendingReplies.delete(inbox)
            resume(Effect.succeed(reply))
          })
          if (deliver(m) === 0) {
            pendingReplies.delete(inbox)
            resume(Effect.fail(new NoRespondersError({ subject, message: `no responders on '${subject}'` })))
          }
          return Effect.sync(() => {
            pendingReplies.delete(inbox)
          })
        })
        return Effect.timeoutOrElse(awaitReply, {
          duration: timeoutMs,
          orElse: () =>
            Effect.fail(
              new BusTimeoutError({ subject, timeoutMs, message: `request on '${subject}' timed out after ${timeoutMs} ms` })
            )
        })
      })

    const respond: BusShape["respond"] = (to, data, headers) =>
      to.reply === undefined || to.reply === ""
        ? Effect.void
        : publish(to.reply, data, headers === undefined ? undefined : { headers })

    const bus: BusShape = {
      kind: "in-process",
      maxPayload,
      publish,
      subscribe,
      request,
      respond,
      flush: () => Effect.void
    }
    return bus
  })

/**
 * Checks header keys and values the way nats.js does (keys printable ASCII without ':',
 * values without CR/LF, values trimmed) and returns the copy plus its encoded size
 * ("NATS/1.0" + "\r\nkey: value" per header + "\r\n\r\n").
 */
const prepareHeaders = (
  subject: string,
  headers: Headers
): { readonly headers: Headers; readonly encodedSize: number } | BusArgumentError => {
  const out: Record<string, string> = {}
  let size = 0
  for (const k in headers) {
    const v = headers[k]
    if (typeof v !== "string") {
      return new BusArgumentError({ subject, message: `header '${k}' is not a string` })
    }
    if (k.length === 0) return new BusArgumentError({ subject, message: "empty header key" })
    for (let i = 0; i < k.length; i++) {
      const c = k.charCodeAt(i)
      if (c === 58 || c < 33 || c > 126) {
        return new BusArgumentError({ subject, message: `'${k[i]}' is not a valid character for a header key ('${k}')` })
      }
    }
    if (v.includes("\r") || v.includes("\n")) {
      return new BusArgumentError({ subject, message: `header '${k}' value holds CR or LF` })
    }
    const trimmed = v.trim()
    out[k] = trimmed
    size += 4 + k.length + Buffer.byteLength(trimmed)
  }
  return { headers: out, encodedSize: size === 0 ? 0 : size + 12 }
}

export const InProcessBus = {
  make,
  layer: (options: InProcessBusOptions = {}): Layer.Layer<Bus> => Layer.effect(Bus, make(options))
}
