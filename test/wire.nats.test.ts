// Implements: the tensor wire transport over a real NATS server (test/support/nats.ts,
// max_payload 1 MiB so bundles really are chunked) and, as the same suite, over the
// in-process bus: round trips from 1 byte to 64 MiB with identical bytes, claims through
// a queue group, chunked request/reply, and every receive-side failure reported through
// onError with the message id.
// Run: npx vitest run test/wire.nats.test.ts
// Does not own: the pure format and framing checks (test/wire.test.ts).
import { describe, expect, layer } from "@effect/vitest"
import { Context, Effect, Layer, Queue, Result } from "effect"
import { Bus, encodeJson } from "../shared/bus/Bus.ts"
import type { BusShape, Headers } from "../shared/bus/Bus.ts"
import { InProcessBus } from "../shared/bus/inprocess.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { frameMessage, H, newMessageId } from "../shared/wire/frames.ts"
import { encodeBundle, manifestToJson } from "../shared/wire/tensor.ts"
import type { BundleMeta, TensorBundle } from "../shared/wire/tensor.ts"
import { receiveBundles, replyWithBundle, requestBundle, sendBundle } from "../shared/wire/transport.ts"
import type { BundleInfo, ReceiveError } from "../shared/wire/transport.ts"
import { acquireNats } from "./support/nats.ts"
import type { AcquiredNats } from "./support/nats.ts"

class TestNats extends Context.Service<TestNats, AcquiredNats>()("flotilla/test/wire/TestNats") {}

const natsBusLayer = Layer.unwrap(
  Effect.gen(function*() {
    const n = yield* TestNats
    return NatsBus.layer({ servers: n.url, name: "wire-test" })
  })
).pipe(
  Layer.provideMerge(
    Layer.effect(TestNats, Effect.acquireRelease(Effect.promise(() => acquireNats({ maxPayload: 1024 * 1024 })), (n) => Effect.promise(() => n.stop())))
  )
)

const MiB = 1024 * 1024
const uniq = (): string => `w${Math.random().toString(36).slice(2, 10)}`
const meta = (sender = "w-1"): BundleMeta => ({ kind: "grads", job: "test", version: 3, step: 9, sender, codec: "int8-block" })
const TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

/** One int8 tensor of exactly `n` data bytes (plus one scale), filled with a pattern. */
const bundleOf = (n: number, sender?: string): TensorBundle => {
  const data = new Int8Array(n)
  for (let i = 0; i < n; i++) data[i] = (i * 7 + (i >>> 12)) & 0xff
  return { meta: meta(sender), tensors: [{ name: "blob", dtype: "int8", shape: [n], data, scales: Float32Array.of(0.5), blockSize: Math.max(1, n) }] }
}
const sameBytes = (a: ArrayBufferView, b: ArrayBufferView) =>
  Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))

type Got = { readonly bundle: TensorBundle; readonly info: BundleInfo }
type Err = { readonly e: ReceiveError; readonly id: string | undefined }

/** Receive on `subject` into queues of bundles and errors. */
const listen = (bus: BusShape, subject: string, opts: { queue?: string; timeoutMs?: number } = {}) =>
  Effect.gen(function*() {
    const got = yield* Queue.unbounded<Got>()
    const errors = yield* Queue.unbounded<Err>()
    yield* receiveBundles(bus, subject, (bundle, info) => Queue.offer(got, { bundle, info }), {
      ...opts,
      onError: (e, { id }) => Queue.offer(errors, { e, id }).pipe(Effect.asVoid)
    })
    yield* bus.flush()
    return { got, errors }
  })

const take = <A>(q: Queue.Queue<A>, ms = 15_000) => Queue.take(q).pipe(Effect.timeout(ms))

const suite = (name: string, busLayer: Layer.Layer<Bus, unknown>) =>
  layer(busLayer, { excludeTestServices: true, timeout: 60_000 })(name, (it) => {
    it.effect("round-trips bundles from 1 byte to 64 MiB with identical bytes, chunked under max_payload", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        expect(bus.maxPayload).toBeLessThanOrEqual(MiB)
        const s = `${uniq()}.grads`
        const { got, errors } = yield* listen(bus, s)
        for (const n of [1, 1024, MiB - 1, MiB + 1, 8 * MiB, 64 * MiB]) {
          const b = bundleOf(n)
          const sent = yield* sendBundle(bus, s, b, { headers: { traceparent: TRACE }, flush: true })
          expect(sent.frames).toBe(Math.max(1, sent.frames))
          if (n > MiB) expect(sent.frames).toBeGreaterThan(1)
          const { bundle, info } = yield* take(got)
          expect(info.id).toBe(sent.id)
          expect(info.bytes).toBe(sent.bytes)
          expect(info.chunks).toBe(sent.frames)
          expect(info.headers.traceparent).toBe(TRACE)
          expect(bundle.meta).toEqual(b.meta)
          const t = bundle.tensors[0]
          expect(t.shape).toEqual([n])
          expect(sameBytes(t.data, b.tensors[0].data)).toBe(true)
          expect(Array.from(t.scales!)).toEqual([0.5])
        }
        expect(yield* Queue.size(errors)).toBe(0)
      }), 60_000)

    it.effect("borrow: bundles are views into a recycled buffer, valid during onBundle", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.borrow`
        const copies = yield* Queue.unbounded<Uint8Array>()
        const buffers = new Set<ArrayBufferLike>()
        yield* receiveBundles(bus, s, (bundle) =>
          Effect.sync(() => {
            const t = bundle.tensors[0].data
            buffers.add(t.buffer)
            return new Uint8Array(t.buffer, t.byteOffset, t.byteLength).slice()
          }).pipe(Effect.flatMap((c) => Queue.offer(copies, c))), { borrow: true })
        yield* bus.flush()
        const sent = [bundleOf(2 * MiB + 1), bundleOf(2 * MiB + 1), bundleOf(2 * MiB + 1)]
        sent[1].tensors[0].data.fill(5)
        for (const b of sent) {
          yield* sendBundle(bus, s, b, { flush: true })
          const got = yield* take(copies)
          expect(sameBytes(got, b.tensors[0].data)).toBe(true)
        }
        expect(buffers.size).toBe(1) // one buffer, reused for every bundle
      }))

    it.effect("claim: a multi-frame bundle sent to a queue group reaches exactly one member, whole", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.push`
        const a = yield* listen(bus, s, { queue: "ps-0" })
        const b = yield* listen(bus, s, { queue: "ps-0" })
        const n = 6
        const ids = new Set<string>()
        for (let i = 0; i < n; i++) ids.add((yield* sendBundle(bus, s, bundleOf(3 * MiB + i, `w-${i}`), { claim: true, headers: { traceparent: TRACE } })).id)
        const seen: Array<string> = []
        while (seen.length < n) {
          const from = yield* Effect.raceFirst(take(a.got), take(b.got))
          expect(from.bundle.tensors[0].data.length).toBe(3 * MiB + Number(from.bundle.meta.sender.slice(2)))
          expect(from.info.headers.traceparent).toBe(TRACE)
          seen.push(from.info.id)
        }
        expect(new Set(seen)).toEqual(ids)
        expect((yield* Queue.size(a.got)) + (yield* Queue.size(b.got))).toBe(0)
        expect((yield* Queue.size(a.errors)) + (yield* Queue.size(b.errors))).toBe(0)
      }))

    it.effect("request/reply: the reply bundle comes back chunked through the requester's inbox", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.pull`
        const params = bundleOf(5 * MiB + 3, "ps-0")
        yield* bus.subscribe(s, (req) =>
          req.data[0] === 1
            ? replyWithBundle(bus, req, params)
            : bus.respond(req, encodeJson({ _tag: "Rejected", reason: "no such version" })), { queue: "ps" })
        yield* bus.flush()
        const r = yield* requestBundle(bus, s, Uint8Array.of(1), { headers: { traceparent: TRACE }, timeoutMs: 10_000 })
        expect(sameBytes(r.bundle.tensors[0].data, params.tensors[0].data)).toBe(true)
        expect(r.info.chunks).toBeGreaterThan(5)
        expect(r.reply.headers[H.id]).toBe(r.info.id)
        const refused = yield* Effect.flip(requestBundle(bus, s, Uint8Array.of(0)))
        expect(refused._tag).toBe("BundleReplyError")
        expect(refused.message).toContain("no such version")
        // a responder that announces a bundle and then sends only part of it
        const partial = `${s}.partial`
        yield* bus.subscribe(partial, (req) =>
          Effect.gen(function*() {
            const { manifest, payload } = Result.getOrThrow(encodeBundle(params))
            const frames = Result.getOrThrow(frameMessage(payload, { id: "p-1", maxPayload: bus.maxPayload, manifest: manifestToJson(manifest) }))
            yield* bus.respond(req, new Uint8Array(0), { [H.id]: "p-1" })
            yield* bus.publish(req.headers["Flotilla-Inbox"], frames[1].data, { headers: frames[1].headers })
          }))
        yield* bus.flush()
        const late = yield* Effect.flip(requestBundle(bus, partial, Uint8Array.of(1), { timeoutMs: 500 }))
        expect(late._tag).toBe("WireFrameError")
        if (late._tag === "WireFrameError") {
          expect(late.reason).toBe("timeout")
          expect(late.message).toMatch(/1 of \d+ chunks/)
        }
      }))

    it.effect("reports corrupt, missing-manifest and incomplete messages through onError with their id", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.bad`
        const { got, errors } = yield* listen(bus, s, { timeoutMs: 400 })
        const publish = (frames: ReadonlyArray<{ headers: Headers; data: Uint8Array }>) =>
          Effect.forEach(frames, (f) => bus.publish(s, f.data, { headers: f.headers }), { discard: true })
        const framesOf = (n: number, withManifest = true) => {
          const { manifest, payload } = Result.getOrThrow(encodeBundle(bundleOf(n)))
          const id = newMessageId("t")
          const frames = Result.getOrThrow(frameMessage(payload, { id, maxPayload: bus.maxPayload, manifest: withManifest ? manifestToJson(manifest) : undefined }))
          return { id, frames }
        }
        // corrupt: flip one byte of chunk 1
        const c = framesOf(2 * MiB)
        const flipped = new Uint8Array(c.frames[1].data)
        flipped[12345] ^= 1
        yield* publish([c.frames[0], { headers: c.frames[1].headers, data: flipped }, c.frames[2]])
        // no manifest
        const m = framesOf(1000, false)
        yield* publish(m.frames)
        // missing chunk: never completes, reported by the sweeper
        const t = framesOf(2 * MiB)
        yield* publish([t.frames[0], t.frames[2]])
        // and a good one still gets through
        const g = yield* sendBundle(bus, s, bundleOf(10))
        yield* bus.flush()
        const reasons = new Map<string | undefined, string>()
        for (let i = 0; i < 3; i++) {
          const { e, id } = yield* take(errors)
          reasons.set(id, e.reason)
        }
        expect(reasons).toEqual(new Map([[c.id, "chunk-crc-mismatch"], [m.id, "missing-manifest"], [t.id, "timeout"]]))
        expect((yield* take(got)).info.id).toBe(g.id)
        expect(yield* Queue.size(got)).toBe(0)
      }))
  })

describe("wire over the bus", () => {
  suite("in-process bus", InProcessBus.layer())
  suite("NATS bus (real nats-server, max_payload 1 MiB)", natsBusLayer)
})
