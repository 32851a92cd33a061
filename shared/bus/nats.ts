// Implements: `NatsBus` — the Bus over a real NATS server with the `nats` client (v2.29):
// connect with unlimited reconnects (subscriptions are restored by the client after a
// server restart), maxPayload from the server's INFO, typed errors for oversize messages,
// no responders and timeouts, connection status logged through Effect's logger, and
// `nc.drain()` when the layer's scope closes. Also the client side of authentication,
// shared by every connection Flotilla opens (this bus, the control history, the JetStream
// checkpoint store): `NatsAuth` (a .creds file, an nkey seed file, user and password, a
// token, TLS files) and `natsConnectAuth`, its nats.js connect options; a credential file
// that cannot be read or is malformed is a `NatsAuthError` naming the file.
// Does not own: the semantics contract and subscription runner (shared/bus/Bus.ts),
// starting a server (shared/bus/local-server.ts), JetStream (checkpoint store), parsing
// --creds & co. (cli/auth.ts), who may do what (shared/bus/permissions.ts).
//
// nats.js quirks handled here: header values are trimmed by the client; a received
// message's `data` is a view into the socket buffer (byteOffset may be non-zero and
// unaligned: copy before building a Float32Array over it); request timeouts use real time.
import { readFileSync } from "node:fs"
import { connect, credsAuthenticator, Events, headers as natsHeaders, nkeyAuthenticator, nkeys } from "nats"
import type { ConnectionOptions, MsgHdrs, Msg, NatsConnection, NatsError, Status } from "nats"
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
  /** Credentials and TLS (docs/SECURITY.md); none: connect anonymously. */
  readonly auth?: NatsAuth
  /** How long closing the layer waits for `nc.drain()` before closing hard; default 10 s. */
  readonly drainTimeoutMs?: number
}

const serversList = (s: string | ReadonlyArray<string>): Array<string> => (typeof s === "string" ? [s] : [...s])

// ---------------------------------------------------------------- authentication

/**
 * How a client proves who it is, as the NATS tools take it: at most one of a `.creds` file
 * (a user JWT and its nkey seed, operator/JWT deployments), an nkey seed file (`nkey`
 * users in the server config: what `flotilla infra account` writes), user and password,
 * or a token; plus TLS files (a CA to trust, a client certificate and key for mutual TLS).
 */
export interface NatsAuth {
  /** path of a NATS credentials file (`-----BEGIN NATS USER JWT-----` … `-----BEGIN USER NKEY SEED-----`). */
  readonly creds?: string
  /** path of a file holding an nkey user seed (`SU…`). */
  readonly nkey?: string
  readonly user?: string
  readonly password?: string
  readonly token?: string
  readonly tls?: {
    /** PEM file of the CA(s) that signed the server's certificate. */
    readonly ca?: string
    /** PEM client certificate and its key (mutual TLS). */
    readonly cert?: string
    readonly key?: string
  }
}

export class NatsAuthError extends Error {
  override readonly name = "NatsAuthError"
  readonly _tag = "NatsAuthError"
}

const CREDS_BLOCK = /-{3,}[^\n]*-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}[^\n]*-{3,}/g

const readCredential = (what: string, file: string): string => {
  try {
    return readFileSync(file, "utf8")
  } catch (e) {
    throw new NatsAuthError(`${what} ${file}: cannot read it (${(e as NodeJS.ErrnoException).code ?? errorText(e)})`)
  }
}

/** The user JWT and seed of a .creds file, or a NatsAuthError naming the file. */
export const parseCredsFile = (file: string): { readonly jwt: string; readonly seed: string } => {
  const text = readCredential("creds file", file)
  const blocks = [...text.matchAll(CREDS_BLOCK)].map((m) => m[1])
  if (blocks.length < 2 || !/^ey/.test(blocks[0]) || !/^SU/.test(blocks[1])) {
    throw new NatsAuthError(
      `creds file ${file}: not a NATS credentials file (expected a "-----BEGIN NATS USER JWT-----" block and a "-----BEGIN USER NKEY SEED-----" block, as nsc writes them; ` +
        `for an nkey seed file use --nkey / NATS_NKEY)`
    )
  }
  checkSeed(blocks[1], `creds file ${file}`)
  return { jwt: blocks[0], seed: blocks[1] }
}

const checkSeed = (seed: string, where: string): void => {
  try {
    nkeys.fromSeed(new TextEncoder().encode(seed))
  } catch (e) {
    throw new NatsAuthError(`${where}: its nkey seed is not valid (${errorText(e)})`)
  }
}

/** The user seed of an nkey seed file (the first `SU…` token), or a NatsAuthError naming the file. */
export const parseNkeyFile = (file: string): string => {
  const text = readCredential("nkey file", file)
  const seed = /\bSU[A-Z2-7]{50,}\b/.exec(text)?.[0]
  if (seed === undefined) throw new NatsAuthError(`nkey file ${file}: holds no nkey user seed (a line starting with SU…, as \`flotilla infra account\` writes)`)
  checkSeed(seed, `nkey file ${file}`)
  return seed
}

/** One line for logs: which credential a connection presents (never the secret). */
export const describeAuth = (auth: NatsAuth | undefined): string => {
  if (auth === undefined) return "no credentials"
  const who = auth.creds !== undefined ? `creds ${auth.creds}` : auth.nkey !== undefined ? `nkey ${auth.nkey}` : auth.user !== undefined ? `user ${auth.user}` : auth.token !== undefined ? "a token" : "no credentials"
  return auth.tls === undefined ? who : `${who}, TLS`
}

/**
 * The nats.js connect options of `auth` (credential files are read and checked now, so a
 * bad one fails here, naming the file). Throws NatsAuthError.
 */
export const natsConnectAuth = (auth: NatsAuth | undefined): Partial<ConnectionOptions> => {
  if (auth === undefined) return {}
  const given = [auth.creds !== undefined, auth.nkey !== undefined, auth.user !== undefined || auth.password !== undefined, auth.token !== undefined].filter(Boolean).length
  if (given > 1) throw new NatsAuthError("give one way to authenticate: a creds file, an nkey file, a user and password, or a token")
  const out: { -readonly [K in keyof ConnectionOptions]?: ConnectionOptions[K] } = {}
  if (auth.creds !== undefined) {
    const file = auth.creds
    parseCredsFile(file)
    // read on every (re)connect: a rotated file is picked up
    out.authenticator = credsAuthenticator(() => new TextEncoder().encode(readCredential("creds file", file)))
  } else if (auth.nkey !== undefined) {
    const seed = new TextEncoder().encode(parseNkeyFile(auth.nkey))
    out.authenticator = nkeyAuthenticator(seed)
  } else if (auth.user !== undefined || auth.password !== undefined) {
    if (auth.user === undefined || auth.user === "") throw new NatsAuthError("a password needs a user (--user / NATS_USER)")
    if (auth.password === undefined) throw new NatsAuthError(`user ${auth.user} needs a password (--password / NATS_PASSWORD)`)
    out.user = auth.user
    out.pass = auth.password
  } else if (auth.token !== undefined) {
    if (auth.token === "") throw new NatsAuthError("the token is empty (--token / NATS_TOKEN)")
    out.token = auth.token
  }
  if (auth.tls !== undefined) {
    const { ca, cert, key } = auth.tls
    if ((cert === undefined) !== (key === undefined)) throw new NatsAuthError("mutual TLS needs both a client certificate and its key (--tls-cert and --tls-key)")
    for (const [what, file] of [["TLS CA file", ca], ["TLS certificate", cert], ["TLS key", key]] as const) {
      if (file !== undefined) readCredential(what, file)
    }
    out.tls = { ...(ca !== undefined ? { caFile: ca } : {}), ...(cert !== undefined ? { certFile: cert } : {}), ...(key !== undefined ? { keyFile: key } : {}) }
  }
  return out
}

/** The connect error, said for people: a refused credential names what was presented. */
const connectErrorText = (e: unknown, auth: NatsAuth | undefined): string => {
  const code = (e as Partial<NatsError> | undefined)?.code
  if (code === "AUTHORIZATION_VIOLATION" || /authorization violation|authentication/i.test(errorText(e))) {
    return `the server refused the credentials (${describeAuth(auth)}): ${errorText(e)}. ` +
      "Give this actor's credentials with --creds / --nkey / --user and --password / --token or NATS_CREDS, NATS_NKEY, NATS_USER and NATS_PASSWORD, NATS_TOKEN (docs/SECURITY.md)"
  }
  return `${errorText(e)}. Is nats-server running there? (\`flotilla up\` starts one; \`apt-get install -y nats-server\`)`
}

const make = (options: NatsBusOptions): Effect.Effect<BusShape, BusConnectionError, Scope.Scope> =>
  Effect.gen(function*() {
    const servers = serversList(options.servers)
    const services = yield* Effect.context<never>()
    const logFromCallback = (effect: Effect.Effect<void>) => {
      Effect.runForkWith(services)(effect)
    }

    const auth = options.auth
    const authOptions = yield* Effect.try({
      try: () => natsConnectAuth(auth),
      catch: (e) => new BusConnectionError({ subject: "", message: `NATS credentials: ${errorText(e)}`, cause: e })
    })
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
            ...authOptions
          }),
        catch: (e) =>
          new BusConnectionError({
            subject: "",
            message: `cannot connect to NATS at ${servers.join(", ")}: ${connectErrorText(e, auth)}`,
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
      return data === "PERMISSIONS_VIOLATION"
        ? Effect.logError("NATS async error: PERMISSIONS_VIOLATION: the server refused a publish or subscription this user may not make (the server log names the subject; docs/SECURITY.md has each role's permissions)")
        : Effect.logError(`NATS async error: ${data}`)
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
    case "PERMISSIONS_VIOLATION":
      return new BusConnectionError({
        subject,
        message: `the NATS server refused it: ${errorText(e)}; this user's role may not do that (docs/SECURITY.md lists each role's permissions)`,
        cause: e
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
