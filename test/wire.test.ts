// Implements: pure tests of the tensor wire format — bundle encode/decode, the int8 codec
// with error feedback through the registry's entry points (encodeTensor/decodeTensor, quantize), CRC-32,
// framing and the Reassembler's fault detection.
// Run: npx vitest run test/wire.test.ts
// Does not own: the other codecs and their dtypes (test/codecs.test.ts), anything over a bus
// (test/wire.nats.test.ts).
import { describe, expect, it } from "vitest"
import { Result } from "effect"
import { decodeTensor as fromWire, dequantize, encodeTensor, quantize } from "../shared/wire/codecs.ts"
import { specOf } from "../shared/wire/compression.ts"
import { crc32, crc32Combine, crc32Table } from "../shared/wire/crc32.ts"
import { BufferPool, DEFAULT_HEADROOM, frameMessage, H, headerBytes, Reassembler } from "../shared/wire/frames.ts"
import type { AcceptResult, Frame } from "../shared/wire/frames.ts"
import { costOf } from "../shared/wire/budget.ts"
import { decodeBundle, encodeBundle, manifestToJson, parseManifest } from "../shared/wire/tensor.ts"
import { denseGrads, toSparseRows } from "../shared/wire/rows.ts"
import type { BundleMeta, TensorBundle, WireTensor } from "../shared/wire/tensor.ts"

/** A float32 tensor on the wire under the codec named `codec`, with an optional block size and residual (the registry's encodeTensor). */
const toWire = (name: string, shape: ReadonlyArray<number>, data: Float32Array, codec: string, o: { blockSize?: number; residual?: Float32Array } = {}): WireTensor =>
  encodeTensor(o.blockSize !== undefined ? { ...specOf(codec), blockSize: o.blockSize } : specOf(codec), name, shape, data, o.residual)

const meta: BundleMeta = { kind: "grads", job: "gpt", version: 7, step: 42, sender: "w-1", batchId: "b-9", codec: "f32", extra: { loss: 2.5, note: "ü" } }

let seed = 12345
const rand = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff) * 2 - 1
const randF32 = (n: number, scale = 1) => Float32Array.from({ length: n }, () => rand() * scale)
const bytes = (n: number) => {
  const b = new Uint8Array(n)
  for (let i = 0; i < n; i++) b[i] = (i * 131 + 7 + (i >> 10)) & 0xff
  return b
}
const sameBytes = (a: Uint8Array, b: Uint8Array) => Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length))

const roundTrip = (b: TensorBundle) => {
  const { manifest, payload } = Result.getOrThrow(encodeBundle(b))
  return Result.getOrThrow(decodeBundle(manifestToJson(manifest), payload))
}

describe("tensor bundle", () => {
  it("round-trips float32 tensors, meta included, viewing the payload without copies", () => {
    const a = randF32(12)
    const enc = Result.getOrThrow(encodeBundle({ meta, tensors: [{ name: "h.0.w", dtype: "float32", shape: [3, 4], data: a }] }))
    const out = Result.getOrThrow(decodeBundle(enc.manifest, enc.payload))
    expect(out.meta).toEqual(meta)
    expect(out.tensors[0].shape).toEqual([3, 4])
    expect(out.tensors[0].data).toEqual(a)
    expect(out.tensors[0].data.buffer).toBe(enc.payload.buffer) // a view
  })

  it("round-trips int8 with scales, empty tensors, scalars and many tensors", () => {
    const tensors: Array<WireTensor> = [
      toWire("q", [5, 100], randF32(500), "int8-block", { blockSize: 64 }),
      { name: "empty", dtype: "float32", shape: [0, 8], data: new Float32Array(0) },
      toWire("empty-q", [0], new Float32Array(0), "int8-block"),
      { name: "scalar", dtype: "float32", shape: [], data: Float32Array.of(3.25) },
      { name: "odd-int8", dtype: "int8", shape: [3], data: Int8Array.of(1, -2, 3), scales: Float32Array.of(0.5), blockSize: 256 }
    ]
    for (let i = 0; i < 60; i++) tensors.push({ name: `t${i}`, dtype: "float32", shape: [i % 7, 3], data: randF32((i % 7) * 3) })
    const out = roundTrip({ meta, tensors })
    expect(out.tensors.map((t) => t.name)).toEqual(tensors.map((t) => t.name))
    out.tensors.forEach((t, i) => {
      expect(t.dtype).toBe(tensors[i].dtype)
      expect(t.shape).toEqual(tensors[i].shape)
      expect(Array.from(t.data)).toEqual(Array.from(tensors[i].data))
      expect(t.scales && Array.from(t.scales)).toEqual(tensors[i].scales && Array.from(tensors[i].scales!))
      expect(t.blockSize).toBe(tensors[i].blockSize)
    })
    expect(Array.from(fromWire(out.tensors[4]))).toEqual([0.5, -1, 1.5])
  })

  it("lays every tensor at a 4-aligned offset, zero padding, and copies when the payload is unaligned", () => {
    const { manifest, payload } = Result.getOrThrow(encodeBundle({
      meta,
      tensors: [
        { name: "i", dtype: "int8", shape: [3], data: Int8Array.of(1, 2, 3), scales: Float32Array.of(1), blockSize: 4 },
        { name: "f", dtype: "float32", shape: [2], data: Float32Array.of(1, 2) }
      ]
    }))
    expect(manifest.tensors.map((t) => [t.offset, t.scalesOffset])).toEqual([[0, 4], [8, undefined]])
    expect(payload[3]).toBe(0)
    const shifted = new Uint8Array(payload.length + 1).subarray(1)
    shifted.set(payload)
    const out = Result.getOrThrow(decodeBundle(manifest, shifted))
    expect(Array.from(out.tensors[1].data)).toEqual([1, 2])
    expect(out.tensors[1].data.buffer).not.toBe(shifted.buffer)
  })

  it("keeps the manifest JSON ASCII (header-safe) and parses it back", () => {
    const { manifest } = Result.getOrThrow(encodeBundle({ meta, tensors: [{ name: "naïve→", dtype: "float32", shape: [], data: Float32Array.of(1) }] }))
    const json = manifestToJson(manifest)
    expect(/^[\x20-\x7e]*$/.test(json)).toBe(true)
    expect(Result.getOrThrow(parseManifest(json)).tensors[0].name).toBe("naïve→")
  })

  it("rejects bad bundles on encode with a reason", () => {
    const t = (over: Partial<WireTensor>): WireTensor => ({ name: "a", dtype: "float32", shape: [2], data: new Float32Array(2), ...over })
    const reason = (tensors: Array<WireTensor>) => {
      const r = encodeBundle({ meta, tensors })
      return Result.isFailure(r) ? r.failure.reason : "ok"
    }
    expect(reason([t({}), t({})])).toBe("duplicate-name")
    expect(reason([t({ shape: [3] })])).toBe("length-mismatch")
    expect(reason([t({ shape: [-1] })])).toBe("bad-shape")
    expect(reason([t({ dtype: "int8" })])).toBe("dtype-mismatch")
    expect(reason([t({ dtype: "int8", data: new Int8Array(2) })])).toBe("bad-scales")
    expect(reason([t({ name: "" })])).toBe("bad-name")
  })

  describe("decode validation", () => {
    const good = Result.getOrThrow(encodeBundle({
      meta,
      tensors: [
        { name: "a", dtype: "float32", shape: [2, 2], data: randF32(4) },
        toWire("b", [10], randF32(10), "int8-block", { blockSize: 4 })
      ]
    }))
    const m = () => JSON.parse(manifestToJson(good.manifest))
    const reasonOf = (manifest: unknown, payload = good.payload) => {
      const r = decodeBundle(manifest, payload)
      return Result.isFailure(r) ? `${r.failure.reason}: ${r.failure.message}` : "ok"
    }
    const cases: Array<[string, () => unknown, string]> = [
      ["not JSON", () => "{\"v\":1,", "bad-json"],
      ["unknown dtype", () => { const x = m(); x.tensors[0].dtype = "float16"; return x }, "bad-manifest"],
      ["negative dim", () => { const x = m(); x.tensors[0].shape = [-2, 2]; return x }, "bad-manifest"],
      ["infinite dim", () => { const x = m(); x.tensors[0].shape = [1e400]; return x }, "bad-manifest"],
      ["huge product", () => { const x = m(); x.tensors[0].shape = [2 ** 30, 2 ** 30, 2 ** 30]; return x }, "bad-shape"],
      ["wrong version", () => ({ ...m(), v: 2 }), "bad-manifest"],
      ["payload length", () => ({ ...m(), byteLength: 5 }), "length-mismatch"],
      ["duplicate names", () => { const x = m(); x.tensors[1].name = "a"; return x }, "duplicate-name"],
      ["shape vs bytes", () => { const x = m(); x.tensors[0].shape = [2, 3]; return x }, "byte-length-mismatch"],
      ["past the end", () => { const x = m(); x.tensors[1].scalesOffset = 1000; return x }, "out-of-bounds"],
      ["misaligned", () => { const x = m(); x.tensors[0].offset = 2; return x }, "misaligned"],
      ["overlap", () => { const x = m(); x.tensors[1].offset = 8; return x }, "overlap"],
      ["int8 without scales", () => { const x = m(); delete x.tensors[1].scalesOffset; return x }, "bad-scales"],
      ["float32 with scales", () => { const x = m(); x.tensors[0].blockSize = 4; return x }, "bad-scales"]
    ]
    for (const [what, make, reason] of cases) {
      it(`${what} → ${reason}`, () => expect(reasonOf(make())).toMatch(new RegExp(`^${reason}: .+`)))
    }
    it("a truncated payload → length-mismatch", () => expect(reasonOf(good.manifest, good.payload.subarray(0, 10))).toMatch(/^length-mismatch/))
    it("the untouched manifest decodes", () => expect(reasonOf(m())).toBe("ok"))
  })
})

describe("int8 block codec", () => {
  it("keeps every element within scale/2 of its input, q in [-127, 127]", () => {
    const x = randF32(1000, 3)
    x[17] = 0
    const { q, scales, blockSize } = quantize(x, undefined, 256)
    expect(scales.length).toBe(4)
    const y = dequantize(q, scales, blockSize)
    for (let i = 0; i < x.length; i++) {
      const s = scales[Math.floor(i / blockSize)]
      expect(Math.abs(y[i] - x[i])).toBeLessThanOrEqual(s / 2 + 1e-6 * s)
      expect(Math.abs(q[i])).toBeLessThanOrEqual(127)
    }
    expect(Math.max(...Array.from(q).map(Math.abs))).toBe(127)
  })

  it("encodes a zero block with scale 0 and a non-finite block as NaN", () => {
    const x = new Float32Array(8)
    x[5] = Number.POSITIVE_INFINITY
    const r = new Float32Array(8).fill(0.25)
    const { q, scales } = quantize(x, r, 4)
    expect(scales[0]).toBe(Math.fround(0.25 / 127)) // x = 0, but the residual makes block 0 non-zero
    expect(Number.isNaN(scales[1])).toBe(true)
    expect(Array.from(q.subarray(4))).toEqual([0, 0, 0, 0])
    expect(Array.from(r.subarray(4))).toEqual([0, 0, 0, 0])
    expect(quantize(new Float32Array(4)).scales[0]).toBe(0)
  })

  it("with error feedback, the sum of what was sent tracks the sum of the inputs", () => {
    const n = 512
    const residual = new Float32Array(n)
    const sumX = new Float64Array(n)
    const sumFb = new Float64Array(n)
    const sumPlain = new Float64Array(n)
    let lastScale = 0
    for (let step = 0; step < 200; step++) {
      // small persistent signal under large noise: the case error feedback is for
      const x = Float32Array.from({ length: n }, (_, i) => 0.01 * Math.sin(i) + (i % 64 === 0 ? 5 * rand() : 0.2 * rand()))
      const fb = quantize(x, residual, 64)
      const plain = quantize(x, undefined, 64)
      const yFb = dequantize(fb.q, fb.scales, 64)
      const yPlain = dequantize(plain.q, plain.scales, 64)
      for (let i = 0; i < n; i++) {
        sumX[i] += x[i]
        sumFb[i] += yFb[i]
        sumPlain[i] += yPlain[i]
      }
      lastScale = Math.max(...fb.scales)
    }
    let errFb = 0
    let errPlain = 0
    for (let i = 0; i < n; i++) {
      // Σ sent = Σ x − final residual, and the residual stays within half a step
      expect(Math.abs(sumFb[i] + residual[i] - sumX[i])).toBeLessThan(1e-3)
      expect(Math.abs(residual[i])).toBeLessThanOrEqual(lastScale / 2 + 1e-6)
      errFb = Math.max(errFb, Math.abs(sumFb[i] - sumX[i]))
      errPlain = Math.max(errPlain, Math.abs(sumPlain[i] - sumX[i]))
    }
    expect(errFb).toBeLessThan(errPlain / 4)
  })

  it("toWire refuses an unknown codec name, naming the known ones", () => {
    expect(() => toWire("a", [1], Float32Array.of(1), "int3")).toThrow(/unknown codec "int3": the known codecs are f32, bf16, int8/)
  })

  it("toWire f32 shares the data; fromWire dequantizes int8", () => {
    const x = randF32(300)
    expect(toWire("a", [300], x, "f32").data).toBe(x)
    const w = toWire("a", [3, 100], x, "int8-block")
    expect(w.dtype).toBe("int8")
    expect(w.scales!.length).toBe(2)
    const y = fromWire(w)
    for (let i = 0; i < 300; i++) expect(Math.abs(y[i] - x[i])).toBeLessThanOrEqual(w.scales![i >> 8] / 2 + 1e-7)
  })
})

describe("crc32", () => {
  it("matches the IEEE check value, the table fallback, and combines", () => {
    expect(crc32(new TextEncoder().encode("123456789"))).toBe(0xcbf43926)
    const b = bytes(100_003)
    expect(crc32Table(b)).toBe(crc32(b))
    for (const cut of [0, 1, 3, 4096, 100_003]) {
      expect(crc32Combine(crc32(b.subarray(0, cut)), crc32(b.subarray(cut)), b.length - cut)).toBe(crc32(b))
    }
  })
})

// ---------------------------------------------------------------------------------------
// Framing

const MAX = 64 * 1024 // small maxPayload so tests chunk quickly
const frame = (payload: Uint8Array, extra: { manifest?: string; headers?: Record<string, string>; id?: string } = {}) =>
  Result.getOrThrow(frameMessage(payload, { id: extra.id ?? "m1", maxPayload: MAX, manifest: extra.manifest, headers: extra.headers }))
const feed = (r: Reassembler, frames: ReadonlyArray<Frame>, now = 0): Array<AcceptResult> => frames.map((f) => r.accept(f.headers, f.data, now))
const tags = (rs: ReadonlyArray<AcceptResult>) => rs.map((r) => (r._tag === "Rejected" ? `Rejected:${r.error.reason}` : r._tag))
const completed = (rs: ReadonlyArray<AcceptResult>) => {
  const c = rs.find((r) => r._tag === "Complete")
  if (c?._tag !== "Complete") throw new Error(`no Complete in ${tags(rs)}`)
  return c.message
}
const withHeaders = (f: Frame, h: Record<string, string | undefined>): Frame => {
  const headers: Record<string, string> = { ...f.headers }
  for (const k in h) {
    if (h[k] === undefined) delete headers[k]
    else headers[k] = h[k]!
  }
  return { headers, data: f.data }
}

describe("frames", () => {
  it("cuts payloads of every size into frames that fit, views not copies, and reassembles them", () => {
    const room = frame(new Uint8Array(0))[0] // the empty message: one frame, no data
    expect(room.data.length).toBe(0)
    for (const size of [0, 1, 1000, MAX - DEFAULT_HEADROOM - 700, MAX, 3 * MAX + 17, 1 << 20]) {
      const payload = bytes(size)
      const frames = frame(payload, { manifest: "{\"m\":1}", headers: { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" } })
      for (const f of frames) {
        expect(headerBytes(f.headers) + f.data.length).toBeLessThanOrEqual(MAX - DEFAULT_HEADROOM)
        expect(f.data.buffer).toBe(payload.buffer)
        expect(f.headers.traceparent).toMatch(/^00-/)
        expect(f.headers[H.chunks]).toBe(String(frames.length))
      }
      expect(frames.filter((f) => f.headers[H.manifest] !== undefined).length).toBe(1)
      expect(frames[0].headers[H.manifest]).toBe("{\"m\":1}")
      const msg = completed(feed(new Reassembler(), frames))
      expect(sameBytes(msg.payload, payload)).toBe(true)
      expect(msg.payload.byteOffset % 4).toBe(0)
      expect(msg.manifest).toBe("{\"m\":1}")
      expect(msg.headers.traceparent).toMatch(/^00-/)
    }
  })

  it("refuses a maxPayload too small or a manifest too big for a frame", () => {
    const r1 = frameMessage(bytes(10), { id: "x", maxPayload: 4096 })
    expect(Result.isFailure(r1) && r1.failure.reason).toBe("max-payload-too-small")
    const r2 = frameMessage(bytes(10), { id: "x", maxPayload: MAX, manifest: "x".repeat(MAX) })
    expect(Result.isFailure(r2) && r2.failure.reason).toBe("manifest-too-large")
  })

  const payload = bytes(5 * MAX)
  const frames = frame(payload, { manifest: "{}" })

  it("accepts out-of-order delivery, reorders and reports it in stats", () => {
    const r = new Reassembler()
    const rs = feed(r, [...frames].reverse())
    const msg = completed(rs)
    expect(sameBytes(msg.payload, payload)).toBe(true)
    expect(msg.outOfOrder).toBe(true)
    expect(r.stats.outOfOrder).toBeGreaterThan(0)
    expect(msg.manifest).toBe("{}")
  })

  it("reports a duplicated chunk (keeping the first) and a chunk after completion", () => {
    const r = new Reassembler()
    const rs = feed(r, [frames[0], frames[1], frames[1], ...frames.slice(2), frames[3]])
    expect(tags(rs)).toEqual(["Pending", "Pending", "Rejected:duplicate-chunk", ...frames.slice(2, -1).map(() => "Pending"), "Complete", "Rejected:duplicate-chunk"])
    expect(sameBytes(completed(rs).payload, payload)).toBe(true)
    expect(r.stats.duplicates).toBe(2)
  })

  it("reports a missing chunk at timeout, naming it, and frees the buffer", () => {
    const r = new Reassembler({ timeoutMs: 1000 })
    const rs = feed(r, frames.filter((_, i) => i !== 2), 0)
    expect(tags(rs).every((t) => t === "Pending")).toBe(true)
    expect(r.outstandingBytes).toBe(costOf(payload.length, frames.length)) // charged in full: buffer and chunk bookkeeping
    expect(r.sweep(999)).toEqual([])
    const [e] = r.sweep(1000)
    expect(e.reason).toBe("timeout")
    expect(e.id).toBe("m1")
    expect(e.message).toMatch(/missing 2$/)
    expect(r.outstandingBytes).toBe(0)
    expect(tags(feed(r, [frames[2]]))).toEqual(["Dropped"])
  })

  it("detects a corrupt chunk (one flipped byte), reports once, drops the rest", () => {
    const data = new Uint8Array(frames[1].data)
    data[100] ^= 0x40
    const r = new Reassembler()
    const rs = feed(r, [frames[0], { headers: frames[1].headers, data }, ...frames.slice(2)])
    expect(tags(rs)).toEqual(["Pending", "Rejected:chunk-crc-mismatch", ...frames.slice(2).map(() => "Dropped")])
    expect(r.outstandingMessages).toBe(0)
  })

  it("detects a truncated chunk", () => {
    const rs = feed(new Reassembler(), [{ headers: frames[0].headers, data: frames[0].data.subarray(0, 50) }])
    expect(tags(rs)).toEqual(["Rejected:chunk-crc-mismatch"])
  })

  it("detects inconsistent counts, totals and checksums between chunks of one message", () => {
    for (const h of [{ [H.chunks]: "9" }, { [H.total]: String(payload.length + 1) }, { [H.crc]: "00000000" }]) {
      const rs = feed(new Reassembler(), [frames[0], withHeaders(frames[1], h)])
      expect(tags(rs)).toEqual(["Pending", "Rejected:inconsistent-headers"])
    }
    const tiny = frame(bytes(5))[0]
    expect(tags(feed(new Reassembler(), [withHeaders(tiny, { [H.chunks]: "999999" })]))).toEqual(["Rejected:inconsistent-headers"])
  })

  it("detects a payload whose chunks check but whose whole does not", () => {
    const rs = feed(new Reassembler(), frames.map((f) => withHeaders(f, { [H.crc]: "deadbeef" })))
    expect(tags(rs).at(-1)).toBe("Rejected:payload-crc-mismatch")
  })

  it("detects gaps and overlaps between chunks", () => {
    const moved = withHeaders(frames[2], { [H.offset]: String(Number(frames[2].headers[H.offset]) - 1) })
    const rs = feed(new Reassembler(), [frames[0], frames[1], moved, ...frames.slice(3)])
    expect(tags(rs).at(-1)).toBe("Rejected:bad-layout")
  })

  it("rejects chunks out of range, malformed or missing headers, and unknown versions", () => {
    const cases: Array<[Record<string, string | undefined>, string]> = [
      [{ [H.chunk]: String(frames.length) }, "chunk-out-of-range"],
      [{ [H.offset]: String(payload.length) }, "chunk-out-of-range"],
      [{ [H.chunk]: undefined }, "bad-header"],
      [{ [H.chunks]: "0" }, "bad-header"],
      [{ [H.offset]: "-5" }, "bad-header"],
      [{ [H.total]: "1e6" }, "bad-header"],
      [{ [H.chunkCrc]: "xyz" }, "bad-header"],
      [{ [H.id]: undefined }, "bad-header"],
      [{ [H.wire]: undefined }, "bad-header"],
      [{ [H.wire]: "2" }, "unsupported-version"]
    ]
    for (const [h, reason] of cases) {
      const rs = feed(new Reassembler(), [withHeaders(frames[1], h)])
      expect(tags(rs), JSON.stringify(h)).toEqual([`Rejected:${reason}`])
      if (rs[0]._tag === "Rejected") expect(rs[0].error.message.length).toBeGreaterThan(10)
    }
  })

  it("enforces the size limit and the memory budget", () => {
    expect(tags(feed(new Reassembler({ maxMessageBytes: MAX }), [frames[0]]))).toEqual(["Rejected:oversize"])
    const r = new Reassembler({ maxOutstandingMessages: 1 })
    const other = frame(bytes(3 * MAX), { id: "m2" })
    expect(tags(feed(r, [frames[0], other[0]]))).toEqual(["Pending", "Rejected:over-budget"])
    const rb = new Reassembler({ maxOutstandingBytes: costOf(payload.length, frames.length) + 100 })
    expect(tags(feed(rb, [frames[0], other[0]]))).toEqual(["Pending", "Rejected:over-budget"])
    expect(tags(feed(rb, frames.slice(1))).at(-1)).toBe("Complete")
    expect(rb.outstandingBytes).toBe(0)
  })

  it("interleaves several messages", () => {
    const a = frame(bytes(2 * MAX), { id: "a", manifest: "A" })
    const b = frame(bytes(3 * MAX + 5), { id: "b", manifest: "B" })
    const r = new Reassembler()
    const rs = feed(r, [b[0], a[1], b[2], a[0], b[1], b[3], a[2]])
    const done = rs.flatMap((x) => (x._tag === "Complete" ? [x.message.manifest] : []))
    expect(done).toEqual(["B", "A"])
    expect(r.stats.completed).toBe(2)
  })
})

describe("BufferPool", () => {
  it("reuses a returned buffer for a request of similar size, never hands one out twice", () => {
    const pool = new BufferPool(2, 1 << 20)
    const a = pool.take(100_000)
    expect(a.length).toBe(100_000)
    pool.give(a)
    pool.give(a) // a second give is ignored
    const b = pool.take(90_000)
    expect(b.buffer).toBe(a.buffer)
    expect(pool.take(90_000).buffer).not.toBe(a.buffer) // the pool is empty again
    pool.give(b)
    expect(pool.take(10_000).buffer).not.toBe(a.buffer) // far more than the size asked: not used
    pool.give(pool.take(2 << 20)) // larger than maxBytes: not kept
    expect(pool.take(2 << 20).byteOffset).toBe(0)
  })

  it("feeds the Reassembler, which then writes every byte of the reused buffer", () => {
    const pool = new BufferPool()
    const a = frame(bytes(3 * MAX), { id: "p1" })
    const first = completed(feed(new Reassembler({ alloc: pool.take }), a))
    pool.give(first.payload)
    const other = bytes(3 * MAX).map((x) => x ^ 0xff)
    const second = completed(feed(new Reassembler({ alloc: pool.take }), frame(other, { id: "p2" })))
    expect(second.payload.buffer).toBe(first.payload.buffer)
    expect(sameBytes(second.payload, other)).toBe(true)
  })
})

describe("row-sparse gradients (shared/wire/rows.ts)", () => {
  it("sends an embedding's non-zero rows and indices, and the receiver rebuilds the dense gradient exactly", () => {
    const R = 40
    const C = 3
    const g = new Float32Array(R * C)
    for (const r of [2, 7, 39]) for (let c = 0; c < C; c++) g[r * C + c] = r + c / 10
    g[7 * C + 1] = 0 // a row is non-zero if any of its values is
    const wire = toSparseRows("embedding", [R, C], g)!
    expect(wire.map((t) => [t.name, t.dtype, t.shape])).toEqual([["embedding", "float32", [3, C]], ["embedding@rows", "int32", [3]]])
    expect(Array.from(wire[1].data)).toEqual([2, 7, 39])
    // through a real bundle, then back to dense
    const enc = encodeBundle({ tensors: wire, meta: { kind: "grads", job: "j", version: 0, step: 0, sender: "w", codec: "f32" } })
    if (Result.isFailure(enc)) throw enc.failure
    const dec = decodeBundle(JSON.parse(manifestToJson(enc.success.manifest)), enc.success.payload)
    if (Result.isFailure(dec)) throw dec.failure
    const back = denseGrads(dec.success.tensors.map((t) => ({ name: t.name, shape: t.shape, values: t.data as Float32Array | Int32Array })), () => [R, C])
    if ("problem" in back) throw new Error(back.problem)
    expect(Array.from(back.grads.get("embedding")!)).toEqual(Array.from(g))
    // dense enough, or not a matrix: sent as it is
    expect(toSparseRows("w", [R, C], new Float32Array(R * C).fill(1))).toBeUndefined()
    expect(toSparseRows("b", [R * C], g)).toBeUndefined()
  })

  it("refuses rows that do not describe the tensor, saying why", () => {
    const t = (rows: number[], k = rows.length, C = 2) => [
      { name: "e", shape: [k, C], values: new Float32Array(k * C) },
      { name: "e@rows", shape: [rows.length], values: Int32Array.from(rows) }
    ]
    const shape = () => [10, 2]
    expect(denseGrads(t([3, 3]), shape)).toMatchObject({ problem: expect.stringMatching(/must ascend within \[0, 10\)/) })
    expect(denseGrads(t([4, 10]), shape)).toMatchObject({ problem: expect.stringMatching(/e@rows\[1\] = 10/) })
    expect(denseGrads(t([1, 2], 3), shape)).toMatchObject({ problem: expect.stringMatching(/do not fit/) })
    expect(denseGrads(t([1], 1, 3), shape)).toMatchObject({ problem: expect.stringMatching(/do not fit \[10, 2\]/) })
    expect(denseGrads([{ name: "x@rows", shape: [1], values: Int32Array.of(0) }], shape)).toMatchObject({ problem: expect.stringMatching(/without x/) })
    expect(denseGrads(t([1]), () => undefined)).toMatchObject({ problem: expect.stringMatching(/no 2-D tensor/) })
  })
})
