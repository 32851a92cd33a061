// Implements: the Bus contract — one suite run against every implementation (the
// in-process bus and a real NATS server from test/support/nats.ts), plus NATS-only tests
// (surviving a nats-server restart).
// Run: npx vitest run test/bus.contract.test.ts
// Does not own: the implementations (shared/bus/*), the server helper (test/support/nats.ts).
//
// Tests use the live clock (`excludeTestServices`): NATS timeouts are real time. Every
// test uses its own random subject prefix, so a shared server ($NATS_URL) is fine.
import { describe, expect, layer } from "@effect/vitest"
import * as Deferred from "effect/Deferred"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Queue from "effect/Queue"
import * as Ref from "effect/Ref"
import * as TestClock from "effect/testing/TestClock"
import { Bus, decodeUtf8, encodeJson, encodeUtf8 } from "../shared/bus/Bus.ts"
import type { BusMessage, BusShape } from "../shared/bus/Bus.ts"
import { InProcessBus } from "../shared/bus/inprocess.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { NatsServerNotFoundError, startLocalNatsServer } from "../shared/bus/local-server.ts"
import { acquireNats } from "./support/nats.ts"
import type { AcquiredNats, AcquireNatsOptions } from "./support/nats.ts"

class TestNats extends Context.Service<TestNats, AcquiredNats>()("flotilla/test/TestNats") {}

const testNatsLayer = (opts?: AcquireNatsOptions) =>
  Layer.effect(
    TestNats,
    Effect.acquireRelease(Effect.promise(() => acquireNats(opts)), (n) => Effect.promise(() => n.stop()))
  )

const natsBusLayer = (opts?: AcquireNatsOptions) =>
  Layer.unwrap(
    Effect.gen(function*() {
      const n = yield* TestNats
      return NatsBus.layer({ servers: n.url, name: "bus-contract" })
    })
  ).pipe(
    Layer.provideMerge(testNatsLayer(opts))
  )

const uniq = (): string => `t${Math.random().toString(36).slice(2, 10)}`
const waitMs = 10_000

/** Subscribes and returns a queue of received messages (plus the subscription). */
const collect = (bus: BusShape, subject: string, queue?: string) =>
  Effect.gen(function*() {
    const q = yield* Queue.unbounded<BusMessage>()
    const sub = yield* bus.subscribe(subject, (m) => Queue.offer(q, m), queue === undefined ? undefined : { queue })
    return { q, sub }
  })

const takeN = (q: Queue.Queue<BusMessage>, n: number) =>
  Effect.gen(function*() {
    const out: Array<BusMessage> = []
    while (out.length < n) out.push(yield* Queue.take(q))
    return out
  }).pipe(Effect.timeout(waitMs))

const texts = (ms: ReadonlyArray<BusMessage>) => ms.map((m) => decodeUtf8(m.data))

const contract = (name: string, busLayer: Layer.Layer<Bus, unknown>) =>
  layer(busLayer, { excludeTestServices: true, timeout: 60_000 })(name, (it) => {
    it.effect("publish/subscribe delivers data and subject", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.a`
        const { q } = yield* collect(bus, s)
        yield* bus.flush()
        yield* bus.publish(s, encodeUtf8("one"))
        yield* bus.publish(s, encodeJson({ two: 2 }))
        const got = yield* takeN(q, 2)
        expect(got.map((m) => m.subject)).toEqual([s, s])
        expect(texts(got)).toEqual(["one", `{"two":2}`])
        expect(got[0].reply).toBeUndefined()
      }))

    it.effect("a sender mutating its buffer after publish does not corrupt the message", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.copy`
        const { q } = yield* collect(bus, s)
        yield* bus.flush()
        const buf = new Uint8Array([1, 2, 3, 4])
        yield* bus.publish(s, buf)
        buf.fill(9)
        yield* bus.publish(s, buf)
        const got = yield* takeN(q, 2)
        expect([...got[0].data]).toEqual([1, 2, 3, 4])
        expect([...got[1].data]).toEqual([9, 9, 9, 9])
      }))

    it.effect("wildcards: * matches one token, > one or more trailing tokens", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const p = uniq()
        const star = yield* collect(bus, `${p}.*.x`)
        const tail = yield* collect(bus, `${p}.>`)
        yield* bus.flush()
        for (const s of [`${p}.a.x`, `${p}.a.b.x`, `${p}.b`, `${p}.c.y`]) yield* bus.publish(s, encodeUtf8(s))
        yield* bus.publish(p, encodeUtf8("root")) // matched by neither
        yield* bus.publish(`${p}.end.x`, encodeUtf8("sentinel")) // matched by both, last
        expect(texts(yield* takeN(star.q, 2))).toEqual([`${p}.a.x`, "sentinel"])
        expect(texts(yield* takeN(tail.q, 5))).toEqual([`${p}.a.x`, `${p}.a.b.x`, `${p}.b`, `${p}.c.y`, "sentinel"])
      }))

    it.effect("queue groups: each message to exactly one member, plus every plain subscriber", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.work`
        const members = yield* Effect.forEach([0, 1, 2], () => collect(bus, s, "workers"))
        const other = yield* collect(bus, s, "auditors") // a second group gets its own copy
        const plain = yield* collect(bus, s)
        yield* bus.flush()
        const n = 60
        for (let i = 0; i < n; i++) yield* bus.publish(s, encodeUtf8(String(i)))
        yield* bus.flush()
        expect(texts(yield* takeN(plain.q, n))).toEqual(Array.from({ length: n }, (_, i) => String(i)))
        expect((yield* takeN(other.q, n)).length).toBe(n)
        // Group members: wait until all n arrived, then give duplicates a chance to show.
        const seen: Array<string> = []
        const perMember = [0, 0, 0]
        yield* Effect.gen(function*() {
          while (seen.length < n) {
            for (let k = 0; k < 3; k++) {
              const batch = yield* Queue.clear(members[k].q)
              perMember[k] += batch.length
              seen.push(...texts(batch))
            }
            if (seen.length < n) yield* Effect.sleep(10)
          }
        }).pipe(Effect.timeout(waitMs))
        yield* bus.flush()
        yield* Effect.sleep(50)
        for (let k = 0; k < 3; k++) seen.push(...texts(yield* Queue.clear(members[k].q)))
        expect(seen.length).toBe(n)
        expect(new Set(seen).size).toBe(n)
        expect(perMember.every((c) => c > 0)).toBe(true)
      }))

    it.effect("request/reply through respond", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.echo`
        yield* bus.subscribe(s, (m) => bus.respond(m, encodeUtf8(`pong:${decodeUtf8(m.data)}`)), { queue: "echo" })
        yield* bus.flush()
        const reply = yield* bus.request(s, encodeUtf8("ping"), { timeoutMs: 5_000 })
        expect(decodeUtf8(reply.data)).toBe("pong:ping")
        // respond to a message without a reply subject is a no-op
        yield* bus.respond({ subject: s, data: new Uint8Array(), headers: {} }, encodeUtf8("x"))
      }))

    it.effect("headers round trip (keys case-sensitive) on publish, request and reply", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.hdr`
        const headers = { "Flotilla-Tensor": "w.0", "x-lower": "v", "MiXeD-Case": "a b c", traceparent: "00-abc-def-01" }
        const { q } = yield* collect(bus, `${s}.pub`)
        yield* bus.subscribe(`${s}.req`, (m) => bus.respond(m, m.data, { ...m.headers, "Reply-Header": "yes" }))
        yield* bus.flush()
        yield* bus.publish(`${s}.pub`, encodeUtf8("h"), { headers })
        const [got] = yield* takeN(q, 1)
        expect(got.headers).toEqual(headers)
        const reply = yield* bus.request(`${s}.req`, encodeUtf8("r"), { headers, timeoutMs: 5_000 })
        expect(reply.headers).toEqual({ ...headers, "Reply-Header": "yes" })
        // no headers given → empty record
        yield* bus.publish(`${s}.pub`, encodeUtf8("plain"))
        const [plain] = yield* takeN(q, 1)
        expect(plain.headers).toEqual({})
      }))

    it.effect("request timeout → BusTimeoutError", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.silent`
        yield* bus.subscribe(s, () => Effect.void) // listens, never answers
        yield* bus.flush()
        const err = yield* Effect.flip(bus.request(s, encodeUtf8("?"), { timeoutMs: 200 }))
        expect(err._tag).toBe("BusTimeoutError")
        expect(err.subject).toBe(s)
      }))

    it.effect("no responders → NoRespondersError", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.nobody`
        const err = yield* Effect.flip(bus.request(s, encodeUtf8("?"), { timeoutMs: 5_000 }))
        expect(err._tag).toBe("NoRespondersError")
        expect(err.subject).toBe(s)
      }))

    it.effect("oversize publish/request → MaxPayloadExceededError; exactly maxPayload passes", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.big`
        expect(bus.maxPayload).toBeGreaterThan(0)
        const tooBig = yield* Effect.flip(bus.publish(s, new Uint8Array(bus.maxPayload + 1)))
        expect(tooBig._tag).toBe("MaxPayloadExceededError")
        expect(tooBig.subject).toBe(s)
        // headers count against max_payload too
        const withHeaders = yield* Effect.flip(
          bus.publish(s, new Uint8Array(bus.maxPayload - 8), { headers: { "Some-Header": "some value" } })
        )
        expect(withHeaders._tag).toBe("MaxPayloadExceededError")
        const req = yield* Effect.flip(bus.request(s, new Uint8Array(bus.maxPayload + 1)))
        expect(req._tag).toBe("MaxPayloadExceededError")
        const { q } = yield* collect(bus, s)
        yield* bus.flush()
        const exact = new Uint8Array(bus.maxPayload)
        exact[exact.length - 1] = 7
        yield* bus.publish(s, exact)
        const [got] = yield* takeN(q, 1)
        expect(got.data.byteLength).toBe(bus.maxPayload)
        expect(got.data[got.data.byteLength - 1]).toBe(7)
      }))

    it.effect("invalid subjects fail with BusArgumentError", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        for (const bad of ["", "a..b", "a.*", "has space", "a.>.b"]) {
          const err = yield* Effect.flip(bus.publish(bad, new Uint8Array(1)))
          expect(err._tag).toBe("BusArgumentError")
        }
        const subErr = yield* Effect.flip(bus.subscribe("a.>.b", () => Effect.void))
        expect(subErr._tag).toBe("BusArgumentError")
      }))

    it.effect("a handler that fails or dies is logged and the subscription keeps going", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.flaky`
        const q = yield* Queue.unbounded<string>()
        yield* bus.subscribe(s, (m) => {
          const t = decodeUtf8(m.data)
          if (t === "fail") return Effect.fail("boom")
          if (t === "die") return Effect.die(new Error("kaboom"))
          if (t === "throw") throw new Error("thrown")
          return Queue.offer(q, t)
        })
        yield* bus.flush()
        for (const t of ["ok1", "fail", "die", "throw", "ok2"]) yield* bus.publish(s, encodeUtf8(t))
        const got = yield* Effect.all([Queue.take(q), Queue.take(q)]).pipe(Effect.timeout(waitMs))
        expect(got).toEqual(["ok1", "ok2"])
      }))

    it.effect("closing the scope unsubscribes after draining the in-flight handler", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.drain`
        const handled = yield* Ref.make<Array<string>>([])
        const started = yield* Queue.unbounded<string>()
        const watcher = yield* collect(bus, s) // stays subscribed: a sentinel for "delivered"
        yield* Effect.scoped(
          Effect.gen(function*() {
            yield* bus.subscribe(s, (m) =>
              Effect.gen(function*() {
                yield* Queue.offer(started, decodeUtf8(m.data))
                yield* Effect.sleep(100)
                yield* Ref.update(handled, (xs) => [...xs, decodeUtf8(m.data)])
              }))
            yield* bus.flush()
            for (const t of ["a", "b", "c"]) yield* bus.publish(s, encodeUtf8(t))
            yield* Queue.take(started).pipe(Effect.timeout(waitMs)) // "a" is in flight
          })
        )
        // The scope closed: a, b, c were received before the unsubscribe and drained.
        expect(yield* Ref.get(handled)).toEqual(["a", "b", "c"])
        yield* bus.publish(s, encodeUtf8("after"))
        yield* takeN(watcher.q, 4)
        yield* Effect.sleep(150)
        expect(yield* Ref.get(handled)).toEqual(["a", "b", "c"])
      }))

    it.effect("Subscription.unsubscribe stops delivery and is idempotent", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.unsub`
        const first = yield* collect(bus, s)
        const watcher = yield* collect(bus, s)
        yield* bus.flush()
        yield* bus.publish(s, encodeUtf8("1"))
        yield* takeN(first.q, 1)
        yield* first.sub.unsubscribe
        yield* first.sub.unsubscribe
        expect(first.sub.subject).toBe(s)
        yield* bus.publish(s, encodeUtf8("2"))
        yield* takeN(watcher.q, 2)
        yield* Effect.sleep(50)
        expect(yield* Queue.size(first.q)).toBe(0)
      }))

    it.effect("order is preserved for 1000 messages", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.order`
        const { q } = yield* collect(bus, s)
        yield* bus.flush()
        const n = 1000
        for (let i = 0; i < n; i++) {
          const b = new Uint8Array(4)
          new DataView(b.buffer).setUint32(0, i, true)
          yield* bus.publish(s, b)
        }
        yield* bus.flush()
        const got = yield* takeN(q, n)
        const ids = got.map((m) => new DataView(m.data.buffer, m.data.byteOffset, 4).getUint32(0, true))
        expect(ids).toEqual(Array.from({ length: n }, (_, i) => i))
      }))

    it.effect("a subscription's queue is bounded: past its limit, new messages are dropped, the handler goes on", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        const s = `${uniq()}.bounded`
        const gate = yield* Deferred.make<void>()
        const got: number[] = []
        yield* bus.subscribe(s, (m) => Deferred.await(gate).pipe(Effect.andThen(Effect.sync(() => void got.push(m.data[0])))), { limits: { messages: 5, bytes: 1 << 20 } })
        yield* bus.flush()
        for (let i = 0; i < 20; i++) yield* bus.publish(s, Uint8Array.of(i))
        yield* bus.flush()
        yield* Effect.sleep(200) // every message has reached the subscription (the handler is held)
        yield* Deferred.succeed(gate, undefined)
        yield* Effect.sleep(200)
        // the first is in the handler, 5 wait in the queue; the rest were dropped
        expect(got.length).toBeLessThanOrEqual(6)
        expect(got.length).toBeGreaterThanOrEqual(5)
        expect(got).toEqual(Array.from({ length: got.length }, (_, i) => i))
        // and it keeps delivering once it has room
        yield* bus.publish(s, Uint8Array.of(99))
        yield* bus.flush()
        yield* Effect.sleep(100)
        expect(got.at(-1)).toBe(99)
      }))
  })

contract("InProcessBus", InProcessBus.layer())
contract("NatsBus", natsBusLayer())

describe("InProcessBus only", () => {
  layer(InProcessBus.layer({ maxPayload: 1000 }), { excludeTestServices: true })((it) => {
    it.effect("maxPayload is configurable", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        expect(bus.kind).toBe("in-process")
        expect(bus.maxPayload).toBe(1000)
        const err = yield* Effect.flip(bus.publish("a.b", new Uint8Array(1001)))
        expect(err._tag).toBe("MaxPayloadExceededError")
      }))
  })

  // Default it.effect: the test clock drives in-process request timeouts.
  layer(InProcessBus.layer())((it) => {
    it.effect("request timeouts follow the test clock", () =>
      Effect.gen(function*() {
        const bus = yield* Bus
        yield* bus.subscribe("slow.service", () => Effect.void)
        const fiber = yield* Effect.forkChild(Effect.flip(bus.request("slow.service", encodeUtf8("?"), { timeoutMs: 60_000 })))
        yield* TestClock.adjust(59_999)
        expect(fiber.pollUnsafe()).toBeUndefined()
        yield* TestClock.adjust(1)
        const err = yield* Fiber.join(fiber)
        expect(err._tag).toBe("BusTimeoutError")
      }))
  })
})

layer(natsBusLayer({ restartable: true }), { excludeTestServices: true, timeout: 60_000 })("NatsBus only", (it) => {
  it.effect("survives a nats-server restart: reconnects, subscriptions restored", () =>
    Effect.gen(function*() {
      const bus = yield* Bus
      const nats = yield* TestNats
      expect(bus.kind).toBe("nats")
      expect(bus.maxPayload).toBeGreaterThan(0)
      const s = `${uniq()}.survive`
      const { q } = yield* collect(bus, `${s}.events`)
      yield* bus.subscribe(`${s}.echo`, (m) => bus.respond(m, m.data), { queue: "echo" })
      yield* bus.flush()
      yield* bus.publish(`${s}.events`, encodeUtf8("before"))
      expect(texts(yield* takeN(q, 1))).toEqual(["before"])

      expect(nats.restart).toBeDefined()
      yield* Effect.promise(() => nats.restart!())

      // Requests fail (timeout) until the client has reconnected and resubscribed.
      const reply = yield* bus.request(`${s}.echo`, encodeUtf8("after"), { timeoutMs: 500 }).pipe(
        Effect.retry({ times: 60 })
      )
      expect(decodeUtf8(reply.data)).toBe("after")
      yield* bus.publish(`${s}.events`, encodeUtf8("after"))
      const after = texts(yield* takeN(q, 1))
      expect(after).toEqual(["after"])
    }))

  it.effect("building the layer fails fast with BusConnectionError when no server answers", () =>
    Effect.gen(function*() {
      const err = yield* Effect.flip(
        Layer.build(NatsBus.layer({ servers: "nats://127.0.0.1:1", connectTimeoutMs: 2_000 }))
      )
      expect(err._tag).toBe("BusConnectionError")
      expect(err.message).toContain("nats://127.0.0.1:1")
    }))
})

describe("local nats-server helper", () => {
  layer(Layer.empty, { excludeTestServices: true })((it) => {
    it.effect("honours maxPayload and JetStream, and stop() ends it", () =>
      Effect.gen(function*() {
        const server = yield* Effect.acquireRelease(
          Effect.promise(() => startLocalNatsServer({ port: 0, maxPayload: 2 * 1024 * 1024, jetstream: true })),
          (s) => Effect.promise(() => s.stop())
        )
        expect(server.url).toBe(`nats://127.0.0.1:${server.port}`)
        yield* Effect.gen(function*() {
          const bus = yield* Bus
          expect(bus.maxPayload).toBe(2 * 1024 * 1024)
          const info = yield* bus.request("$JS.API.INFO", new Uint8Array(), { timeoutMs: 5_000 })
          expect(JSON.parse(decodeUtf8(info.data)).type).toBe("io.nats.jetstream.api.v1.account_info_response")
        }).pipe(Effect.provide(NatsBus.layer({ servers: server.url })))
      }))

    it.effect("a missing binary fails with install instructions", () =>
      Effect.gen(function*() {
        const err = yield* Effect.flip(
          Effect.tryPromise(() => startLocalNatsServer({ binary: "/nonexistent/nats-server" }))
        )
        const cause = (err as { cause?: unknown }).cause
        expect(cause).toBeInstanceOf(NatsServerNotFoundError)
        expect(String((cause as Error).message)).toContain("apt-get install -y nats-server")
      }))
  })
})
