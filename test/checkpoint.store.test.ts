// Implements: the CheckpointStore contract — one suite run against both layers (files in a
// temp dir; a JetStream object store on a real nats-server from test/support/nats.ts), plus
// JetStream-only tests (a nats-server restart, a server without JetStream, no server).
// Run: npx vitest run test/checkpoint.store.test.ts
// Does not own: the store (shared/checkpoint/store.ts), the PS checkpoint format.
//
// Each layer-specific trick (a half-written save, a corrupted checkpoint, what is left on
// the store) comes from a small Harness, so the contract itself never looks inside a store.
// Live clock (`excludeTestServices`): NATS timeouts are real time. Every test uses its own
// job name and the JetStream suite its own bucket, so a shared server is fine.
import { randomBytes } from "node:crypto"
import * as fsp from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { describe, expect, it, layer } from "@effect/vitest"
import { connect } from "nats"
import type { NatsConnection } from "nats"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import type * as Scope from "effect/Scope"
import { CheckpointStore, CheckpointStoreError, loadNewest, makeFileStore, makeJetStreamStore } from "../shared/checkpoint/store.ts"
import { encodeCheckpoint } from "../actors/param-server/checkpoint.ts"
import { loadInitWeights } from "../actors/param-server/init.ts"
import type { CheckpointRef, CheckpointStoreShape } from "../shared/checkpoint/store.ts"
import { acquireNats } from "./support/nats.ts"

interface HarnessShape {
  readonly store: CheckpointStoreShape
  /** Another instance on the same storage: another process, or another host. */
  open(opts?: { keep?: number }): Effect.Effect<CheckpointStoreShape, CheckpointStoreError, Scope.Scope>
  /** What a save killed half-way leaves behind. */
  leaveHalfWritten(job: string, shard: number, version: number, bytes: Uint8Array): Effect.Effect<void>
  /** Damage a stored checkpoint underneath the store. */
  corrupt(ref: CheckpointRef): Effect.Effect<void>
  /** How many entries of this shard the storage still holds (files, or object metadata). */
  leftovers(job: string, shard: number): Effect.Effect<number>
}
class Harness extends Context.Service<Harness, HarnessShape>()("flotilla/test/checkpoint/Harness") {}

const uniq = (): string => `j${Math.random().toString(36).slice(2, 10)}`

/** A tiny self-checking format standing in for the PS's: magic, length, payload. */
const encode = (payload: Uint8Array): Uint8Array => {
  const out = new Uint8Array(8 + payload.length)
  out.set([0x54, 0x43, 0x4b, 0x50]) // "TCKP"
  new DataView(out.buffer).setUint32(4, payload.length, true)
  out.set(payload, 8)
  return out
}
const decode = (bytes: Uint8Array, where: string): Uint8Array => {
  if (bytes.length < 8 || bytes[0] !== 0x54 || bytes[1] !== 0x43) throw new Error(`${where}: bad magic`)
  const n = new DataView(bytes.buffer, bytes.byteOffset).getUint32(4, true)
  if (bytes.length !== 8 + n) throw new Error(`${where}: ${bytes.length - 8} payload bytes, header says ${n}`)
  return bytes.subarray(8)
}
const text = (s: string) => new TextEncoder().encode(s)
const str = (b: Uint8Array) => new TextDecoder().decode(b)
const versions = (refs: ReadonlyArray<CheckpointRef>) => refs.map((r) => r.version)
const sameBytes = (a: Uint8Array, b: Uint8Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(b)

// ---------------------------------------------------------------------------------------
// Harnesses.

const fileHarness = Layer.effect(
  Harness,
  Effect.gen(function*() {
    const dir = yield* Effect.acquireRelease(
      Effect.promise(() => fsp.mkdtemp(path.join(os.tmpdir(), "flotilla-ckpt-"))),
      (d) => Effect.promise(() => fsp.rm(d, { recursive: true, force: true }))
    )
    const shardDir = (job: string, shard: number) => path.join(dir, job, `ps-${shard}`)
    return {
      store: makeFileStore(dir),
      open: (opts) => Effect.succeed(makeFileStore(dir, opts)),
      leaveHalfWritten: (job, shard, version, bytes) =>
        Effect.promise(async () => {
          await fsp.mkdir(shardDir(job, shard), { recursive: true })
          const name = `v${String(version).padStart(8, "0")}.ckpt.tmp-99999-dead`
          await fsp.writeFile(path.join(shardDir(job, shard), name), bytes.subarray(0, bytes.length >> 1))
        }),
      corrupt: (ref) =>
        Effect.promise(async () => {
          const bytes = await fsp.readFile(ref.where)
          await fsp.writeFile(ref.where, bytes.subarray(0, bytes.length - 3)) // truncated
        }),
      leftovers: (job, shard) => Effect.promise(() => fsp.readdir(shardDir(job, shard)).then((n) => n.length, () => 0))
    } satisfies HarnessShape
  })
)

const metaTokenToKey = (t: string) => Buffer.from(t.replace(/-/g, "+").replace(/_/g, "/"), "base64").toString("latin1")

const jetstreamHarness = Layer.effect(
  Harness,
  Effect.gen(function*() {
    const nats = yield* Effect.acquireRelease(
      Effect.promise(() => acquireNats({ jetstream: true })),
      (n) => Effect.promise(() => n.stop())
    )
    const bucket = `ckpt-test-${uniq()}`
    const open = (o?: { keep?: number }) => makeJetStreamStore({ servers: nats.url, bucket, keep: o?.keep, retryForMs: 20_000 })
    const store = yield* open()
    const nc: NatsConnection = yield* Effect.acquireRelease(
      Effect.promise(() => connect({ servers: nats.url })),
      (c) => Effect.promise(() => c.close())
    )
    const js = nc.jetstream()
    const objects = yield* Effect.promise(() => js.views.os(bucket))
    return {
      store,
      open,
      leaveHalfWritten: (_job, _shard, _version, bytes) =>
        // a put killed before its metadata: chunks under a fresh id, no meta entry
        Effect.promise(() => js.publish(`$O.${bucket}.C.${randomBytes(11).toString("hex")}`, bytes.subarray(0, bytes.length >> 1))),
      corrupt: (ref) =>
        Effect.promise(async () => {
          const info = await objects.info(ref.where.slice(`jetstream://${bucket}/`.length))
          if (info === null) throw new Error(`no object for ${ref.where}`)
          await js.publish(`$O.${bucket}.C.${info.nuid}`, text("junk")) // an extra chunk: digest mismatch
        }),
      leftovers: (job, shard) =>
        Effect.promise(async () => {
          const jsm = await nc.jetstreamManager()
          const si = await jsm.streams.info(`OBJ_${bucket}`, { subjects_filter: `$O.${bucket}.M.>` })
          return Object.keys(si.state.subjects ?? {})
            .map((s) => metaTokenToKey(s.slice(`$O.${bucket}.M.`.length)))
            .filter((k) => k.startsWith(`${job}/ps-${shard}/`)).length
        })
    } satisfies HarnessShape
  })
)

// ---------------------------------------------------------------------------------------
// The contract.

const contract = (name: string, harness: Layer.Layer<Harness, unknown>) =>
  layer(harness, { excludeTestServices: true, timeout: 60_000 })(name, (it) => {
    it.effect("save / list / load round trip, oldest first", () =>
      Effect.gen(function*() {
        const { store } = yield* Harness
        const job = uniq()
        expect(yield* store.list(job, 0)).toEqual([])
        const r2 = yield* store.save(job, 0, 20, encode(text("twenty")))
        const r1 = yield* store.save(job, 0, 10, encode(text("ten")))
        expect(r1).toMatchObject({ job, shard: 0, version: 10 })
        expect(r1.writtenAt).toBeGreaterThan(Date.now() - 60_000)
        expect(r2.where).not.toEqual(r1.where)
        const refs = yield* store.list(job, 0)
        // saving 10 after 20 made 10 the newest: 20 belonged to a rolled-back timeline
        expect(versions(refs)).toEqual([10])
        const r3 = yield* store.save(job, 0, 30, encode(text("thirty")))
        const all = yield* store.list(job, 0)
        expect(versions(all)).toEqual([10, 30])
        expect(all.map((r) => r.where)).toEqual([r1.where, r3.where])
        expect(str(decode(yield* store.load(all[0]), "v10"))).toBe("ten")
        expect(str(decode(yield* store.load(all[1]), "v30"))).toBe("thirty")
      }))

    it.effect("init.from store:<job>: every shard at the newest version they all hold, merged (a fine-tune on another host)", () =>
      Effect.gen(function*() {
        const { store } = yield* Harness
        const job = uniq()
        const ck = (shard: number, version: number, name: string, value: number) =>
          encodeCheckpoint({
            job, shard, version, updates: version, optimizer: { kind: "sgd", momentum: 0, dampening: 0, nesterov: false, weightDecay: 0 } as never,
            consistency: { mode: "sync" }, log: { completeBelow: 0, epochs: [] }, params: new Map([[name, Float32Array.of(value, value)]]),
            shapes: new Map([[name, [2]]]), slots: new Map()
          })
        yield* store.save(job, 0, 10, ck(0, 10, "a", 1))
        yield* store.save(job, 0, 20, ck(0, 20, "a", 2))
        yield* store.save(job, 1, 10, ck(1, 10, "b", 3))
        const w = yield* loadInitWeights({ from: `store:${job}` }, store)
        expect(w.version).toBe(10)
        expect([...w.params].map(([k, v]) => [k, [...v]])).toEqual([["a", [1, 1]], ["b", [3, 3]]])
        const at = yield* loadInitWeights({ from: `store:${job}@9` }, store).pipe(Effect.flip)
        expect(at.message).toMatch(/no version at or below 9 is held by every one of its 2 shards/)
        const none = yield* loadInitWeights({ from: `store:${job}-nope` }, store).pipe(Effect.flip)
        expect(none.message).toMatch(/has no checkpoints of job/)
      }))

    it.effect("the file layer's layout, the JetStream layer's address", () =>
      Effect.gen(function*() {
        const { store } = yield* Harness
        const job = uniq()
        const ref = yield* store.save(job, 3, 7, encode(text("x")))
        if (store.kind === "file") expect(ref.where).toMatch(new RegExp(`/${job}/ps-3/v00000007\\.ckpt$`))
        else expect(ref.where).toMatch(new RegExp(`^jetstream://[^/]+/${job}/ps-3/v7$`))
      }))

    it.effect("keeps the newest 3 by default, and `keep` when given", () =>
      Effect.gen(function*() {
        const h = yield* Harness
        const job = uniq()
        for (let v = 1; v <= 5; v++) yield* h.store.save(job, 0, v * 10, encode(text(`v${v}`)))
        expect(versions(yield* h.store.list(job, 0))).toEqual([30, 40, 50])
        expect(yield* h.leftovers(job, 0)).toBe(3)
        const two = yield* h.open({ keep: 2 })
        yield* two.save(job, 0, 60, encode(text("v6")))
        expect(versions(yield* h.store.list(job, 0))).toEqual([50, 60])
      }))

    it.effect("clear removes every checkpoint of the shard, and nothing else", () =>
      Effect.gen(function*() {
        const h = yield* Harness
        const job = uniq()
        yield* h.store.clear(job, 0) // nothing there: fine
        for (const v of [1, 2]) {
          yield* h.store.save(job, 0, v, encode(text("a")))
          yield* h.store.save(job, 1, v, encode(text("b")))
        }
        yield* h.store.clear(job, 0)
        expect(yield* h.store.list(job, 0)).toEqual([])
        expect(yield* h.leftovers(job, 0)).toBe(0)
        expect(versions(yield* h.store.list(job, 1))).toEqual([1, 2])
        yield* h.store.save(job, 0, 1, encode(text("fresh")))
        expect(str(decode(yield* h.store.load((yield* h.store.list(job, 0))[0]), "fresh"))).toBe("fresh")
      }))

    it.effect("a save killed half-way is ignored; the next save of that version works", () =>
      Effect.gen(function*() {
        const h = yield* Harness
        const job = uniq()
        yield* h.store.save(job, 0, 1, encode(text("one")))
        const big = encode(randomBytes(300_000))
        yield* h.leaveHalfWritten(job, 0, 2, big)
        expect(versions(yield* h.store.list(job, 0))).toEqual([1])
        const got = yield* loadNewest(h.store, job, 0, decode)
        expect(Option.map(got, (g) => str(g.value))).toEqual(Option.some("one"))
        yield* h.store.save(job, 0, 2, big)
        const refs = yield* h.store.list(job, 0)
        expect(versions(refs)).toEqual([1, 2])
        expect(sameBytes(yield* h.store.load(refs[1]), big)).toBe(true)
      }))

    it.effect("loadNewest: a corrupt newest falls back to the previous, reported", () =>
      Effect.gen(function*() {
        const h = yield* Harness
        const job = uniq()
        expect(Option.isNone(yield* loadNewest(h.store, job, 0, decode))).toBe(true)
        yield* h.store.save(job, 0, 1, encode(text("good")))
        const damaged = yield* h.store.save(job, 0, 2, encode(text("damaged underneath")))
        yield* h.corrupt(damaged)
        yield* h.store.save(job, 0, 3, text("not a checkpoint at all")) // decode rejects it
        const reported: Array<[number, string]> = []
        const got = yield* loadNewest(h.store, job, 0, decode, (ref, why) => reported.push([ref.version, why]))
        expect(Option.isSome(got)).toBe(true)
        const { ref, value } = Option.getOrThrow(got)
        expect(ref.version).toBe(1)
        expect(str(value)).toBe("good")
        expect(reported.map(([v]) => v)).toEqual([3, 2])
        expect(reported[0][1]).toMatch(/bad magic/)
        // nothing loads: none, every one reported (default report: a log warning)
        const none = yield* loadNewest(h.store, job, 0, () => {
          throw new Error("refuse all")
        })
        expect(Option.isNone(none)).toBe(true)
      }))

    it.effect("a 20 MB checkpoint round trips", () =>
      Effect.gen(function*() {
        const h = yield* Harness
        const job = uniq()
        const big = randomBytes(20 * 1024 * 1024)
        const ref = yield* h.store.save(job, 0, 1, big)
        const back = yield* h.store.load(ref)
        expect(back.length).toBe(big.length)
        expect(sameBytes(back, big)).toBe(true)
      }), { timeout: 120_000 })

    it.effect("jobs and shards are isolated", () =>
      Effect.gen(function*() {
        const h = yield* Harness
        const [a, b] = [uniq(), uniq()]
        for (const job of [a, b]) {
          for (const shard of [0, 1]) {
            for (const v of [1, 2, 3, 4]) yield* h.store.save(job, shard, v * (shard + 1), encode(text(`${job}:${shard}:${v}`)))
          }
        }
        for (const job of [a, b]) {
          expect(versions(yield* h.store.list(job, 0))).toEqual([2, 3, 4])
          expect(versions(yield* h.store.list(job, 1))).toEqual([4, 6, 8])
          const newest = Option.getOrThrow(yield* loadNewest(h.store, job, 1, decode))
          expect(str(newest.value)).toBe(`${job}:1:4`)
        }
        yield* h.store.clear(a, 1)
        expect(yield* h.store.list(a, 1)).toEqual([])
        expect(versions(yield* h.store.list(b, 1))).toEqual([4, 6, 8])
        expect(versions(yield* h.store.list(a, 0))).toEqual([2, 3, 4])
      }))

    it.effect("relaunched elsewhere: a separate instance sees the same checkpoints", () =>
      Effect.gen(function*() {
        const h = yield* Harness
        const job = uniq()
        yield* h.store.save(job, 2, 50, encode(text("from host A")))
        const other = yield* h.open()
        const got = Option.getOrThrow(yield* loadNewest(other, job, 2, decode))
        expect(got.ref.version).toBe(50)
        expect(str(got.value)).toBe("from host A")
        yield* other.save(job, 2, 100, encode(text("from host B")))
        expect(versions(yield* h.store.list(job, 2))).toEqual([50, 100])
      }))

    it.effect("bad names and numbers fail with a CheckpointStoreError", () =>
      Effect.gen(function*() {
        const { store } = yield* Harness
        const bads: ReadonlyArray<Effect.Effect<unknown, CheckpointStoreError>> = [store.save("../etc", 0, 1, text("x")), store.list("a.b", 0), store.save("ok", -1, 1, text("x")), store.save("ok", 0, 1.5, text("x"))]
        for (const bad of bads) {
          const exit = yield* Effect.exit(bad)
          expect(Exit.isFailure(exit)).toBe(true)
          const err = yield* Effect.flip(bad)
          expect(err).toBeInstanceOf(CheckpointStoreError)
          expect(err.reason).toBe("invalid")
        }
        const missing = yield* Effect.flip(store.load({ job: uniq(), shard: 0, version: 1, where: "", writtenAt: 0 }))
        expect(missing.reason).toBe("missing")
      }))
  })

contract("CheckpointStore (file)", fileHarness)
contract("CheckpointStore (jetstream)", jetstreamHarness)

// ---------------------------------------------------------------------------------------
// JetStream only.

describe("CheckpointStore (jetstream) against the server's life", () => {
  it.live("survives a nats-server restart: a save after it works, and the data is still there", () =>
    Effect.gen(function*() {
      const nats = yield* Effect.acquireRelease(
        Effect.promise(() => acquireNats({ jetstream: true, restartable: true })),
        (n) => Effect.promise(() => n.stop())
      )
      const store = yield* makeJetStreamStore({ servers: nats.url, bucket: `ckpt-restart-${uniq()}`, retryForMs: 30_000 })
      const job = uniq()
      yield* store.save(job, 0, 1, encode(text("before")))
      yield* Effect.promise(() => nats.restart!())
      yield* store.save(job, 0, 2, encode(text("after")))
      const refs = yield* store.list(job, 0)
      expect(versions(refs)).toEqual([1, 2])
      expect(str(decode(yield* store.load(refs[0]), "v1"))).toBe("before")
      expect(str(decode(yield* store.load(refs[1]), "v2"))).toBe("after")
    }), { timeout: 90_000 })

  it.live("a server without JetStream: the layer fails, saying so", () =>
    Effect.gen(function*() {
      const nats = yield* Effect.acquireRelease(
        Effect.promise(() => acquireNats({ restartable: true })), // never $NATS_URL, which may have JetStream
        (n) => Effect.promise(() => n.stop())
      )
      const err = yield* Effect.flip(Layer.build(CheckpointStore.layerJetStream({ servers: nats.url })))
      expect(err).toBeInstanceOf(CheckpointStoreError)
      expect(err.op).toBe("open")
      expect(err.message).toMatch(/JetStream/)
    }), { timeout: 30_000 })

  it.live("no server: the layer fails, saying where it looked", () =>
    Effect.gen(function*() {
      const err = yield* Effect.flip(Layer.build(CheckpointStore.layerJetStream({ servers: "nats://127.0.0.1:1" })))
      expect(err.op).toBe("open")
      expect(err.message).toMatch(/127\.0\.0\.1:1/)
    }), { timeout: 30_000 })

  it.live("the file layer is the service too", () =>
    Effect.gen(function*() {
      const dir = yield* Effect.acquireRelease(
        Effect.promise(() => fsp.mkdtemp(path.join(os.tmpdir(), "flotilla-ckpt-"))),
        (d) => Effect.promise(() => fsp.rm(d, { recursive: true, force: true }))
      )
      const store = yield* Effect.provide(
        Effect.gen(function*() {
          return yield* CheckpointStore
        }),
        CheckpointStore.layerFile(dir, { keep: 1 })
      )
      expect(store.kind).toBe("file")
      yield* store.save("job", 0, 1, text("a"))
      yield* store.save("job", 0, 2, text("b"))
      expect(versions(yield* store.list("job", 0))).toEqual([2])
    }))
})
