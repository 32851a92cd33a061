/**
 * Implements: `CheckpointStore` — where parameter-server checkpoints live, as opaque bytes
 * (the PS encodes and decodes them; this file never parses them), with two layers:
 *   file       (the default) `<dir>/<job>/ps-<shard>/v<version padded to 8>.ckpt`, written
 *              to a temp file in the same directory, fsynced, renamed over, then the
 *              directory fsynced: a crash leaves the old checkpoint or the new, never half;
 *   jetstream  a JetStream object store (bucket `flotilla-checkpoints`, key
 *              `<job>/ps-<shard>/v<version>`), so a PS relaunched on another host resumes
 *              too: shared/checkpoint/jetstream.ts.
 * Plus `loadNewest`: newest first, a corrupt one reported and the previous one used.
 * Does not own: the checkpoint format (actors/param-server/checkpoint.ts), when to save.
 *
 * Semantics both layers keep (test/checkpoint.store.test.ts checks them):
 *   - `list` is oldest first (by version); a leftover temp file or orphan chunk is ignored;
 *   - a save is the newest: it keeps the newest `keep` (default 3) of this shard with a
 *     version ≤ its own and removes the rest, including any higher version (left by a
 *     timeline that was rolled back, so a later resume cannot pick it);
 *   - `load` locates by (job, shard, version); `where` is for people to read;
 *   - jobs and shards are isolated; `clear` removes every checkpoint of one shard.
 */
import { randomBytes } from "node:crypto"
import * as fsp from "node:fs/promises"
import { join } from "node:path"
import { connect, StorageType } from "nats"
import type { JetStreamManager, NatsConnection, ObjectStore } from "nats"
import * as Context from "effect/Context"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Schedule from "effect/Schedule"
import type * as Scope from "effect/Scope"
import type { NatsAuth } from "../bus/nats.ts"
import { isToken } from "../protocol/subjects.ts"
import { makeJetStreamStore } from "./jetstream.ts"
export { makeJetStreamStore }

export interface CheckpointRef {
  readonly job: string
  readonly shard: number
  readonly version: number
  /** A path, or `jetstream://<bucket>/<key>`. */
  readonly where: string
  /** ms since the epoch (file mtime, or the object's mtime). */
  readonly writtenAt: number
}

export type CheckpointStoreOp = "open" | "save" | "list" | "load" | "clear"

/**
 * Why an operation failed: `invalid` (a bad job, shard or version), `missing` (no such
 * checkpoint), `corrupt` (the store's own check failed, e.g. a JetStream digest), `io`
 * (the disk or the server refused), `unavailable` (NATS unreachable past `retryForMs`).
 */
export type CheckpointStoreReason = "invalid" | "missing" | "corrupt" | "io" | "unavailable"

export class CheckpointStoreError extends Data.TaggedError("CheckpointStoreError")<{
  readonly op: CheckpointStoreOp
  readonly reason: CheckpointStoreReason
  readonly where: string
  readonly message: string
  readonly cause?: unknown
}> {}

export interface CheckpointStoreShape {
  readonly kind: "file" | "jetstream"
  /** Atomic; keeps the newest `keep` of this shard (see the top of this file). */
  save(job: string, shard: number, version: number, bytes: Uint8Array): Effect.Effect<CheckpointRef, CheckpointStoreError>
  /** Oldest first. */
  list(job: string, shard: number): Effect.Effect<ReadonlyArray<CheckpointRef>, CheckpointStoreError>
  load(ref: CheckpointRef): Effect.Effect<Uint8Array, CheckpointStoreError>
  /** Remove every checkpoint of this shard (a fresh run, `--no-resume`). */
  clear(job: string, shard: number): Effect.Effect<void, CheckpointStoreError>
}

/** Defaults, in one place. */
export const DEFAULT_KEEP = 3
export const DEFAULT_BUCKET = "flotilla-checkpoints"
/** Object-store chunk size; nats.js clamps it to the server's max_payload (1 MiB default). */
export const DEFAULT_CHUNK_BYTES = 256 * 1024
/** How long a JetStream operation keeps retrying while NATS is unreachable. */
export const DEFAULT_RETRY_FOR_MS = 60_000
/**
 * Per JetStream request (the nats.js default). A request written just as the server went
 * away is lost, so this is also how long a restart can stall one attempt (then it retries).
 */
export const DEFAULT_REQUEST_TIMEOUT_MS = 5_000
/** A save's chunk acks queue behind its bytes: its timeout grows by this per MiB (≥ 4 MiB/s). */
export const SAVE_MS_PER_MIB = 250
/** One whole attempt (a load streams every chunk) is abandoned and retried after this. */
export const ATTEMPT_TIMEOUT_MS = 120_000

export interface FileStoreOptions {
  readonly keep?: number
}

export interface JetStreamStoreOptions {
  /** One or more server URLs, e.g. "nats://127.0.0.1:4222". */
  readonly servers: string | ReadonlyArray<string>
  /** Object-store bucket; created when missing. Default DEFAULT_BUCKET. */
  readonly bucket?: string
  readonly keep?: number
  /** Connection name shown by the server. */
  readonly name?: string
  /** Replicas of a bucket this layer creates (3 on a 3-node cluster); default 1. */
  readonly replicas?: number
  readonly chunkBytes?: number
  readonly requestTimeoutMs?: number
  readonly retryForMs?: number
  /** Keep trying the first connect instead of failing the layer; default false. */
  readonly waitOnFirstConnect?: boolean
  /** Credentials and TLS of its connection (shared/bus/nats.ts); none: anonymous. */
  readonly auth?: NatsAuth
}

export class CheckpointStore extends Context.Service<CheckpointStore, CheckpointStoreShape>()(
  "flotilla/shared/checkpoint/store/CheckpointStore"
) {
  static readonly layerFile = (dir: string, opts?: FileStoreOptions): Layer.Layer<CheckpointStore> =>
    Layer.sync(CheckpointStore, () => makeFileStore(dir, opts))
  static readonly layerJetStream = (opts: JetStreamStoreOptions): Layer.Layer<CheckpointStore, CheckpointStoreError> =>
    Layer.effect(CheckpointStore, makeJetStreamStore(opts))
}

// ---------------------------------------------------------------------------------------
// Shared by both layers.

const VERSION_DIGITS = 8
export const textOf = (e: unknown): string => (e instanceof Error ? e.message : String(e))

export const checkArgs = (op: CheckpointStoreOp, job: string, shard: number, version?: number) =>
  Effect.suspend(() => {
    const bad = !isToken(job)
      ? `job ${JSON.stringify(job)} is not a valid name: use 1-64 of [A-Za-z0-9_-]`
      : !Number.isSafeInteger(shard) || shard < 0
      ? `shard ${shard} is not a non-negative integer`
      : version !== undefined && (!Number.isSafeInteger(version) || version < 0)
      ? `version ${version} is not a non-negative integer`
      : undefined
    return bad === undefined
      ? Effect.void
      : Effect.fail(new CheckpointStoreError({ op, reason: "invalid", where: `${job}/ps-${shard}`, message: `checkpoint store: ${bad}` }))
  })

/** Given refs oldest first and the version just saved: the ones to remove. */
export const toPrune = <R extends { readonly version: number }>(refs: ReadonlyArray<R>, saved: number, keep: number): R[] => {
  const newer = refs.filter((r) => r.version > saved)
  const upTo = refs.filter((r) => r.version <= saved)
  return [...newer, ...upTo.slice(0, Math.max(0, upTo.length - keep))]
}

export const validKeep = (keep: number | undefined): number => {
  const k = keep ?? DEFAULT_KEEP
  if (!Number.isSafeInteger(k) || k < 1) throw new Error(`checkpoint store: keep must be an integer ≥ 1, got ${keep}`)
  return k
}

// ---------------------------------------------------------------------------------------
// File layer.

/** A checkpoint file's name in a shard's folder, and its version. */
export const CKPT_NAME = /^v(\d+)\.ckpt$/
const TEMP_NAME = /^v(\d+)\.ckpt\.tmp-/

export const checkpointFileName = (version: number) => `v${String(version).padStart(VERSION_DIGITS, "0")}.ckpt`

export const makeFileStore = (dir: string, opts?: FileStoreOptions): CheckpointStoreShape => {
  const keep = validKeep(opts?.keep)
  const shardDir = (job: string, shard: number) => join(dir, job, `ps-${shard}`)
  const ioError = (op: CheckpointStoreOp, where: string) => (e: unknown) =>
    new CheckpointStoreError({
      op,
      reason: (e as NodeJS.ErrnoException)?.code === "ENOENT" && op === "load" ? "missing" : "io",
      where,
      message: `checkpoint store (file): cannot ${op} ${where}: ${textOf(e)}`,
      cause: e
    })

  const list: CheckpointStoreShape["list"] = (job, shard) =>
    checkArgs("list", job, shard).pipe(
      Effect.andThen(() => {
        const d = shardDir(job, shard)
        return Effect.tryPromise({
          try: async () => {
            const names = await fsp.readdir(d).catch((e) => {
              if ((e as NodeJS.ErrnoException).code === "ENOENT") return [] as string[]
              throw e
            })
            const refs: CheckpointRef[] = []
            for (const n of names) {
              const m = CKPT_NAME.exec(n)
              if (m === null) continue
              const where = join(d, n)
              const st = await fsp.stat(where).catch(() => undefined) // removed meanwhile
              if (st?.isFile() === true) refs.push({ job, shard, version: Number(m[1]), where, writtenAt: st.mtimeMs })
            }
            return refs.sort((a, b) => a.version - b.version)
          },
          catch: ioError("list", d)
        })
      })
    )

  const save: CheckpointStoreShape["save"] = (job, shard, version, bytes) =>
    checkArgs("save", job, shard, version).pipe(
      Effect.andThen(() => {
        const d = shardDir(job, shard)
        const where = join(d, checkpointFileName(version))
        const tmp = `${where}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`
        return Effect.tryPromise({
          try: async () => {
            await fsp.mkdir(d, { recursive: true })
            try {
              const fh = await fsp.open(tmp, "w")
              try {
                await fh.writeFile(bytes)
                await fh.sync()
              } finally {
                await fh.close()
              }
              await fsp.rename(tmp, where)
            } catch (e) {
              await fsp.rm(tmp, { force: true }).catch(() => {})
              throw e
            }
            await fsyncDir(d)
            return (await fsp.stat(where)).mtimeMs
          },
          catch: ioError("save", where)
        }).pipe(
          Effect.map((writtenAt): CheckpointRef => ({ job, shard, version, where, writtenAt })),
          Effect.tap((ref) => pruneFiles(d, ref.version))
        )
      })
    )

  /** Old checkpoints (see toPrune), and temp files of versions below the oldest kept. */
  const pruneFiles = (d: string, saved: number) =>
    Effect.tryPromise({
      try: async () => {
        const names = await fsp.readdir(d)
        const refs = names.flatMap((n) => {
          const m = CKPT_NAME.exec(n)
          return m === null ? [] : [{ version: Number(m[1]), where: join(d, n) }]
        }).sort((a, b) => a.version - b.version)
        const gone = toPrune(refs, saved, keep)
        const kept = refs.filter((r) => !gone.includes(r))
        const oldestKept = kept.length > 0 ? kept[0].version : saved
        for (const r of gone) await fsp.rm(r.where, { force: true })
        for (const n of names) {
          const m = TEMP_NAME.exec(n)
          if (m !== null && Number(m[1]) < oldestKept) await fsp.rm(join(d, n), { force: true })
        }
      },
      catch: ioError("save", d)
    })

  const load: CheckpointStoreShape["load"] = (ref) =>
    checkArgs("load", ref.job, ref.shard, ref.version).pipe(
      Effect.andThen(() => {
        const where = join(shardDir(ref.job, ref.shard), checkpointFileName(ref.version))
        return Effect.tryPromise({
          try: async () => new Uint8Array(await fsp.readFile(where)),
          catch: ioError("load", where)
        })
      })
    )

  const clear: CheckpointStoreShape["clear"] = (job, shard) =>
    checkArgs("clear", job, shard).pipe(
      Effect.andThen(() => {
        const d = shardDir(job, shard)
        return Effect.tryPromise({ try: () => fsp.rm(d, { recursive: true, force: true }), catch: ioError("clear", d) })
      })
    )

  return { kind: "file", save, list, load, clear }
}

/** Make a rename durable. Some filesystems refuse fsync on a directory: that is not an error. */
const fsyncDir = async (d: string): Promise<void> => {
  let fh: fsp.FileHandle | undefined
  try {
    fh = await fsp.open(d, "r")
    await fh.sync()
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code
    if (code !== "EISDIR" && code !== "EINVAL" && code !== "EPERM" && code !== "ENOTSUP") throw e
  } finally {
    await fh?.close()
  }
}

// ---------------------------------------------------------------------------------------
// Resume.

/**
 * The newest checkpoint of a shard that loads and decodes, trying newest first. One that
 * is corrupt (the store's check, a missing file, or `decode` throwing) is reported
 * through `onCorrupt` (default: a warning in the log) and the previous one is tried.
 * None when there is none. Fails only when the store cannot be reached or listed, so an
 * unreachable store never passes for "no checkpoint, start fresh".
 */
export const loadNewest = <T>(
  store: CheckpointStoreShape,
  job: string,
  shard: number,
  decode: (bytes: Uint8Array, where: string) => T,
  onCorrupt?: (ref: CheckpointRef, why: string) => void
): Effect.Effect<Option.Option<{ readonly ref: CheckpointRef; readonly value: T }>, CheckpointStoreError> =>
  Effect.gen(function*() {
    const refs = yield* store.list(job, shard)
    const report = (ref: CheckpointRef, why: string) =>
      onCorrupt !== undefined
        ? Effect.sync(() => onCorrupt(ref, why))
        : Effect.logWarning(`checkpoint ${ref.where} is unusable, trying the previous one: ${why}`)
    for (const ref of [...refs].reverse()) {
      const loaded = yield* store.load(ref).pipe(
        Effect.map(Option.some),
        Effect.catchTag("CheckpointStoreError", (e) =>
          e.reason === "unavailable" || e.reason === "invalid"
            ? Effect.fail(e)
            : report(ref, e.message).pipe(Effect.as(Option.none<Uint8Array>())))
      )
      if (Option.isNone(loaded)) continue
      const decoded = yield* Effect.try({ try: () => decode(loaded.value, ref.where), catch: (e) => textOf(e) }).pipe(
        Effect.map(Option.some),
        Effect.catch((why) => report(ref, why).pipe(Effect.as(Option.none<T>())))
      )
      if (Option.isSome(decoded)) return Option.some({ ref, value: decoded.value })
    }
    return Option.none()
  })
