// Implements: `NatsBus` — the Bus over a real NATS server with the `nats` client (v2.29):
// connect with unlimited reconnects (subscriptions are restored by the client after a
// server restart), maxPayload from the server's INFO, typed errors for oversize messages,
// no responders and timeouts, connection status logged through Effect's logger, and
// `nc.drain()` when the layer's scope closes.
// Does not own: the semantics contract and subscription runner (shared/bus/Bus.ts),
// starting a server (shared/bus/local-server.ts), JetStream (checkpoint store).
//
// nats.js quirks handled here: header values are trimmed by the client; a received
// message's `data` is a view into the socket buffer (byteOffset may be non-zero and
// unaligned: copy before building a Float32Array over it); request timeouts use real time.
import { connect, Events, headers as natsHeaders } from "nats"
import type { MsgHdrs, Msg, NatsConnection, NatsError, Status } from "nats"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import type * as Scope from "effect/Scope"
import {
  Bus,
  BusArgumentError,
  BusConnectionError,
  BusTimeoutError,
  DEFAULT_REQUEST_TIMEOUT_MS,
  EMPTY_HEADERS,
  MaxPayloadExceededError,
  NoRespondersError,
  runSubscription
} from "./Bus.ts"
import type { BusError, BusMessage, BusShape, Headers, Subscription } from "./Bus.ts"
import { publishSubjectProblem, subscribeSubjectProblem } from "./subject-match.ts"

export interface NatsBusOptions {
  /** One or more server URLs, e.g. "nats://127.0.0.1:4222". */
  readonly servers: string | ReadonlyArray<string>
  /** Connection name shown by the server (monitoring, `nats server report connections`). */
  readonly name?: string
  /**
   * false (default): building the layer fails with BusConnectionError when no server
   * answers; true: keep trying until one does (for actors started before NATS).
   */
  readonly waitOnFirstConnect?: boolean
  /** Per-attempt connect timeout; default 5000 ms. */
  readonly connectTimeoutMs?: number
  /** Pause between reconnect attempts to the same server; default 1000 ms (nats.js: 2000). */
  readonly reconnectTimeWaitMs?: number
  /**
   * Client PING interval; default 10 s (nats.js: 2 min). With 3 PINGs unanswered the client
   * treats the server as gone and moves on to another: a dead host or a partition is noticed
   * in ~30-40 s (a killed server process closes the socket: noticed at once).
   */
  readonly pingIntervalMs?: number
  readonly user?: string
  readonly pass?: string
  readonly token?: string
  /** How long closing the layer waits for `nc.drain()` before closing hard; default 10 s. */
  readonly drainTimeoutMs?: number
}

const serversList = (s: string | ReadonlyArray<string>): Array<string> => (typeof s === "string" ? [s] : [...s])

const make = (options: NatsBusOptions): Effect.Effect<BusShape, BusConnectionError, Scope.Scope> =>
  Effect.gen(function*() {
    const servers = serversList(options.servers)
    const services = yield* Effect.context<never>()
    const logFromCallback = (effect: Effect.Effect<void>) => {
      Effect.runForkWith(services)(effect)
    }

    const nc = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () =>
          connect({
            servers,
            name: options.name,
            // reconnect for as long as the process lives (nats.js gives up after 10 by
            // default). With -1 no server is ever dropped from the list; with
            // waitOnFirstConnect the first connect also cycles through every URL forever.
            // URLs the cluster announces (INFO connect_urls) are added to the list; the
            // list is tried in random order (noRandomize false) so actors spread out.
            maxReconnectAttempts: -1,
            reconnectTimeWait: options.reconnectTimeWaitMs ?? 1_000,
            waitOnFirstConnect: options.waitOnFirstConnect ?? false,
            pingInterval: options.pingIntervalMs ?? 10_000,
            maxPingOut: 3,
            timeout: options.connectTimeoutMs ?? 5_000,
            user: options.user,
            pass: options.pass,
            token: options.token
          }),
        catch: (e) =>
          new BusConnectionError({
            subject: "",
            message: `cannot connect to NATS at ${servers.join(", ")}: ${errorText(e)}. ` +
              "Is nats-server running there? (`flotilla up` starts one; `apt-get install -y nats-server`)",
            cause: e
          })
      }),
      (nc) => closeConnection(nc, options.drainTimeoutMs ?? 10_000)
    )
    const initialMaxPayload = nc.info?.max_payload ?? 1024 * 1024
    yield* Effect.logInfo(`NATS connected to ${nc.getServer()} (max_payload ${initialMaxPayload} bytes)`)
    yield* Effect.forkScoped(watchStatus(nc))

    const maxPayloadNow = () => nc.info?.max_payload ?? initialMaxPayload

    const check = (subject: string, data: Uint8Array): BusError | undefined => {
      const problem = publishSubjectProblem(subject)
      if (problem !== undefined) {
        return new BusArgumentError({ subject, message: `invalid subject '${subject}': ${problem}` })
      }
      const max = maxPayloadNow()
      if (data.byteLength > max) return oversize(subject, data.byteLength, max)
      return undefined
    }

    const publish: BusShape["publish"] = (subject, data, opts) =>
      Effect.suspend(() => {
        const bad = check(subject, data)
        if (bad !== undefined) return Effect.fail(bad)
        return Effect.try({
          try: () => {
            const h = opts?.headers === undefined ? undefined : toNatsHeaders(opts.headers)
            // nats.js keeps a reference to `data` until its next flush (a microtask, or
            // the reconnect): copy so a sender reusing its buffer cannot corrupt the message.
            nc.publish(subject, opts?.borrowed === true ? data : new Uint8Array(data), { headers: h, reply: opts?.reply })
          },
          catch: (e) => mapError(subject, e, { data, headers: opts?.headers, maxPayload: maxPayloadNow() })
        })
      })

    const subscribe: BusShape["subscribe"] = (pattern, handler, opts) =>
      Effect.suspend((): Effect.Effect<Subscription, BusError, Scope.Scope> => {
        const problem = subscribeSubjectProblem(pattern)
        if (problem !== undefined) {
          return Effect.fail(
            new BusArgumentError({ subject: pattern, message: `invalid subscription '${pattern}': ${problem}` })
          )
        }
        return runSubscription(pattern, handler, (deliver) =>
          Effect.try({
            try: () => {
              const sub = nc.subscribe(pattern, {
                queue: opts?.queue,
                callback: (err, msg) => {
                  if (err !== null) {
                    logFromCallback(
                      Effect.logError(`NATS subscription error: ${err.message}`).pipe(
                        Effect.annotateLogs({ subscription: pattern })
                      )
                    )
                    return
                  }
                  deliver(fromNatsMsg(msg))
                }
              })
              // Drain: UNSUB, then a round trip so every message sent before it reached
              // the callback. Bounded, since a flush waits out a disconnection.
              return Effect.tryPromise(() => sub.drain()).pipe(
                Effect.timeoutOption(5_000),
                Effect.ignore,
                Effect.andThen(Effect.sync(() => {
                  if (!sub.isClosed()) sub.unsubscribe()
                }).pipe(Effect.ignore))
              )
            },
            catch: (e) => mapError(pattern, e, {})
          }), opts?.limits)
      })

    const request: BusShape["request"] = (subject, data, opts) =>
      Effect.suspend((): Effect.Effect<BusMessage, BusError> => {
        const bad = check(subject, data)
        if (bad !== undefined) return Effect.fail(bad)
        const timeoutMs = opts?.timeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS
        return Effect.tryPromise({
          try: () =>
            nc.request(subject, new Uint8Array(data), {
              timeout: timeoutMs,
              headers: opts?.headers === undefined ? undefined : toNatsHeaders(opts.headers)
            }),
          catch: (e) => mapError(subject, e, { data, headers: opts?.headers, maxPayload: maxPayloadNow(), timeoutMs })
        }).pipe(Effect.map(fromNatsMsg))
      })

    const respond: BusShape["respond"] = (to, data, headers) =>
      to.reply === undefined || to.reply === ""
        ? Effect.void
        : publish(to.reply, data, headers === undefined ? undefined : { headers })

    const flush: BusShape["flush"] = () =>
      Effect.tryPromise({ try: () => nc.flush(), catch: (e) => mapError("", e, {}) })

    const bus: BusShape = {
      kind: "nats",
      get maxPayload() {
        return maxPayloadNow()
      },
      publish,
      subscribe,
      request,
      respond,
      flush
    }
    return bus
  })

const closeConnection = (nc: NatsConnection, drainTimeoutMs: number): Effect.Effect<void> =>
  Effect.gen(function*() {
    if (nc.isClosed()) return
    const drained = yield* Effect.tryPromise(() => nc.drain()).pipe(
      Effect.timeoutOption(drainTimeoutMs),
      Effect.catchCause(() => Effect.succeedNone)
    )
    if (drained._tag === "None" && !nc.isClosed()) {
      yield* Effect.logWarning(`NATS drain did not finish within ${drainTimeoutMs} ms; closing`)
      yield* Effect.promise(() => nc.close()).pipe(Effect.ignore)
    }
  })

/** Logs disconnects, reconnects, server errors and lame-duck notices until the connection closes. */
const watchStatus = (nc: NatsConnection): Effect.Effect<void> =>
  Effect.gen(function*() {
    const it = nc.status()[Symbol.asyncIterator]()
    while (true) {
      const next = yield* Effect.promise(() => it.next())
      if (next.done === true) return
      yield* logStatus(next.value)
    }
  })

const logStatus = (s: Status): Effect.Effect<void> => {
  const data = typeof s.data === "string" || typeof s.data === "number" ? String(s.data) : JSON.stringify(s.data)
  switch (s.type) {
    case Events.Disconnect:
      return Effect.logWarning(`NATS disconnected from ${data}; reconnecting`)
    case Events.Reconnect:
      return Effect.logInfo(`NATS reconnected to ${data}; subscriptions restored`)
    case Events.Error:
      return Effect.logError(`NATS async error: ${data}`)
    case Events.LDM:
      return Effect.logWarning(`NATS server ${data} entering lame duck mode`)
    default:
      return Effect.logDebug(`NATS status ${s.type}: ${data}`)
  }
}

const toNatsHeaders = (h: Headers): MsgHdrs => {
  const out = natsHeaders()
  for (const k in h) out.set(k, h[k])
  return out
}

const fromNatsMsg = (msg: Msg): BusMessage => {
  let h: Headers = EMPTY_HEADERS
  if (msg.headers !== undefined) {
    const rec: Record<string, string> = {}
    for (const k of msg.headers.keys()) rec[k] = msg.headers.get(k)
    h = rec
  }
  return msg.reply ? { subject: msg.subject, data: msg.data, headers: h, reply: msg.reply } : {
    subject: msg.subject,
    data: msg.data,
    headers: h
  }
}

const oversize = (subject: string, size: number, maxPayload: number) =>
  new MaxPayloadExceededError({
    subject,
    size,
    maxPayload,
    message: `message of ${size} bytes exceeds the server's max_payload ${maxPayload} on '${subject}'`
  })

const errorText = (e: unknown): string => (e instanceof Error ? e.message : String(e))

const mapError = (
  subject: string,
  e: unknown,
  ctx: { data?: Uint8Array; headers?: Headers; maxPayload?: number; timeoutMs?: number }
): BusError => {
  const code = (e as Partial<NatsError> | undefined)?.code
  switch (code) {
    case "MAX_PAYLOAD_EXCEEDED": {
      let size = ctx.data?.byteLength ?? 0
      if (ctx.headers !== undefined) {
        let hsize = 0 // "NATS/1.0" + "\r\nkey: value"... + "\r\n\r\n", values trimmed
        for (const k in ctx.headers) hsize += 4 + Buffer.byteLength(k) + Buffer.byteLength(ctx.headers[k].trim())
        size += hsize === 0 ? 0 : hsize + 12
      }
      return oversize(subject, size, ctx.maxPayload ?? 0)
    }
    case "503":
      return new NoRespondersError({ subject, message: `no responders on '${subject}'` })
    case "TIMEOUT":
      return new BusTimeoutError({
        subject,
        timeoutMs: ctx.timeoutMs ?? 0,
        message: `request on '${subject}' timed out after ${ctx.timeoutMs} ms`
      })
    case "BAD_SUBJECT":
    case "BAD_HEADER":
    case "BAD_PAYLOAD":
    case "INVALID_OPTION":
      return new BusArgumentError({ subject, message: errorText(e) })
    default:
      return new BusConnectionError({ subject, message: `NATS: ${errorText(e)}`, cause: e })
  }
}

export const NatsBus = {
  make,
  layer: (options: NatsBusOptions): Layer.Layer<Bus, BusConnectionError> => Layer.effect(Bus, make(options))
}
