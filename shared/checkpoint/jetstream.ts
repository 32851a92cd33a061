/**
 * Implements: the JetStream layer of the CheckpointStore (shared/checkpoint/store.ts): a
 * JetStream object store (bucket `flotilla-checkpoints`, key `<job>/ps-<shard>/v<version>`),
 * so a parameter server relaunched on another host resumes too. nats.js chunks each object
 * and checks its SHA-256 digest on read; an object becomes visible only when its metadata
 * is written after every chunk is acknowledged, so a crash mid-save leaves no half object.
 * It opens its own NATS connection (unlimited reconnects), closed with the layer's scope,
 * and retries an operation while the server is unreachable (a restart) for `retryForMs`.
 * The semantics both layers keep are in store.ts's header.
 */
import { connect, StorageType } from "nats"
import type { JetStreamManager, NatsConnection, ObjectStore } from "nats"
import * as Effect from "effect/Effect"
import * as Schedule from "effect/Schedule"
import type * as Scope from "effect/Scope"
import {
  ATTEMPT_TIMEOUT_MS,
  checkArgs,
  CheckpointStoreError,
  DEFAULT_BUCKET,
  DEFAULT_CHUNK_BYTES,
  DEFAULT_REQUEST_TIMEOUT_MS,
  DEFAULT_RETRY_FOR_MS,
  SAVE_MS_PER_MIB,
  textOf,
  toPrune,
  validKeep
} from "./store.ts"
import type { CheckpointRef, CheckpointStoreOp, CheckpointStoreShape, JetStreamStoreOptions } from "./store.ts"
import { natsConnectAuth } from "../bus/nats.ts"

const KEY = /^([A-Za-z0-9_-]{1,64})\/ps-(\d+)\/v(\d+)$/
const objectKey = (job: string, shard: number, version: number) => `${job}/ps-${shard}/v${version}`

/** nats.js's meta subject token: base64url *with* padding of the (ASCII) object name. */
const metaToken = (key: string) => Buffer.from(key, "latin1").toString("base64").replace(/\+/g, "-").replace(/\//g, "_")
const keyOfMetaToken = (token: string) =>
  Buffer.from(token.replace(/-/g, "+").replace(/_/g, "/"), "base64").toString("latin1")

/** NATS errors worth retrying: the server is restarting, or JetStream is not back yet. */
const isTransient = (e: unknown): boolean => {
  const code = String((e as { code?: unknown })?.code ?? "")
  if (["TIMEOUT", "DISCONNECT", "503", "408", "CONNECTION_REFUSED", "CONNECTION_TIMEOUT", "IDLE_HEARTBEAT"].includes(code)) {
    return true
  }
  return /timeout|temporarily unavailable|no responders|disconnect|reconnect|not ready/i.test(textOf(e))
}

export const makeJetStreamStore = (
  opts: JetStreamStoreOptions
): Effect.Effect<CheckpointStoreShape, CheckpointStoreError, Scope.Scope> =>
  Effect.gen(function*() {
    const keep = validKeep(opts.keep)
    const bucket = opts.bucket ?? DEFAULT_BUCKET
    const servers = typeof opts.servers === "string" ? [opts.servers] : [...opts.servers]
    const stream = `OBJ_${bucket}`
    const timeout = opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS
    const retryForMs = opts.retryForMs ?? DEFAULT_RETRY_FOR_MS
    const at = (key: string) => `jetstream://${bucket}/${key}`
    const openError = (e: unknown, hint: string) =>
      new CheckpointStoreError({
        op: "open",
        reason: isTransient(e) ? "unavailable" : "io",
        where: at(""),
        message: `checkpoint store (jetstream): cannot open bucket ${bucket} at ${servers.join(", ")}: ${textOf(e)}. ${hint}`,
        cause: e
      })

    const nc: NatsConnection = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () =>
          connect({
            servers,
            name: opts.name ?? "flotilla-checkpoints",
            maxReconnectAttempts: -1,
            reconnectTimeWait: 1_000,
            waitOnFirstConnect: opts.waitOnFirstConnect ?? false,
            ...natsConnectAuth(opts.auth)
          }),
        catch: (e) => openError(e, "Is nats-server running there? (`nats-server -js` serves JetStream)")
      }),
      (c) =>
        Effect.promise(() => c.drain().catch(() => c.close())).pipe(
          Effect.timeoutOption(10_000),
          Effect.andThen(Effect.promise(() => c.close().catch(() => {})))
        )
    )
    const [jsm, os] = yield* Effect.tryPromise({
      try: async (): Promise<[JetStreamManager, ObjectStore]> => {
        const js = nc.jetstream({ timeout })
        const jsm = await nc.jetstreamManager({ timeout })
        const os = await js.views.os(bucket, { storage: StorageType.File, replicas: opts.replicas ?? 1 })
        await os.status() // init() swallows some failures: make sure the bucket is there
        return [jsm, os]
      },
      catch: (e) => openError(e, "Is JetStream enabled on that server (`nats-server -js`, or `jetstream {}` in its config)?")
    })

    /** One JetStream operation, each attempt bounded, retried while NATS is unreachable. */
    const attempt = <A>(op: CheckpointStoreOp, where: string, run: () => Promise<A>) =>
      Effect.tryPromise({
        try: run,
        catch: (e) => {
          const corrupt = /corrupt|digests do not match/i.test(textOf(e))
          return new CheckpointStoreError({
            op,
            reason: corrupt ? "corrupt" : isTransient(e) ? "unavailable" : "io",
            where,
            message: `checkpoint store (jetstream): cannot ${op} ${where}: ${textOf(e)}`,
            cause: e
          })
        }
      }).pipe(
        Effect.timeoutOrElse({
          duration: ATTEMPT_TIMEOUT_MS,
          orElse: () =>
            Effect.fail(
              new CheckpointStoreError({
                op,
                reason: "unavailable",
                where,
                message: `checkpoint store (jetstream): ${op} ${where} got no answer within ${ATTEMPT_TIMEOUT_MS} ms`
              })
            )
        }),
        Effect.retry({
          schedule: Schedule.max([Schedule.spaced("500 millis"), Schedule.during(retryForMs)]),
          while: (e: CheckpointStoreError) => e.reason === "unavailable"
        })
      )

    /** Every live object of the bucket whose key belongs to this shard. */
    const keysOf = (job: string, shard: number) =>
      attempt("list", at(`${job}/ps-${shard}/`), async () => {
        const si = await jsm.streams.info(stream, { subjects_filter: `$O.${bucket}.M.>` })
        const out: Array<{ key: string; version: number }> = []
        for (const subject of Object.keys(si.state.subjects ?? {})) {
          const key = keyOfMetaToken(subject.slice(`$O.${bucket}.M.`.length))
          const m = KEY.exec(key)
          if (m !== null && m[1] === job && Number(m[2]) === shard) out.push({ key, version: Number(m[3]) })
        }
        return out.sort((a, b) => a.version - b.version)
      })

    const list: CheckpointStoreShape["list"] = (job, shard) =>
      checkArgs("list", job, shard).pipe(
        Effect.andThen(() => keysOf(job, shard)),
        Effect.flatMap((keys) =>
          Effect.forEach(keys, ({ key, version }) =>
            attempt("list", at(key), () => os.info(key)).pipe(
              Effect.map((info) =>
                info === null || info.deleted
                  ? []
                  : [{ job, shard, version, where: at(key), writtenAt: Date.parse(info.mtime) } satisfies CheckpointRef]
              )
            ))
        ),
        Effect.map((refs) => refs.flat())
      )

    /** Remove an object and its metadata entirely (nats.js's delete leaves a marker forever). */
    const remove = (op: CheckpointStoreOp, key: string) =>
      attempt(op, at(key), async () => {
        const info = await os.info(key)
        await jsm.streams.purge(stream, { filter: `$O.${bucket}.M.${metaToken(key)}` })
        if (info !== null && info.nuid !== "") await jsm.streams.purge(stream, { filter: `$O.${bucket}.C.${info.nuid}` })
      })

    const save: CheckpointStoreShape["save"] = (job, shard, version, bytes) =>
      checkArgs("save", job, shard, version).pipe(
        Effect.andThen(() => {
          const key = objectKey(job, shard, version)
          return attempt("save", at(key), () =>
            os.putBlob(
              { name: key, options: { max_chunk_size: opts.chunkBytes ?? DEFAULT_CHUNK_BYTES } },
              bytes,
              { timeout: timeout + Math.ceil(bytes.byteLength / 2 ** 20) * SAVE_MS_PER_MIB }
            )).pipe(
              Effect.map((info): CheckpointRef => ({ job, shard, version, where: at(key), writtenAt: Date.parse(info.mtime) }))
            )
        }),
        Effect.tap((ref) =>
          keysOf(job, shard).pipe(
            Effect.flatMap((keys) =>
              Effect.forEach(
                toPrune(keys, ref.version, keep),
                (k) => remove("save", k.key),
                { discard: true }
              )
            )
          )
        )
      )

    const load: CheckpointStoreShape["load"] = (ref) =>
      checkArgs("load", ref.job, ref.shard, ref.version).pipe(
        Effect.andThen(() => {
          const key = objectKey(ref.job, ref.shard, ref.version)
          return attempt("load", at(key), () => os.getBlob(key)).pipe(
            Effect.flatMap((bytes) =>
              bytes === null
                ? Effect.fail(
                  new CheckpointStoreError({ op: "load", reason: "missing", where: at(key), message: `checkpoint store (jetstream): no object ${at(key)}` })
                )
                : Effect.succeed(bytes)
            )
          )
        })
      )

    const clear: CheckpointStoreShape["clear"] = (job, shard) =>
      checkArgs("clear", job, shard).pipe(
        Effect.andThen(() => keysOf(job, shard)),
        Effect.flatMap((keys) => Effect.forEach(keys, (k) => remove("clear", k.key), { discard: true }))
      )

    return { kind: "jetstream", save, list, load, clear } satisfies CheckpointStoreShape
  })

